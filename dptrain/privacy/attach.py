"""Attaching the engine to the plan's modules: each hooked module's forward is replaced by one that hands every
training call to the engine (`keep`), and each owned parameter refuses a gradient that reaches it any other way.

A plain rule's module runs with its own parameters *detached*, so autograd never computes the non-private weight
gradient (only activation gradients flow); `keep` gets the call's detached inputs and its floating-point outputs,
whose gradients are the output gradients. An expanding rule's module (rules/expand.py) runs with per-example
stand-ins (taps) of its parameters; `keep` gets the taps, whose gradients are the per-example gradients.
Outputs are hooked with tensor hooks (not module backward hooks), which survive timm's in-place `x += shortcut`
and ReLU(inplace=True).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .errors import CoverageError
from .plan import Entry
from .rules import is_replaying
from .sequence_first import to_batch_first

# keep(entry, detached args, detached kwargs, rows, tensors): one training call of entry's module; a hook on each
# tensor's gradient is the engine's (the tensors require grad)
Keep = Callable[[Entry, tuple, dict, int, list], None]


class _Anchor(torch.autograd.Function):
    """Makes an output that does not require grad (a first layer on raw data) part of the graph, so a
    tensor hook can see its gradient; returns a copy because in-place ops on a custom Function's
    returned input are forbidden. Gives the parameters no gradient (book-keeping builds it)."""

    @staticmethod
    def forward(ctx, out, leaf):
        return out.clone()

    @staticmethod
    def backward(ctx, g):
        return g, None


def wrap(entry: Entry, keep: Keep, leaf: torch.Tensor, model_rows: Callable[[], int]) -> tuple[nn.Module, object]:
    """Replace the forward of entry's module; `leaf` (requires grad) puts outputs of raw-data layers in the graph,
    `model_rows()` is the model input's leading dimension in this forward. → (module, its own `forward` attribute
    before, or None) for `unwrap`."""
    m = entry.module
    saved = (m, m.__dict__.get("forward"))
    m.forward = (_expanded if entry.rule.expands else _plain)(entry, m.forward, keep, leaf, model_rows)
    return saved


def unwrap(saved: tuple[nn.Module, object]) -> None:
    m, forward = saved
    if forward is None:
        m.__dict__.pop("forward", None)
    else:
        m.forward = forward


def guard(entry: Entry) -> list:
    """Hooks on the owned parameters: a gradient reaching one outside the module's forward raises."""
    return [p.register_hook(partial(_outside_use, f"{entry.name}.{n}" if entry.name else n)) for n, p in entry.params]


def _plain(entry: Entry, orig, keep: Keep, leaf: torch.Tensor, model_rows) -> Callable:
    m = entry.module
    slots = []  # (owning module, attribute name, parameter) for the detached swap
    for n, p in entry.params:
        owner = m.get_submodule(n.rpartition(".")[0]) if "." in n else m
        slots.append((owner, n.rpartition(".")[2], p))

    def forward(*args, **kwargs):
        if is_replaying() or not torch.is_grad_enabled():
            return orig(*args, **kwargs)
        if entry.dropouts and m.training:
            _check_dropout(entry)
        for owner, name, p in slots:
            owner._parameters[name] = p.detach()
        try:
            out = orig(*args, **kwargs)
        finally:
            for owner, name, p in slots:
                owner._parameters[name] = p
        flat, spec = tree_flatten(out)
        idx = [i for i, o in enumerate(flat) if torch.is_tensor(o) and o.is_floating_point()]
        if not idx:
            raise CoverageError(f"{entry.label()}: the engine needs a floating-point tensor output")
        for i in idx:
            if not flat[i].requires_grad:
                flat[i] = _Anchor.apply(flat[i], leaf)
        args, kwargs = to_batch_first(entry, args, kwargs)  # a sequence-first call's record is batch-first
        rows = batch(entry, args, kwargs)
        if not entry.rule.needs_input(entry):  # e.g. a bias-only Linear (DP-BiTFiT): its input is not kept
            args, kwargs = (), {}
        keep(entry, tree_map(_detach, args), tree_map(_detach, kwargs), rows, [flat[i] for i in idx])
        return tree_unflatten(flat, spec)

    return forward


def _expanded(entry: Entry, orig, keep: Keep, leaf: torch.Tensor, model_rows) -> Callable:
    """The forward runs with the rule's taps in place of the owned parameters; a tap's gradient is the per-example
    gradient."""
    m, rule = entry.module, entry.rule

    def forward(*args, **kwargs):
        if is_replaying() or not torch.is_grad_enabled():
            return orig(*args, **kwargs)
        rows = batch(entry, args, kwargs, default=model_rows())
        taps = [_Anchor.apply(t, leaf) for t in rule.taps(m, entry.params, rows)]
        out = rule.run(m, orig, entry.params, taps, args, kwargs)
        keep(entry, (), {}, rows, taps)
        return out

    return forward


def batch(entry: Entry, args, kwargs, default: int = 0) -> int:
    """The batch size: the leading dimension of the call's first batched tensor argument (`default`, the
    model input's, for a module called without one)."""
    for a in tree_flatten((args, kwargs))[0]:
        if torch.is_tensor(a) and a.dim():
            return a.shape[0]
    if default:
        return default
    raise CoverageError(f"{entry.label()}: the engine needs a batched tensor input")


def _detach(x):
    return x.detach() if torch.is_tensor(x) else x


def _outside_use(name: str, grad: torch.Tensor) -> None:
    raise CoverageError(
        f"parameter '{name}' received a gradient outside its module's forward (a functional use such as "
        "F.linear(x, m.weight), or a tied weight), which the engine cannot clip. Route the use through the "
        "module, or make the module that uses it a fallback unit: PrivacyEngine(..., fallback=['<module>'])"
    )


def _check_dropout(e: Entry) -> None:
    for d in e.dropouts:
        p = getattr(d, "p", getattr(d, "drop_prob", getattr(d, "dropout", 0.0))) or 0.0  # MHA: a float `dropout`
        if d.training and p > 0:
            raise CoverageError(
                f"{e.label()} is replayed per example by the fallback, which cannot reproduce the random "
                f"dropout inside it ({type(d).__name__}, p={p}); set that dropout / drop-path rate to 0"
            )
