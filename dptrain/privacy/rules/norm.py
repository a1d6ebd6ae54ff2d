"""Normalisations with an elementwise affine (LayerNorm, timm LayerNorm2d, GroupNorm) and timm's LayerScale:
per-example gradients are small (B × channels), so they are always instantiated."""

from __future__ import annotations

import torch.nn.functional as F

from ..errors import CoverageError
from .base import Rule, add_grad, fold, owned


class _AffineNormRule(Rule):
    """Normalisations with an elementwise affine (LayerNorm, GroupNorm): the per-example gradients
    are small (B × channels), so they are always instantiated: Σ_positions g ⊙ x̂ and Σ_positions g."""

    name = "norm"

    def normalized(self, m, x):  # → (x̂, g-layout permutation), channels last: (B, N, C...)
        raise NotImplementedError

    def norms(self, entry, recs, mode, keep=True):
        entry.choice = "instantiate"
        m = entry.module
        pw = pb = None
        for r in recs:
            if r.grads[0] is None:
                continue
            xh, g = self.normalized(m, r.args[0], r.grads[0])  # both (rows, N, *shape)
            w_i, b_i = fold((g * xh).sum(1), r.batch), fold(g.sum(1), r.batch)
            pw = w_i if pw is None else pw + w_i
            pb = b_i if pb is None else pb + b_i
        B = recs[0].batch
        n2 = recs[0].args[0].new_zeros(B)
        state = {}
        if pw is not None:
            if owned(entry, "weight") is not None:
                state["weight"] = pw.reshape(B, -1)
            if owned(entry, "bias") is not None:
                state["bias"] = pb.reshape(B, -1)
            for v in state.values():
                n2 = n2 + v.pow(2).sum(1)
        return n2, state

    def accumulate(self, entry, recs, c, state):
        for name, v in state.items():
            add_grad(owned(entry, name), c.to(v.dtype) @ v)


class LayerNormRule(_AffineNormRule):
    def __init__(self, channels_first: bool = False):
        self.channels_first = channels_first  # timm LayerNorm2d: (B, C, H, W) normalised over C

    def normalized(self, m, x, g):
        if self.channels_first:
            x, g = x.movedim(1, -1), g.movedim(1, -1)
        xh = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        shape = (x.shape[0], -1, *m.normalized_shape)  # (B, N, *normalized_shape)
        return xh.reshape(shape), g.reshape(shape)


class InstanceNormRule(_AffineNormRule):
    """nn.InstanceNorm1d/2d/3d with affine=True (and no running statistics: plan.py refuses those)."""

    def normalized(self, m, x, g):
        xh = F.instance_norm(x, eps=m.eps)
        B, C = x.shape[:2]
        return xh.reshape(B, C, -1).transpose(1, 2), g.reshape(B, C, -1).transpose(1, 2)


class GroupNormRule(_AffineNormRule):
    def normalized(self, m, x, g):
        xh = F.group_norm(x, m.num_groups, None, None, m.eps)
        B, C = x.shape[:2]
        # (B, C, *S) → (B, S, C)
        return xh.reshape(B, C, -1).transpose(1, 2), g.reshape(B, C, -1).transpose(1, 2)


class ScaleRule(Rule):
    """timm LayerScale (x · γ over the last dim) and LayerScale2d (over channels): γ_i = Σ g ⊙ x."""

    name = "scale"

    def __init__(self, channel_dim: int):
        self.channel_dim = channel_dim

    def check(self, module, name):
        if getattr(module, "inplace", False):
            raise CoverageError(f"LayerScale '{name}' is in-place (overwrites its input); use inplace=False")

    def norms(self, entry, recs, mode, keep=True):
        entry.choice = "instantiate"
        B = recs[0].batch
        pw = None
        for r in recs:
            if r.grads[0] is not None:
                prod = (r.grads[0] * r.args[0]).movedim(self.channel_dim, -1)
                w = prod.reshape(B, -1, prod.shape[-1]).sum(1)  # (B, d)
                pw = w if pw is None else pw + w
        if pw is None:
            return recs[0].args[0].new_zeros(B), None
        return pw.pow(2).sum(1), pw

    def accumulate(self, entry, recs, c, state):
        if state is not None:
            add_grad(entry.params[0][1], c.to(state.dtype) @ state)

