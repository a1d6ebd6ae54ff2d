"""Book-keeping of one backward's records (Record: one hooked call each): the examples behind a call,
the records whose rule still has to run, and the checks and casts before a rule runs on them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils._pytree import tree_map

from .errors import CoverageError

if TYPE_CHECKING:  # annotations only: plan and rules import this module
    from .plan import Entry


def examples(entry: Entry, rows: int, *, model_rows: int, augmult: int) -> int:
    """The examples B behind a call of `rows` rows. The model's input has K·B rows (K = augmult copies, each
    example's consecutive; `model_rows`, 0 when unknown); a layer may see a whole multiple of them, each example's
    rows consecutive (Swin's windows: B·nW rows) — the probe checked which rows belong to which example. The
    fallback replays row by row, so its rows must be the model's."""
    model_rows = model_rows or rows
    if model_rows == 0:  # an empty batch: nothing to clip, nothing added
        return 0
    if rows % model_rows or model_rows % augmult or (not entry.rule.eager and rows != model_rows):
        windows = "" if entry.rule.eager or rows % model_rows else (
            "; or several rows per example (window attention's windows), which the generic fallback cannot "
            "replay: such a module needs a rule of its own (dptrain/privacy/rules/)")
        raise CoverageError(
            f"{entry.label()} saw {rows} rows but the model's input has {model_rows} (augmult={augmult}): "
            "its rows are not the examples (a sequence-first (T, B, …) layout or a transpose); keep the batch "
            f"dimension first{windows}")
    return model_rows // augmult


def pending(records: list[tuple[Entry, Record]], *, model_rows: int, augmult: int
            ) -> tuple[dict[int, tuple[Entry, list[Record]]], list[tuple[Entry, Record]], int]:
    """Records whose rule still has to run (per layer: reused layers, fallback units), those done during
    the backward, and the number of examples B."""
    groups: dict[int, tuple[Entry, list[Record]]] = {}
    done: list[tuple[Entry, Record]] = []
    for e, r in records:
        if r.result is not None:
            done.append((e, r))
        elif any(g is not None for g in r.grads):
            groups.setdefault(id(e), (e, []))[1].append(r)
    calls = [(e, r) for e, rs in groups.values() for r in rs] + done
    if not model_rows and len({r.rows for _, r in calls}) > 1:  # no model batch to check against
        raise CoverageError(f"hooked layers saw different batch sizes {sorted({r.rows for _, r in calls})}")
    sizes = {examples(e, r.rows, model_rows=model_rows, augmult=augmult) for e, r in calls}
    return groups, done, sizes.pop() if sizes else 0


def ready(e: Entry, recs: list[Record], B: int) -> None:
    """Before a rule runs on the records: their inputs are unchanged since the forward; B examples. Inputs and
    output gradients a forward under autocast left in bfloat16/float16 are cast up to float32 here, so a rule's
    norms and its clipped sum are computed in float32 from the same per-example quantities: each example's
    contribution is c_i times the float32 g_iᵀa_i whose norm gave c_i, ≤ R up to float32 rounding."""
    for r in recs:
        for a, v in zip(r.args, r.versions):
            if v is not None and a._version != v:
                raise CoverageError(
                    f"the input of {e.label()} was modified in place after its forward; its per-example "
                    "gradient would be wrong. Make that operation out of place (e.g. inplace=False)"
                )
        r.batch = B
        r.args, r.kwargs = tree_map(_to_fp32, r.args), tree_map(_to_fp32, r.kwargs)
        r.grads = [None if g is None else _to_fp32(g) for g in r.grads]


def _to_fp32(x):
    return x.float() if torch.is_tensor(x) and x.dtype in (torch.float16, torch.bfloat16) else x


class Record:
    """One call of a hooked module: detached inputs and, after backward, output gradients (or, for an
    expanding rule, the gradients of its per-example stand-ins)."""

    __slots__ = ("args", "kwargs", "grads", "rows", "batch", "versions", "forward_id", "n_out", "result", "place")

    def __init__(self, args: tuple, kwargs: dict, rows: int, forward_id: int, n_out: int):
        self.args, self.kwargs, self.forward_id = args, kwargs, forward_id
        self.rows = self.batch = rows  # rows of the input; examples (rows / K), set before the rules run
        self.grads: list[torch.Tensor | None] = [None] * n_out
        self.n_out = n_out
        self.versions = [a._version if torch.is_tensor(a) else None for a in args]
        self.result: tuple | None = None  # (squared norms, state) once the rule has run on this record
        self.place = 0  # index among its forward's records (a recomputed forward makes its records in the same order)

    def release(self) -> None:
        """Drop the inputs and output gradients: a rule's state keeps what its accumulate needs."""
        self.args, self.kwargs, self.grads = (), {}, [None] * self.n_out
