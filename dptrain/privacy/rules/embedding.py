"""nn.Embedding: ghost norm over equal ids; padding_idx rows get no gradient."""

from __future__ import annotations

import torch

from ..errors import CoverageError
from .base import Rule, add_grad, owned


class EmbeddingRule(Rule):
    """nn.Embedding: ghost norm Σ_{t,s} [id_t = id_s]·(g_t·g_s); rows at padding_idx get no gradient."""

    name = "embedding"

    def check(self, module, name):
        if module.sparse:
            raise CoverageError(f"embedding '{name}' uses sparse gradients; set sparse=False")
        if module.scale_grad_by_freq:
            # the 1/count scaling counts ids over the whole batch: example i's gradient would depend on the others
            raise CoverageError(f"embedding '{name}' has scale_grad_by_freq=True, which scales each example's "
                                "gradient by id counts over the whole batch (not a per-example gradient); set it False")

    @staticmethod
    def _gather(entry, recs) -> tuple[torch.Tensor, torch.Tensor] | None:
        """All calls' ids (B, T) and output gradients (B, T, d), padding rows zeroed; None if no gradient."""
        m, B = entry.module, recs[0].batch
        ids, gs = [], []
        for r in recs:
            if r.grads[0] is None:
                continue
            idx = r.args[0].reshape(B, -1)
            g = r.grads[0].reshape(B, idx.shape[1], -1)
            if m.padding_idx is not None:
                g = g.masked_fill((idx == m.padding_idx).unsqueeze(-1), 0)
            ids.append(idx)
            gs.append(g)
        return (torch.cat(ids, 1), torch.cat(gs, 1)) if ids else None

    def norms(self, entry, recs, mode, keep=True):
        entry.choice = "ghost"
        got = self._gather(entry, recs)
        if got is None:
            return entry.params[0][1].new_zeros(recs[0].batch), {}
        idx, g = got
        same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(g.dtype)  # (B, T, T)
        n2 = (same * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
        return n2, {"idx": idx, "g": g}

    def accumulate_plain(self, entry, recs):
        got = self._gather(entry, recs)
        if got is not None:
            self.accumulate(entry, recs, torch.ones(recs[0].batch, device=got[1].device), {"idx": got[0], "g": got[1]})

    def accumulate(self, entry, recs, c, state):
        if not state:
            return
        w = owned(entry, "weight")
        g = state["g"] * c.view(-1, 1, 1).to(state["g"].dtype)
        gw = torch.zeros_like(w).index_add_(0, state["idx"].reshape(-1), g.reshape(-1, g.shape[-1]))
        add_grad(w, gw)

