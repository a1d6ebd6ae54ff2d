"""Sequence-first torch modules inside a batch-first model: their calls' examples are along dim 1.

nn.MultiheadAttention and nn.TransformerEncoderLayer / DecoderLayer (and nn.TransformerEncoder / Decoder /
Transformer built from them) default to batch_first=False: inside a batch-first model (the user transposes to
(T, B, d) and back) their Linear and LayerNorm children see (T, B, d) and the attention sees (T, B, d) queries. The
rules clip row i as example i, so these calls are recorded batch-first instead: the hooked inputs listed in SEQ_ARGS
and the gradient of the first output are `movedim(1, 0)`-ed to (B, T, d), and a seq-first MultiheadAttention on the
fallback is replayed with batch_first=True (the same function of batch-first tensors). Nothing else changes: the rules
see what they see for batch_first=True.

Which modules: `mark` reads the torch modules' own batch_first attributes (exact types, or subclasses that keep their
forward) and marks only the Linear / LayerNorm / MultiheadAttention entries inside them. The one-time probe
(probe.py) then checks the marked calls along dim 1, as every call along dim 0: only example 0's slice may move with
example 0 or carry its gradient, else CoverageError. Any other layout (a Linear after the user's own transpose, an
unmarked module) is still checked along dim 0 and refused.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .errors import CoverageError

# module type → the forward arguments that are (T, B, …) in a sequence-first call
SEQ_ARGS: dict[type, tuple[str, ...]] = {
    nn.Linear: ("input",),
    nn.LayerNorm: ("input",),
    nn.MultiheadAttention: ("query", "key", "value"),
}
_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _plain(m: nn.Module, base: type) -> bool:
    """`m` is a `base` that computes base's function (its exact type, or a subclass that keeps its forward)."""
    return isinstance(m, base) and type(m).forward is base.forward


def seq_first(m: nn.Module) -> bool:
    """A torch module whose calls are sequence-first (T, B, …), read from its batch_first attributes."""
    if _plain(m, nn.MultiheadAttention):
        return not m.batch_first
    if _plain(m, nn.TransformerEncoderLayer):
        return seq_first(m.self_attn)
    if _plain(m, nn.TransformerDecoderLayer):
        return seq_first(m.self_attn) and seq_first(m.multihead_attn)
    if _plain(m, nn.TransformerEncoder) or _plain(m, nn.TransformerDecoder):
        return len(m.layers) > 0 and all(isinstance(x, _LAYERS) and seq_first(x) for x in m.layers)
    if _plain(m, nn.Transformer):
        return not m.batch_first and seq_first(m.encoder) and seq_first(m.decoder)
    return False


def mark(model: nn.Module, entries: list) -> None:
    """Sets entry.batch_dim = 1 for the Linear, LayerNorm and MultiheadAttention entries inside a sequence-first torch
    module (for the attention, the module itself)."""
    inside: set[int] = set()
    for m in model.modules():
        if id(m) not in inside and seq_first(m):
            inside |= {id(x) for x in m.modules()}
    for e in entries:
        if id(e.module) in inside and type(e.module) in SEQ_ARGS:
            e.batch_dim = 1


def _flags(entry, args: tuple, kwargs: dict) -> list[bool]:
    """Per leaf of tree_flatten((args, kwargs)): is it one of the sequence-first arguments."""
    seq = SEQ_ARGS[type(entry.module)]
    names = list(inspect.signature(type(entry.module).forward).parameters)[1:]  # without self
    named = [names[i] if i < len(names) else "" for i in range(len(args))] + list(kwargs)
    values = [*args, *kwargs.values()]
    marks = [tree_map(lambda _, s=(n in seq): s, v) for n, v in zip(named, values)]
    flags = (tuple(marks[: len(args)]), dict(zip(kwargs, marks[len(args):])))
    return tree_flatten(flags)[0]


def seq_positions(entry, args: tuple, kwargs: dict) -> list[int]:
    """The positions in tree_flatten((args, kwargs)) of a marked call's sequence-first tensors ([] if unmarked)."""
    if not entry.batch_dim:
        return []
    return [i for i, f in enumerate(_flags(entry, args, kwargs)) if f is True]


def to_batch_first(entry, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A marked call's (T, B, …) arguments as (B, T, …) views; an unmarked call's unchanged."""
    pos = seq_positions(entry, args, kwargs)
    if not pos:
        return args, kwargs
    flat, spec = tree_flatten((args, kwargs))
    for i in pos:
        t = flat[i]
        if torch.is_tensor(t):
            if t.dim() < 3:
                raise CoverageError(
                    f"{entry.label()}: a sequence-first call with a {tuple(t.shape)} argument (expected (T, B, d)); "
                    "keep the batch dimension first (e.g. batch_first=True)")
            flat[i] = t.movedim(1, 0)
    return tree_unflatten(flat, spec)


def grad_to_batch_first(entry, k: int, g: torch.Tensor) -> torch.Tensor:
    """The gradient of a hooked call's output k, batch-first: a marked call's first output is (T, B, …)."""
    return g.movedim(1, 0) if k == 0 and entry.batch_dim and g.dim() >= 3 else g


def seen_as(entry) -> str:
    """For a refusal: a marked call's shapes and rows are its batch-first record's."""
    return (" (read as (B, T, …) from a (T, B, …) call, as its batch_first=False says; a different layout is "
            "refused)") if entry.batch_dim else ""


@contextlib.contextmanager
def replayed_batch_first(entry):
    """The fallback replays a marked MultiheadAttention on its batch-first records as batch_first=True."""
    m = entry.module
    if not (entry.batch_dim and isinstance(m, nn.MultiheadAttention)):
        yield
        return
    m.batch_first = True
    try:
        yield
    finally:
        m.batch_first = False
