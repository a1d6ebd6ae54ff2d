"""nn.Conv1d/2d/3d: ghost norm (from im2col, or from the padded input's Gram) or per-example weight gradients
by the vmapped weight-gradient convolution; every padding mode, string padding, stride, dilation and groups."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import base
from .base import Rule, add_grad, cat, choose, fold, gram_norm2, owned, scale_smaller, weighted_sum

INPUT_GRAM_MAX_P = 512  # padded input positions up to which the conv ghost norm may skip im2col (measured)


def _conv_input(m: nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The input exactly as the convolution sees it, and the zero padding still to apply.
    Non-zero padding modes and string padding are applied here with F.pad, as the module does."""
    n = x.dim() - 2
    if m.padding_mode != "zeros":
        return F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode), (0,) * n
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return x, (0,) * n
        return F.pad(x, m._reversed_padding_repeated_twice), (0,) * n  # 'same': left = total // 2
    return x, tuple(m.padding)


def _unfold(x: torch.Tensor, m: nn.modules.conv._ConvNd, padding: tuple[int, ...]) -> torch.Tensor:
    """im2col for 1-, 2- and 3-D convolutions: (B, C, *S) → (B, C·∏k, T), channel-major like the
    weight's (C_in/G, *k) flattening. Strided views and one copy (im2col was the largest part of ResNet-18's
    norm time in the profile): faster than F.unfold for most of its ghost layers' shapes in a micro-benchmark
    (e.g. 1.75 → 0.84 ms at 32×64×8×8, one core), no end-to-end change measurable above this CPU's noise."""
    k, s, dil = m.kernel_size, m.stride, m.dilation
    n = x.dim() - 2
    if any(padding):
        x = F.pad(x, [p for q in reversed(padding) for p in (q, q)])
    B, C = x.shape[:2]
    for i in range(n):
        x = x.unfold(2 + i, dil[i] * (k[i] - 1) + 1, s[i])[..., :: dil[i]]
    # (B, C, o1..on, k1..kn) → (B, C, k1..kn, o1..on)
    x = x.permute(0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n))
    return x.reshape(B, C * math.prod(k), -1)


def _input_gram_pays(m: nn.modules.conv._ConvNd, xs: list, K: int) -> bool:
    """Whether the ghost norm's activation Gram is cheaper from the padded input than from im2col.
    The im2col Gram costs T²·d_g per example (d_g = C_in/G·∏k), the input Gram P²·C_in/G plus ∏k shifted
    T×T adds (P = padded input positions; all calls and copies together). Stride 1 gives P ≈ T, so about ∏k
    times fewer FLOPs and no im2col buffer; at stride 2, P ≈ 4T and im2col stays cheaper for 3×3 kernels.
    FLOPs are not the whole cost: the ∏k strided adds over (T, T) slices are memory-bound, and measured (one
    core, 3×3, stride 1) the input Gram was ≈ 2× faster up to 16×16 maps (P = 324: 17 vs 36 ms at batch 16,
    128 channels) but 2–4× slower from 32×32 maps on (P = 1156: 327 vs 176 ms at batch 8, 64 channels) — hence
    also the cap on P."""
    S, pad, O = xs[0][0].shape[2:], xs[0][1], xs[0][2].shape[2:]
    P = K * len(xs) * math.prod(s + 2 * q for s, q in zip(S, pad))
    T = K * len(xs) * math.prod(O)
    kk, c = math.prod(m.kernel_size), m.in_channels // m.groups
    return P <= INPUT_GRAM_MAX_P and P * P * c + kk * T * T < T * T * c * kk


