"""The trainable set: which parameters a plan clips, re-read at every training forward; a change between a
forward and its backward is refused (the forward's plan would clip the wrong set)."""

from __future__ import annotations

from torch import nn

from .errors import CoverageError


def trainable_ids(model: nn.Module) -> tuple[int, ...]:
    """The trainable set a plan (or Opacus' wrapping, engines.py) was built for: ids of requires_grad parameters."""
    return tuple(id(p) for p in model.parameters() if p.requires_grad)


def refuse_changed(model: nn.Module, before: tuple[int, ...], now: tuple[int, ...]) -> None:
    was, is_ = set(before), set(now)
    names = {id(p): n for n, p in model.named_parameters()}
    frozen = [names.get(i, "?") for i in before if i not in is_]
    unfrozen = [names.get(i, "?") for i in now if i not in was]
    what = "; ".join(f"{k}: {', '.join(v[:4])}{' …' if len(v) > 4 else ''}"
                     for k, v in (("frozen", frozen), ("unfrozen", unfrozen)) if v)
    raise CoverageError(
        f"requires_grad changed between the forward and its backward ({what}); the forward's plan would clip the "
        "wrong set. Change requires_grad before the forward (the engine re-plans at the next forward)")
