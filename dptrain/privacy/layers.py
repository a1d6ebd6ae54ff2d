"""Per-layer rules: the per-example gradient norm (ghost or instantiated) and the clipped gradient.

Notation (Bu, Mao & Xu 2022): a layer sees activations a_i ∈ R^{T×d} and output gradients
g_i ∈ R^{T×p} for example i; its per-example weight gradient is g_iᵀ a_i. The ghost norm is
‖g_iᵀa_i‖² = ⟨a_i a_iᵀ, g_i g_iᵀ⟩ (two T×T Gram matrices); instantiation builds g_iᵀ a_i (p×d).
A module called several times in one forward contributes Σ_calls g_cᵀ a_c, which is the same as
concatenating the calls along T, so reuse is exact. Augmentation multiplicity is the same idea: with K
consecutive rows per example (its augmented copies), example i's gradient is the sum over its rows,
so rows are folded into T (or summed, for instantiated per-row gradients).

Each rule gets the module's records (one per call: the inputs and the gradients of the outputs) and
returns the squared per-example norm of the parameters it owns, then builds Σ_i c_i·g_i[p] into .grad.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Bound on the B·T² elements a ghost Gram matrix may hold at once (chunked over the batch).
GRAM_BUDGET = 2**25
# Bound on the elements of per-example work at once when instantiating (the vmapped weight-gradient convolution's
# im2col workspace, or per-example gradients that are not kept): chunked over the batch. Measured (CNN, batch
# 512): unchunked, one 64-channel 16×16 layer's instantiation took 216 MB above the step's other memory.
PER_EXAMPLE_BUDGET = 2**22
INPUT_GRAM_MAX_P = 512  # padded input positions up to which the conv ghost norm may skip im2col (measured)


class Record:
    """One call of a hooked module: detached inputs and, after backward, output gradients."""

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


def _add_grad(p: nn.Parameter, g: torch.Tensor) -> None:
    g = g.to(p.dtype).view_as(p)
    if p.grad is None:
        p.grad = g.clone() if g.data_ptr() == p.data_ptr() else g
    else:
        p.grad.add_(g)


def _fold(t: torch.Tensor, B: int) -> torch.Tensor:
    """(B·K, ...) per-row quantities → (B, ...) per-example sums (K = 1: unchanged)."""
    return t if t.shape[0] == B else t.reshape(B, -1, *t.shape[1:]).sum(1)


def _cat(ts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


def _gram_norm2(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ_{t,s} (a_t·a_s)(g_t·g_s) per leading batch index; a: (N, T, d), g: (N, T, p) → (N,).
    Chunked so that at most GRAM_BUDGET Gram entries live at once."""
    N, T = a.shape[0], a.shape[1]
    if T == 1:
        return a.pow(2).sum((1, 2)) * g.pow(2).sum((1, 2))
    step = max(1, GRAM_BUDGET // (T * T))
    out = []
    for s in range(0, N, step):
        aa = torch.bmm(a[s : s + step], a[s : s + step].transpose(1, 2))  # (n, T, T)
        gg = torch.bmm(g[s : s + step], g[s : s + step].transpose(1, 2))
        out.append((aa * gg).sum((1, 2)))
    return torch.cat(out) if out else a.new_zeros(0)


class Rule:
    kind = "rule"

    def check(self, module: nn.Module, name: str) -> None:
        """Raise CoverageError for a variant this rule does not compute exactly."""

    def norms(self, entry, recs: list[Record], mode: str, keep: bool = True) -> tuple[torch.Tensor, Any]:
        """(B,) squared norms and the state `accumulate` needs; keep=False: the caller discards the state
        (the engine's norm pass), so a rule may skip building it (no B·p·d per-example gradients held)."""
        raise NotImplementedError

    def accumulate(self, entry, recs: list[Record], c: torch.Tensor, state: Any) -> None:
        raise NotImplementedError

    def accumulate_plain(self, entry, recs: list[Record]) -> None:
        """Σ over rows of each row's gradient into .grad: the engine's second pass, whose output gradients
        already carry the clip factors. Default: the per-example route with c = 1 (cheap for small rules)."""
        choice = entry.choice
        state = self.norms(entry, recs, "per_sample")[1]
        entry.choice = choice  # describe() reports the first pass's decision
        self.accumulate(entry, recs, torch.ones(recs[0].batch, device=entry.params[0][1].device), state)


def _owned(entry, name: str) -> nn.Parameter | None:
    for n, p in entry.params:
        if n == name:
            return p
    return None


class LinearRule(Rule):
    """nn.Linear on (B, d), (B, T, d) or (B, ..., d) inputs; T = product of the middle dims."""

    kind = "linear"

    def _flat(self, m: nn.Linear, recs: list[Record]) -> tuple[torch.Tensor, torch.Tensor]:
        a = [r.args[0].reshape(r.batch, -1, m.in_features) for r in recs]
        # an output that did not reach the loss has zero gradient
        g = [x.new_zeros(*x.shape[:2], m.out_features) if r.grads[0] is None
             else r.grads[0].reshape(x.shape[0], -1, m.out_features) for r, x in zip(recs, a)]
        return _cat(a, 1), _cat(g, 1)  # reuse: concatenate calls along T

    def norms(self, entry, recs, mode, keep=True):
        from .plan import choose

        m = entry.module
        a, g = self._flat(m, recs)
        B, T = a.shape[0], a.shape[1]
        n2 = a.new_zeros(B)
        state: dict[str, torch.Tensor] = {"a": a, "g": g}
        if _owned(entry, "weight") is not None:
            entry.choice = choose(mode, T, m.out_features, m.in_features)
            if entry.choice == "ghost" or T == 1:
                n2 = n2 + _gram_norm2(a, g)
            else:
                pw = a.new_empty(B, m.out_features, m.in_features) if keep else None  # (B, p, d)
                step = max(1, PER_EXAMPLE_BUDGET // (m.out_features * m.in_features))
                for lo in range(0, B, step):
                    chunk = torch.einsum("btp,btd->bpd", g[lo : lo + step], a[lo : lo + step])
                    n2[lo : lo + step] += chunk.pow(2).sum((1, 2))
                    if keep:
                        pw[lo : lo + step] = chunk
                if keep:
                    state = {"pw": pw}  # a and g are no longer needed: free them with the record
        if _owned(entry, "bias") is not None:
            gb = g.sum(1)  # (B, p)
            n2 = n2 + gb.pow(2).sum(1)
            state["gb"] = gb
        return n2, state

    def accumulate_plain(self, entry, recs):
        a, g = self._flat(entry.module, recs)
        w, b = _owned(entry, "weight"), _owned(entry, "bias")
        if w is not None:
            _add_grad(w, g.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1]))
        if b is not None:
            _add_grad(b, g.sum((0, 1)))

    def accumulate(self, entry, recs, c, state):
        w, b = _owned(entry, "weight"), _owned(entry, "bias")
        if w is not None:
            if "pw" in state:
                _add_grad(w, torch.einsum("bpd,b->pd", state["pw"], c))
            else:
                a, g = _scale_smaller(state["a"], state["g"], c)
                _add_grad(w, g.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1]))
        if b is not None:
            _add_grad(b, c.to(state["gb"].dtype) @ state["gb"])


