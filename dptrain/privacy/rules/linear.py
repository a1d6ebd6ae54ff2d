"""nn.Linear: ghost norm (two T×T Grams) or instantiated per-example gradients, chosen per layer."""

from __future__ import annotations

import torch
from torch import nn

from ..records import Record
from . import base
from .base import Rule, add_grad, cat, choose, gram_norm2, owned, scale_smaller, weighted_sum


class LinearRule(Rule):
    """nn.Linear on (B, d), (B, T, d) or (B, ..., d) inputs; T = product of the middle dims."""

    name = "linear"

    def _flat(self, m: nn.Linear, recs: list[Record]) -> tuple[torch.Tensor, torch.Tensor]:
        a = [r.args[0].reshape(r.batch, -1, m.in_features) for r in recs]
        # an output that did not reach the loss has zero gradient
        g = [x.new_zeros(*x.shape[:2], m.out_features) if r.grads[0] is None
             else r.grads[0].reshape(x.shape[0], -1, m.out_features) for r, x in zip(recs, a)]
        return cat(a, 1), cat(g, 1)  # reuse: concatenate calls along T

    def needs_input(self, entry):
        return owned(entry, "weight") is not None

    @staticmethod
    def _bias_grads(m: nn.Linear, recs: list[Record]) -> torch.Tensor | None:
        """A bias-only layer: (B, p) per-example bias gradients from the output gradients alone, or None."""
        gs = [r.grads[0].reshape(r.batch, -1, m.out_features).sum(1) for r in recs if r.grads[0] is not None]
        return sum(gs) if gs else None

    def norms(self, entry, recs, mode, keep=True):
        m = entry.module
        if owned(entry, "weight") is None:
            gb = self._bias_grads(m, recs)
            if gb is None:
                return m.bias.new_zeros(recs[0].batch), {}
            return gb.pow(2).sum(1), {"gb": gb}
        a, g = self._flat(m, recs)
        B, T = a.shape[0], a.shape[1]
        n2 = a.new_zeros(B)
        state: dict[str, torch.Tensor] = {"a": a, "g": g}
        if owned(entry, "weight") is not None:
            entry.choice = choose(mode, T, m.out_features, m.in_features)
            if entry.choice == "ghost" or T == 1:
                n2 = n2 + gram_norm2(a, g)
            else:
                pw = a.new_empty(B, m.out_features, m.in_features) if keep else None  # (B, p, d)
                step = max(1, base.PER_EXAMPLE_BUDGET // (m.out_features * m.in_features))
                for lo in range(0, B, step):
                    chunk = torch.einsum("btp,btd->bpd", g[lo : lo + step], a[lo : lo + step])
                    n2[lo : lo + step] += chunk.pow(2).sum((1, 2))
                    if keep:
                        pw[lo : lo + step] = chunk
                if keep:
                    state = {"pw": pw}  # a and g are no longer needed: free them with the record
        if owned(entry, "bias") is not None:
            gb = g.sum(1)  # (B, p)
            n2 = n2 + gb.pow(2).sum(1)
            state["gb"] = gb
        return n2, state

    def accumulate_plain(self, entry, recs):
        w, b = owned(entry, "weight"), owned(entry, "bias")
        if w is None:
            gb = self._bias_grads(entry.module, recs)
            if b is not None and gb is not None:
                add_grad(b, gb.sum(0))
            return
        a, g = self._flat(entry.module, recs)
        if w is not None:
            add_grad(w, g.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1]))
        if b is not None:
            add_grad(b, g.sum((0, 1)))

    def accumulate(self, entry, recs, c, state):
        w, b = owned(entry, "weight"), owned(entry, "bias")
        if w is not None:
            if "pw" in state:
                add_grad(w, weighted_sum(state["pw"], c))
            else:
                a, g = scale_smaller(state["a"], state["g"], c)
                add_grad(w, g.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1]))
        if b is not None and "gb" in state:
            add_grad(b, c.to(state["gb"].dtype) @ state["gb"])
