"""The generic fallback: any module with trainable parameters and no rule is replayed per example with
torch.func (vmap of the vjp of its own forward) — exact for any deterministic module, but slower: the engine
reports the share of parameters on it (PrivacyEngine.fallback_share)."""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..records import Record
from ..sequence_first import replayed_batch_first
from .base import Rule, add_grad, fold, weighted_sum

_STATE = threading.local()


@contextlib.contextmanager
def replaying():
    """Inside a fallback replay the engine's hooked forwards behave as plain modules."""
    prev = getattr(_STATE, "replaying", False)
    _STATE.replaying = True
    try:
        yield
    finally:
        _STATE.replaying = prev


def is_replaying() -> bool:
    return getattr(_STATE, "replaying", False)


class FallbackRule(Rule):
    """Any module with parameters and no rule: per-example gradients of every parameter of its subtree
    by torch.func — vmap over the batch of the vjp of the module's own forward, replayed on the stored
    inputs with the stored output gradients. Exact for any deterministic module; slower."""

    name = "fallback"
    eager = False  # replays autograd: runs after the whole backward, outside the engine's hooks

    def norms(self, entry, recs, mode, keep=True):
        entry.choice = "fallback"
        m = entry.module
        names = [n for n, _ in entry.params]
        params = tuple(p.detach() for _, p in entry.params)
        B = recs[0].batch
        total = None
        for r in recs:
            if all(g is None for g in r.grads):
                continue
            with replayed_batch_first(entry):  # sequence-first records, read batch-first
                per = tuple(fold(t, B) for t in self._per_example(m, names, params, r, r.rows, entry.split))
            total = per if total is None else tuple(t + q for t, q in zip(total, per))
        n2 = params[0].new_zeros(B)
        if total is None:
            return n2, None
        for t in total:
            n2 = n2 + t.reshape(B, -1).pow(2).sum(1).to(n2.dtype)
        return n2, total

    @staticmethod
    def _per_example(m, names, params, r: Record, B: int, split: set[int] | None) -> tuple[torch.Tensor, ...]:
        flat_args, spec = tree_flatten((r.args, r.kwargs))
        # split only what the probe saw move with (or carry gradient to) one example: a table or mask shared by the
        # batch stays whole even when its first dimension equals B by coincidence
        dims = tuple(0 if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == B and (split is None or j in split)
                     else None for j, a in enumerate(flat_args))
        grads = tuple(g for g in r.grads)
        gmask = [g is not None for g in grads]
        present = tuple(g for g in grads if g is not None)

        def one(flat_i, grads_i):
            batched = [a.unsqueeze(0) if d == 0 else a for a, d in zip(flat_i, dims)]
            args, kwargs = tree_unflatten(batched, spec)

            def f(*ps):
                out = functional_call(m, dict(zip(names, ps)), args, kwargs)
                outs = [o for o in tree_flatten(out)[0] if torch.is_tensor(o) and o.is_floating_point()]
                return tuple(o for o, keep in zip(outs, gmask) if keep)

            _, pull = vjp(f, *params)
            return pull(tuple(g.unsqueeze(0) for g in grads_i))

        with replaying():
            return vmap(one, in_dims=(list(dims), 0), randomness="error")(list(flat_args), present)

    def accumulate(self, entry, recs, c, state):
        if state is None:
            return
        for (_, p), t in zip(entry.params, state):
            add_grad(p, weighted_sum(t, c))


FALLBACK = FallbackRule()
