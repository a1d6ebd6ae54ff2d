"""Entry points: the command lines and what they print."""