def _input_gram_norm2(m: nn.modules.conv._ConvNd, xs: list, B: int, K: int) -> torch.Tensor:
    """Ghost norm of a convolution's weight gradient without im2col; (B,) summed over groups.
    The activation Gram of output positions t, t' is a sum over kernel offsets δ of input Grams:
    a_t·a_t' = Σ_δ Σ_c x_p[c, s·t + dil·δ] x_p[c, s·t' + dil·δ] (x_p the zero-padded input), so one
    (P, P) Gram of the padded input per example and group, then ∏k strided (T, T) slices of it, summed.
    Calls and copies are positions too: (B, G, C/G, L·∏S) with L = K·calls; output gradients likewise."""
    G, n = m.groups, len(m.kernel_size)
    k, s, dil = m.kernel_size, m.stride, m.dilation
    pad = xs[0][1]
    L = K * len(xs)
    xp = torch.stack([F.pad(x, [q for v in reversed(pad) for q in (v, v)]) if any(pad) else x for x, _, _ in xs], 1)
    Sp = xp.shape[3:]
    xp = xp.reshape(B, L, G, -1, math.prod(Sp)).permute(0, 2, 3, 1, 4).reshape(B * G, -1, L * math.prod(Sp))
    g = torch.stack([g for _, _, g in xs], 1)
    O = g.shape[3:]
    T = L * math.prod(O)
    g = g.reshape(B, L, G, -1, math.prod(O)).permute(0, 2, 3, 1, 4).reshape(B * G, -1, T)
    P = xp.shape[-1]
    offsets = torch.cartesian_prod(*[torch.arange(v) for v in k]).reshape(-1, n).tolist()
    step = max(1, base.GRAM_BUDGET // (P * P))
    out = []
    for a in range(0, B * G, step):
        gx = torch.bmm(xp[a : a + step].transpose(1, 2), xp[a : a + step]).view(-1, L, *Sp, L, *Sp)
        aa = 0
        for off in offsets:  # the (L, *O) positions that kernel offset `off` reads, on both sides
            idx = tuple(slice(dil[i] * off[i], dil[i] * off[i] + s[i] * (O[i] - 1) + 1, s[i]) for i in range(n))
            aa = aa + gx[(slice(None), slice(None), *idx, slice(None), *idx)]
        del gx
        gg = torch.bmm(g[a : a + step].transpose(1, 2), g[a : a + step])
        out.append((aa.reshape(-1, T, T) * gg).sum((1, 2)))
    return torch.cat(out).view(B, G).sum(1)


def _rows_to_t(t: torch.Tensor, B: int, G: int, k: int) -> torch.Tensor:
    """(B·K, G·k, T) → (B, G, k, K·T): an example's K copies become more positions."""
    BK, _, T = t.shape
    t = t.reshape(B, BK // B, G, k, T)
    return t.reshape(B, G, k, T) if BK == B else t.permute(0, 2, 3, 1, 4).reshape(B, G, k, -1)


def _weight_grad(m, x: torch.Tensor, pad: tuple[int, ...], g: torch.Tensor) -> torch.Tensor:
    """Σ over the rows of x (N, C_in, *S) and g (N, C_out, *O) of the weight gradient: the weight-gradient
    convolution itself (handles groups, stride and dilation natively; no im2col)."""
    return torch.ops.aten.convolution_backward(
        g, x, m.weight, None, m.stride, pad, m.dilation, False, [0] * len(pad), m.groups, [False, True, False])[1]


def _per_example_conv_weight(m, x: torch.Tensor, pad: tuple[int, ...], g: torch.Tensor) -> torch.Tensor:
    """(B, C_out, C_in/G, *k): example i's weight gradient, by the weight-gradient convolution vmapped over i."""

    def one(xi, gi):
        return _weight_grad(m, xi.unsqueeze(0), pad, gi.unsqueeze(0))

    return torch.vmap(one)(x, g)


def _per_example_weights(m, xs: list, B: int, n2: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """Per-example weight gradients (B, C_out, C_in/G, *k), summed over the calls, by the weight-gradient
    convolution vmapped over the batch (about the cost of one ordinary weight gradient, no im2col buffer); adds
    their squared norms to n2 in place. Chunked over examples to bound the convolution's workspace."""
    pw = n2.new_empty(B, *m.weight.shape) if keep else None
    work = sum(x[0].numel() * (x.shape[0] // B) for x, _, _ in xs) * math.prod(m.kernel_size) + m.weight.numel()
    step = max(1, base.PER_EXAMPLE_BUDGET // work)  # examples per chunk
    for lo in range(0, B, step):
        chunk = 0
        for x, pad, g in xs:
            K = x.shape[0] // B  # this call's rows per example
            rows = slice(lo * K, (lo + step) * K)
            part = _per_example_conv_weight(m, x[rows], pad, g[rows])
            chunk = chunk + fold(part, part.shape[0] // K)
        n2[lo : lo + step] += chunk.reshape(chunk.shape[0], -1).pow(2).sum(1)
        if keep:
            pw[lo : lo + step] = chunk
    return pw


class ConvRule(Rule):
    """nn.Conv1d/2d/3d with stride, dilation, groups (grouped and depthwise), every padding_mode and
    string padding. Groups make the weight gradient block diagonal: norm = Σ over groups."""

    name = "conv"

    def norms(self, entry, recs, mode, keep=True):
        m = entry.module
        G, B = m.groups, recs[0].batch
        # (input as the convolution sees it, its zero padding, output gradient) per call; rows = K·B, each example's
        # K consecutive, and K may differ between calls (a multi-view forward): every step below reads K per call
        xs = [(*_conv_input(m, r.args[0]), r.grads[0]) for r in recs if r.grads[0] is not None]
        state: dict[str, Any] = {"xs": xs}
        n2 = recs[0].args[0].new_zeros(B)
        if not xs:
            return n2, state
        T = sum(g.shape[0] // B * g[0, 0].numel() for _, _, g in xs)  # output positions, all calls and copies
        p_g, d_g = m.out_channels // G, m.weight[0].numel()
        if owned(entry, "weight") is not None:
            entry.choice = choose(mode, T, p_g, d_g)
            one_shape = len({(x.shape, pad) for x, pad, _ in xs}) == 1  # calls stack as more positions
            if entry.choice == "ghost" and one_shape and _input_gram_pays(m, xs, xs[0][0].shape[0] // B):
                n2 = n2 + _input_gram_norm2(m, xs, B, xs[0][0].shape[0] // B)
            elif entry.choice == "ghost":
                # im2col: (B, G, d_g, T) against the output gradients (B, G, p_g, T), Gram over T per group
                u = cat([_rows_to_t(_unfold(x, m, pad), B, G, d_g) for x, pad, _ in xs], -1)
                g = cat([_rows_to_t(g.reshape(g.shape[0], m.out_channels, -1), B, G, p_g) for _, _, g in xs], -1)
                ut = u.reshape(B * G, d_g, T).transpose(1, 2)
                gt = g.reshape(B * G, p_g, T).transpose(1, 2)
                n2 = n2 + gram_norm2(ut, gt).view(B, G).sum(1)
                del u, ut
            else:
                pw = _per_example_weights(m, xs, B, n2, keep)
                if keep:
                    state["pw"] = pw
        if owned(entry, "bias") is not None:
            gb = sum(fold(g.reshape(g.shape[0], m.out_channels, -1).sum(-1), B) for _, _, g in xs)  # (B, C_out)
            n2 = n2 + gb.pow(2).sum(1)
            state["gb"] = gb
        if "pw" in state or owned(entry, "weight") is None:
            del state["xs"]  # inputs and output gradients are no longer needed: free them with the record
        return n2, state

    def accumulate_plain(self, entry, recs):
        m = entry.module
        w, b = owned(entry, "weight"), owned(entry, "bias")
        for r in recs:
            if r.grads[0] is None:
                continue
            x, pad = _conv_input(m, r.args[0])
            g = r.grads[0]
            if w is not None:
                add_grad(w, _weight_grad(m, x, pad, g))
            if b is not None:
                add_grad(b, g.sum([0, *range(2, g.dim())]))

    def accumulate(self, entry, recs, c, state):
        m = entry.module
        w, b = owned(entry, "weight"), owned(entry, "bias")
        if w is not None and "pw" in state:
            add_grad(w, weighted_sum(state["pw"], c))
        elif w is not None and state.get("xs"):
            # the weight-gradient convolution on c-scaled inputs or output gradients: no second unfold
            for x, pad, g in state["xs"]:
                x, g = scale_smaller(x, g, c.repeat_interleave(x.shape[0] // c.shape[0]))  # each copy: its c_i
                add_grad(w, _weight_grad(m, x, pad, g))
        if b is not None and "gb" in state:
            add_grad(b, c.to(state["gb"].dtype) @ state["gb"])

