"""Shared test code: the engine's test cases, tiny runs killed and resumed, the distributed workers."""
