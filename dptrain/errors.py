"""Bad input raises UserError: the CLI prints its one-line message and exits non-zero."""


class UserError(Exception):
    pass
