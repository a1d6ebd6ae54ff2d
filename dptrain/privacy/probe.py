"""Which rows are the examples: a one-time probe before the first training step.

The engine clips row i of each hooked call as example i. That holds only if the call's leading dimension is the
model's batch. A sequence-first layer (nn.MultiheadAttention's default, a transpose to (T, B, d) in user code)
has T rows; when T ≠ B the backward refuses, but when T == B a per-row clip is a per-time-step clip and one
example's gradient can exceed R silently (pitfalls.md: measured 2.7·R). A table or mask shared by all examples,
passed as an argument, can also have B rows by coincidence.

The probe (eval mode, random state forked, hooks of the engine off) checks both directions for every tensor with
B leading rows that a hooked call takes or returns:
  forward:  the model on the batch and on the batch with example 0 changed — only row 0 may change;
  backward: the gradient of example 0's outputs alone — only row 0 may receive any.
A row that moves with another example, or that influences another example, is not an example: CoverageError
naming the module. A call read as sequence-first (sequence_first.py) (torch's batch_first=False attention modules) is
checked batch-first, along its dim 1: a module fed another layout than its batch_first says is refused. An argument
whose rows neither depend on the examples nor carry a gradient (a mask or table passed in) is ambiguous — shared, or
per-example copies of a constant — and is refused when the fallback would split it (for the other rules the backward
check on their outputs decides).
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint as checkpoint
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import CoverageError
from .plan import Entry
from .rules import FALLBACK, replaying
from .sequence_first import seen_as, seq_positions, to_batch_first


def _perturbed(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    if x.is_floating_point():
        y[0] = x[0] + 1.0 + torch.randn_like(x[0])
    else:  # ids: every value stays one the batch already holds (max + 1 → 0)
        y[0] = (x[0] + 1) % (int(x.max()) + 1)
    return y


def _capture(model: nn.Module, entries: list[Entry], args, kwargs, *, grad: bool,
             moves: dict | None = None) -> dict[int, list[list]]:
    """Per entry, per call: the flat tensor arguments (and, with grad=True, outputs appended), detached unless
    grad=True (then the live tensors, for torch.autograd.grad). A sequence-first call's are batch-first:
    detached copies moved here; for live tensors, `moves[(entry id, call)]` gets the positions whose gradients
    _example_zero_grads moves."""
    seen: dict[int, list[list]] = {id(e): [] for e in entries}

    def hook(entry, module, a, kw, out):
        if grad:
            n_in = len(tree_flatten((a, kw))[0])
            moved = seq_positions(entry, a, kw) + ([n_in] if entry.batch_dim else [])  # + the first output
            moves[(id(entry), len(seen[id(entry)]))] = moved
        else:
            a, kw = to_batch_first(entry, a, kw)
        flat = tree_flatten((a, kw))[0] + (tree_flatten(out)[0] if grad else [])
        keep = (lambda t: t) if grad else (lambda t: t.detach().clone())
        seen[id(entry)].append([keep(t) if torch.is_tensor(t) else None for t in flat])

    handles = [e.module.register_forward_hook(lambda m, a, kw, o, e=e: hook(e, m, a, kw, o), with_kwargs=True)
               for e in entries]
    try:
        with torch.set_grad_enabled(grad), replaying():
            out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    if grad:
        seen[-1] = [[t for t in tree_flatten(out)[0] if torch.is_tensor(t) and t.is_floating_point()]]
    return seen


class _Direct:
    """Stands in for torch.utils.checkpoint's reentrant CheckpointFunction during the probe: the segment runs as a
    plain call (the same values), because torch.autograd.grad cannot pass through a reentrant segment."""

    @staticmethod
    def apply(function, preserve_rng_state, *args):
        return function(*args)


@contextlib.contextmanager
def direct_checkpoints():
    """Reentrant activation checkpointing (timm's set_grad_checkpointing, use_reentrant=True) off while the probe
    runs; non-reentrant segments need nothing (their recompute runs inside `replaying()`, as their forward did)."""
    saved = getattr(checkpoint, "CheckpointFunction", None)
    if saved is None:  # pragma: no cover - every supported torch has it
        yield
        return
    checkpoint.CheckpointFunction = _Direct
    try:
        yield
    finally:
        checkpoint.CheckpointFunction = saved


PROBE_ROWS = 3  # the probe runs on the batch's first rows: its memory is a small step's, not a full one's


def probe_rows(model: nn.Module, entries: list[Entry], args: tuple, kwargs: dict) -> bool:
    """Raises CoverageError where a hooked call's rows are not the examples, or an argument the fallback would
    split is ambiguous; sets each fallback entry's `split` (the flat argument positions that are per example).
    Needs a batch of at least two rows; returns whether it ran."""
    flat, spec = tree_flatten((args, kwargs))
    x = next((i for i, t in enumerate(flat) if torch.is_tensor(t) and t.dim()), None)  # the batch argument
    if x is None or flat[x].shape[0] < 2:
        return False
    full = flat[x].shape[0]
    B = min(full, PROBE_ROWS)
    flat = [t[:B] if torch.is_tensor(t) and t.dim() and t.shape[0] == full else t for t in flat]
    args, kwargs = tree_unflatten(flat, spec)
    was = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[flat[x].device] if flat[x].is_cuda else []), direct_checkpoints():
            first = _capture(model, entries, args, kwargs, grad=False)
            changed = tree_unflatten([_perturbed(t) if i == x else t for i, t in enumerate(flat)], spec)
            second = _capture(model, entries, *changed, grad=False)
            moves: dict[tuple[int, int], list[int]] = {}
            live = _capture(model, entries, args, kwargs, grad=True, moves=moves)
            with replaying():  # a non-reentrant checkpoint recomputes here: as the plain forward it replays
                grads = _example_zero_grads(live)
    finally:
        model.train(was)
    for (eid, c, pos), g in grads.items():  # a sequence-first call's gradients, batch-first as its tensors above
        if pos in moves.get((eid, c), ()) and g.dim() >= 3:
            grads[(eid, c, pos)] = g.movedim(1, 0)
    for e in entries:
        for c, (call_a, call_b) in enumerate(zip(first[id(e)], second[id(e)])):
            _check_inputs(e, call_a, call_b, {pos: grads.get((id(e), c, pos)) for pos in range(len(call_a))}, B)
        if not e.rule.expands:  # an expanding rule's stand-ins carry the per-example gradients, not its outputs
            for c, call in enumerate(live[id(e)]):
                n_in = len(first[id(e)][c]) if c < len(first[id(e)]) else 0
                for pos in range(n_in, len(call)):  # a row of an output that reaches example 0 must be row 0
                    g = grads.get((id(e), c, pos))
                    if g is not None and g.dim() and g.shape[0] % B == 0:
                        rows = _rows(_nonzero(g), g.shape[0])
                        if rows[g.shape[0] // B:].any():
                            _refuse(e, g, "reached example 0's output", rows)
    return True


def _check_inputs(e: Entry, call_a: list, call_b: list, grads: dict, B: int) -> None:
    """One call's tensor arguments in the two forwards (example 0 changed in the second) and their gradients
    from example 0's output. The fallback splits every argument, so its input must have B rows (k·B rows, each
    example's k consecutive, are refused as needing a rule); other rules read only the first (their input, or their
    batch), which may have k·B rows, each example's k consecutive (Swin's windows)."""
    first_arg = next((i for i, t in enumerate(call_a) if torch.is_tensor(t) and t.dim()), None)
    if first_arg is not None:
        x, R = call_a[first_arg], call_a[first_arg].shape[0]
        if e.rule is FALLBACK and R != B and R % B == 0:
            moved, _ = _own_rows(e, x, call_b[first_arg], grads.get(first_arg), R // B)  # sequence-first: refused
            if moved.any():  # only example 0's own k consecutive rows moved: several rows per example
                raise CoverageError(
                    f"{e.label()}: its {tuple(x.shape)} input has {R // B} rows per example (each example's "
                    "consecutive, as window attention's B·nW windows), but the generic fallback replays one row per "
                    "example; this module needs a rule of its own (dptrain/privacy/rules/, as timm's Swin "
                    "WindowAttention has: swin_attn)")
        if R % B or (e.rule is FALLBACK and R != B):
            raise CoverageError(
                f"{e.label()}: its {tuple(x.shape)} input has {R} rows but the model's batch has "
                f"{B}, so its rows are not the examples (a sequence-first (T, B, …) layout or a transpose)"
                f"{seen_as(e)}; keep the batch dimension first")
    for pos, (a, b) in enumerate(zip(call_a, call_b)):
        if not (torch.is_tensor(a) and a.dim() and a.shape[0] % B == 0) or (
                e.rule is not FALLBACK and pos != first_arg) or (e.rule is FALLBACK and a.shape[0] != B):
            continue
        moved, g = _own_rows(e, a, b, grads.get(pos), a.shape[0] // B)
        if e.rule is FALLBACK and (moved.any() or g is not None):
            e.split.add(pos)
        if e.rule is FALLBACK and not moved.any() and g is None:
            raise CoverageError(
                f"{e.label()}: argument {pos} has {B} rows (the batch size) that do not depend on the examples: a "
                "table or mask shared by all examples, or per-example copies of a constant — ambiguous. Register "
                "it as a buffer of the module, or give it a size other than the batch")


def _own_rows(e: Entry, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor | None, k: int):
    """Refuses unless only rows [0, k) of `a` (example 0's, with k rows per example) moved when example 0 changed
    (b) or received gradient from example 0's output (g). Returns (the rows that moved, g)."""
    moved = _rows(_differ(a, b), a.shape[0])
    reach = None if g is None else _rows(_nonzero(g), a.shape[0])
    for what, rows in (("moved with example 0", moved), ("reached example 0's output", reach)):
        if rows is not None and rows[k:].any():
            _refuse(e, a, what, rows)
    return moved, g


def _example_zero_grads(live: dict) -> dict[tuple[int, int, int], torch.Tensor]:
    """Gradients of example 0's outputs (its row of every float model output, summed) w.r.t. every captured
    tensor that requires grad: {(entry id, call, position): gradient}."""
    outs = live.pop(-1)[0]
    loss = sum(o[0].sum() for o in outs if o.dim() and o.requires_grad)
    keys, tensors = [], []
    for eid, calls in live.items():
        for c, call in enumerate(calls):
            for pos, t in enumerate(call):
                if torch.is_tensor(t) and t.requires_grad and t.is_floating_point():
                    keys.append((eid, c, pos))
                    tensors.append(t)
    if not torch.is_tensor(loss) or not tensors:
        return {}
    got = torch.autograd.grad(loss, tensors, allow_unused=True)
    return {k: (torch.zeros_like(t) if g is None else g) for k, t, g in zip(keys, tensors, got)}


def _rows(mask: torch.Tensor, B: int) -> torch.Tensor:
    return mask.reshape(B, -1).any(1)


def _refuse(e: Entry, a: torch.Tensor, what: str, rows: torch.Tensor) -> None:
    moved = rows.nonzero().flatten().tolist()
    raise CoverageError(
        f"{e.label()}: rows {moved[:6]}{' …' if len(moved) > 6 else ''} of its {tuple(a.shape)} input or output "
        f"{what}, so its rows are not the examples (a sequence-first (T, B, …) layout, a transpose, or a tensor "
        f"shared by the batch){seen_as(e)}; keep the batch dimension first (e.g. batch_first=True)")


def _differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise a != b, with NaN equal to NaN (an example that is already non-finite has not 'moved')."""
    same = a == b
    if a.is_floating_point():
        same |= a.isnan() & b.isnan()
    return ~same


def _nonzero(g: torch.Tensor) -> torch.Tensor:
    """Where a gradient is non-zero; NaN/inf count as zero (0·NaN in the backward of an example that is already
    non-finite is not a path from example 0)."""
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) != 0
