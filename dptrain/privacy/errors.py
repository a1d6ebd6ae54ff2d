"""The engine's one error type (a leaf module: every other privacy module may import it)."""


class CoverageError(RuntimeError):
    """A trainable parameter would not get an exact per-example gradient."""
