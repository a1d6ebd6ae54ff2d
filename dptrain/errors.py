"""Bad input raises UserError: the CLI prints its one-line message and exits non-zero."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    pass


def check_name(what: str, name: str, valid: Collection[str]) -> None:
    """Raise the one-line error for an unknown `name`, listing `valid` — the registry itself, so that the
    names a user is offered are always the names that work."""
    if name not in valid:
        raise UserError(f"unknown {what} '{name}'; valid: {', '.join(valid)}")


def lookup(what: str, name: str, registry: Mapping[str, T]) -> T:
    """registry[name], or a UserError listing the registry's keys."""
    check_name(what, name, registry)
    return registry[name]