def _scale_smaller(a: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_i c_i·g_iᵀa_i is bilinear in (a_i, g_i): scale row i of whichever of the two is smaller by c_i
    (a copy of one tensor, e.g. a ViT qkv layer's (B, T, 192) input instead of its (B, T, 576) output gradient)."""
    if a.numel() <= g.numel():
        return a * c.view(-1, *([1] * (a.dim() - 1))).to(a.dtype), g
    return a, g * c.view(-1, *([1] * (g.dim() - 1))).to(g.dtype)


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
    step = max(1, GRAM_BUDGET // (P * P))
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


def _per_example_conv_weight(m, x: torch.Tensor, pad: tuple[int, ...], g: torch.Tensor) -> torch.Tensor:
    """(B, C_out, C_in/G, *k): example i's weight gradient, by convolution_backward vmapped over i."""
    n = len(pad)

    def one(xi, gi):
        return torch.ops.aten.convolution_backward(
            gi.unsqueeze(0), xi.unsqueeze(0), m.weight, None, m.stride, pad, m.dilation, False, [0] * n, m.groups,
            [False, True, False])[1]

    return torch.vmap(one)(x, g)


class ConvRule(Rule):
    """nn.Conv1d/2d/3d with stride, dilation, groups (grouped and depthwise), every padding_mode and
    string padding. Groups make the weight gradient block diagonal: norm = Σ over groups."""

    kind = "conv"

    def norms(self, entry, recs, mode, keep=True):
        from .plan import choose

        m = entry.module
        G, B = m.groups, recs[0].batch
        xs = [(*_conv_input(m, r.args[0]), r.grads[0]) for r in recs if r.grads[0] is not None]
        state: dict[str, Any] = {"xs": xs}
        n2 = recs[0].args[0].new_zeros(B)
        if not xs:
            return n2, state
        K = recs[0].rows // B  # rows per example (augmentation multiplicity)
        T = K * sum(g[0, 0].numel() for _, _, g in xs)  # output positions, all calls and copies together
        p_g, d_g = m.out_channels // G, m.weight[0].numel()
        if _owned(entry, "weight") is not None:
            entry.choice = choose(mode, T, p_g, d_g)
            one_shape = len({(x.shape[2:], pad) for x, pad, _ in xs}) == 1  # calls stack as more positions
            if entry.choice == "ghost" and one_shape and _input_gram_pays(m, xs, K):
                n2 = n2 + _input_gram_norm2(m, xs, B, K)
            elif entry.choice == "ghost":
                # im2col: (B, G, d_g, T) against the output gradients (B, G, p_g, T), Gram over T per group
                u = _cat([_rows_to_t(_unfold(x, m, pad), B, G, d_g) for x, pad, _ in xs], -1)
                g = _cat([_rows_to_t(g.reshape(g.shape[0], m.out_channels, -1), B, G, p_g) for _, _, g in xs], -1)
                ut = u.reshape(B * G, d_g, T).transpose(1, 2)
                gt = g.reshape(B * G, p_g, T).transpose(1, 2)
                n2 = n2 + _gram_norm2(ut, gt).view(B, G).sum(1)
                del u, ut
            else:
                # per-example weight gradients by the weight-gradient convolution vmapped over the batch:
                # about the cost of one ordinary weight gradient, and no im2col buffer
                pw = n2.new_empty(B, *m.weight.shape) if keep else None  # (B, *w.shape)
                work = K * sum(x[0].numel() for x, _, _ in xs) * math.prod(m.kernel_size) + m.weight.numel()
                step = max(1, PER_EXAMPLE_BUDGET // work)  # examples per chunk: bounds the im2col workspace
                for lo in range(0, B, step):
                    rows = slice(lo * K, (lo + step) * K)
                    chunk = sum(_per_example_conv_weight(m, x[rows], pad, g[rows]) for x, pad, g in xs)
                    chunk = _fold(chunk, chunk.shape[0] // K)
                    n2[lo : lo + step] += chunk.reshape(chunk.shape[0], -1).pow(2).sum(1)
                    if keep:
                        pw[lo : lo + step] = chunk
                if keep:
                    state["pw"] = pw
        if _owned(entry, "bias") is not None:
            gb = _fold(sum(g.reshape(g.shape[0], m.out_channels, -1).sum(-1) for _, _, g in xs), B)  # (B, C_out)
            n2 = n2 + gb.pow(2).sum(1)
            state["gb"] = gb
        if "pw" in state or _owned(entry, "weight") is None:
            del state["xs"]  # inputs and output gradients are no longer needed: free them with the record
        return n2, state

    def accumulate_plain(self, entry, recs):
        m = entry.module
        w, b = _owned(entry, "weight"), _owned(entry, "bias")
        for r in recs:
            if r.grads[0] is None:
                continue
            x, pad = _conv_input(m, r.args[0])
            g = r.grads[0]
            if w is not None:
                _add_grad(w, torch.ops.aten.convolution_backward(
                    g, x, m.weight, None, m.stride, pad, m.dilation, False, [0] * len(pad), m.groups,
                    [False, True, False])[1])
            if b is not None:
                _add_grad(b, g.sum([0, *range(2, g.dim())]))

    def accumulate(self, entry, recs, c, state):
        m = entry.module
        w, b = _owned(entry, "weight"), _owned(entry, "bias")
        if w is not None and "pw" in state:
            _add_grad(w, torch.einsum("b...,b->...", state["pw"], c.to(state["pw"].dtype)))
        elif w is not None and state.get("xs"):
            # the weight-gradient convolution on c-scaled inputs or output gradients: no second unfold
            c_rows = c.repeat_interleave(recs[0].rows // recs[0].batch)  # every copy gets its example's c
            for x, pad, g in state["xs"]:
                x, g = _scale_smaller(x, g, c_rows)
                gw = torch.ops.aten.convolution_backward(
                    g, x, m.weight, None, m.stride, pad, m.dilation, False,
                    [0] * len(pad), m.groups, [False, True, False])[1]
                _add_grad(w, gw)
        if b is not None and "gb" in state:
            _add_grad(b, c.to(state["gb"].dtype) @ state["gb"])


class _AffineNormRule(Rule):
    """Normalisations with an elementwise affine (LayerNorm, GroupNorm): the per-example gradients
    are small (B × channels), so they are always instantiated: Σ_positions g ⊙ x̂ and Σ_positions g."""

    kind = "norm"

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
            w_i, b_i = _fold((g * xh).sum(1), r.batch), _fold(g.sum(1), r.batch)
            pw = w_i if pw is None else pw + w_i
            pb = b_i if pb is None else pb + b_i
        B = recs[0].batch
        n2 = recs[0].args[0].new_zeros(B)
        state = {}
        if pw is not None:
            if _owned(entry, "weight") is not None:
                state["weight"] = pw.reshape(B, -1)
            if _owned(entry, "bias") is not None:
                state["bias"] = pb.reshape(B, -1)
            for v in state.values():
                n2 = n2 + v.pow(2).sum(1)
        return n2, state

    def accumulate(self, entry, recs, c, state):
        for name, v in state.items():
            _add_grad(_owned(entry, name), c.to(v.dtype) @ v)


class LayerNormRule(_AffineNormRule):
    def __init__(self, channels_first: bool = False):
        self.channels_first = channels_first  # timm LayerNorm2d: (B, C, H, W) normalised over C

    def normalized(self, m, x, g):
        if self.channels_first:
            x, g = x.movedim(1, -1), g.movedim(1, -1)
        xh = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        shape = (x.shape[0], -1, *m.normalized_shape)  # (B, N, *normalized_shape)
        return xh.reshape(shape), g.reshape(shape)


class GroupNormRule(_AffineNormRule):
    def normalized(self, m, x, g):
        xh = F.group_norm(x, m.num_groups, None, None, m.eps)
        B, C = x.shape[:2]
        # (B, C, *S) → (B, S, C)
        return xh.reshape(B, C, -1).transpose(1, 2), g.reshape(B, C, -1).transpose(1, 2)


class EmbeddingRule(Rule):
    """nn.Embedding: ghost norm Σ_{t,s} [id_t = id_s]·(g_t·g_s); rows at padding_idx get no gradient."""

    kind = "embedding"

    def check(self, module, name):
        from .plan import CoverageError

        if module.sparse:
            raise CoverageError(f"embedding '{name}' uses sparse gradients; set sparse=False")

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
        w = _owned(entry, "weight")
        g = state["g"] * c.view(-1, 1, 1).to(state["g"].dtype)
        gw = torch.zeros_like(w).index_add_(0, state["idx"].reshape(-1), g.reshape(-1, g.shape[-1]))
        _add_grad(w, gw)


class FallbackRule(Rule):
    """Any module with parameters and no rule: per-example gradients of every parameter of its subtree
    by torch.func — vmap over the batch of the vjp of the module's own forward, replayed on the stored
    inputs with the stored output gradients. Exact for any deterministic module; slower."""

    kind = "fallback"

    def norms(self, entry, recs, mode, keep=True):
        from .engine import _replaying

        entry.choice = "fallback"
        m = entry.module
        names = [n for n, _ in entry.params]
        params = tuple(p.detach() for _, p in entry.params)
        B = recs[0].batch
        total = None
        for r in recs:
            if all(g is None for g in r.grads):
                continue
            per = tuple(_fold(t, B) for t in self._per_example(m, names, params, r, r.rows, _replaying))
            total = per if total is None else tuple(t + q for t, q in zip(total, per))
        n2 = params[0].new_zeros(B)
        if total is None:
            return n2, None
        for t in total:
            n2 = n2 + t.reshape(B, -1).pow(2).sum(1).to(n2.dtype)
        return n2, total

    @staticmethod
    def _per_example(m, names, params, r: Record, B: int, replaying) -> tuple[torch.Tensor, ...]:
        from torch.func import functional_call, vjp, vmap
        from torch.utils._pytree import tree_flatten

        flat_args, spec = tree_flatten((r.args, r.kwargs))
        dims = tuple(0 if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == B else None for a in flat_args)
        grads = tuple(g for g in r.grads)
        gmask = [g is not None for g in grads]
        present = tuple(g for g in grads if g is not None)

        def one(flat_i, grads_i):
            from torch.utils._pytree import tree_unflatten

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
            _add_grad(p, torch.einsum("b...,b->...", t, c.to(t.dtype)))


FALLBACK = FallbackRule()


class ScaleRule(Rule):
    """timm LayerScale (x · γ over the last dim) and LayerScale2d (over channels): γ_i = Σ g ⊙ x."""

    kind = "scale"

    def __init__(self, channel_dim: int):
        self.channel_dim = channel_dim

    def check(self, module, name):
        from .plan import CoverageError

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
            _add_grad(entry.params[0][1], c.to(state.dtype) @ state)


class TokenRule(Rule):
    """Parameters a vision transformer adds to its token sequence (cls/reg/dist tokens, absolute
    position embeddings), each of shape (1, N, d) and used only through broadcasting over the batch.
    The engine hands the forward an expanded (B, N, d) copy whose gradient is exactly the per-example
    gradient; the module's other code runs unchanged. Only for known classes (TOKEN_CLASSES)."""

    kind = "token"
    NAMES = ("cls_token", "reg_token", "dist_token", "pos_embed")

    def norms(self, entry, recs, mode, keep=True):
        entry.choice = "instantiate"
        B = recs[0].batch
        per = [None] * len(entry.params)
        for r in recs:
            for k, g in enumerate(r.grads):
                if g is not None:
                    g = _fold(g, B)
                    per[k] = g if per[k] is None else per[k] + g
        n2 = entry.params[0][1].new_zeros(B)  # in the parameters' dtype (float64 stays float64)
        for t in per:
            if t is not None:
                n2 = n2 + t.reshape(B, -1).pow(2).sum(1).to(n2.dtype)
        return n2, per

    def accumulate(self, entry, recs, c, state):
        for (_, p), t in zip(entry.params, state):
            if t is not None:
                _add_grad(p, torch.einsum("b...,b->...", t, c.to(t.dtype)).unsqueeze(0))


TOKEN = TokenRule()


def token_rule_applies(module: nn.Module, own: list) -> bool:
    try:
        from timm.models.beit import Beit
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover
        return False
    return (type(module) in (VisionTransformer, Beit) and not getattr(module, "dynamic_img_size", False)
            and all(n in TokenRule.NAMES and p.dim() == 3 and p.shape[0] == 1 for n, p in own))


def _timm_rules() -> dict[type, Rule]:
    try:
        from timm.layers import LayerNorm as TimmLN
        from timm.layers import LayerNorm2d as TimmLN2d
        from timm.layers import LayerScale, LayerScale2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return {}
    return {TimmLN: LayerNormRule(), TimmLN2d: LayerNormRule(channels_first=True), LayerScale: ScaleRule(-1),
            LayerScale2d: ScaleRule(1)}


# Exact type → rule. Subclasses that override forward are not assumed to compute the same thing:
# they go to the fallback (exact) unless listed here.
RULES: dict[type, Rule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Conv3d: ConvRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.GroupNorm: GroupNormRule(),
    nn.Embedding: EmbeddingRule(),
    **_timm_rules(),
}


def rule_for(module: nn.Module) -> Rule | None:
    rule = RULES.get(type(module))
    if rule is not None:
        return rule
    # subclasses that keep the parent's forward compute the same function (e.g. timm's Linear wrappers)
    for base, r in RULES.items():
        if isinstance(module, base) and type(module).forward is base.forward:
            return r
    return None
