"""Bad input raises UserError: the CLI prints its one-line message and exits non-zero."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    pass


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most `limit` characters ("" for an empty message)."""
    return (str(e).strip().splitlines() or [""])[0][:limit]


class Diverged(UserError):
    """Training produced a non-finite loss or non-finite weights (loop.py's guard); `steps`: the optimizer steps
    that count as spent. run.py marks the run failed (failed.json, with the ε of those steps) and stops."""

    def __init__(self, what: str, *, steps: int):
        super().__init__(what)
        self.what, self.steps = what, steps


def check_name(what: str, name: str, valid: Collection[str]) -> None:
    """Raise the one-line error for an unknown `name`, listing `valid` — the registry itself, so that the
    names a user is offered are always the names that work."""
    if name not in valid:
        raise UserError(f"unknown {what} '{name}'; valid: {', '.join(valid)}")


def lookup(what: str, name: str, registry: Mapping[str, T]) -> T:
    """registry[name], or a UserError listing the registry's keys."""
    check_name(what, name, registry)
    return registry[name]


def check_range(name: str, value, interval: str, *, optional: bool = False) -> None:
    """Raise the one-line error unless `value` is a finite number in `interval`, written as in maths: "(0, inf)",
    "[0, 1)", "[1, inf)" (an upper bound of inf still wants a finite value: nan and inf never pass).
    optional: None passes (a knob whose None means "derive it" or "off")."""
    if value is None and optional:
        return
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        above = lo < value if interval[0] == "(" else lo <= value
        below = value < hi if interval[-1] == ")" else value <= hi
        if above and below:
            return
    if hi == math.inf:  # "(0, inf)" reads "> 0 and finite", "[1, inf)" given an integer ">= 1"
        finite = "" if isinstance(value, int) else " and finite"
        want = f"{'>' if interval[0] == '(' else '>='} {lo:g}{finite}"
    else:
        want = f"in {interval}"
    raise UserError(f"{name} must be {want}, got {value}")
