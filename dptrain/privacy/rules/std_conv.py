"""timm's weight-standardised convolutions (StdConv2d, ScaledStdConv2d and their static-padding Same variants: BiT
ResNet-V2, NFNets, hybrid ViTs): the layer convolves with ŵ = f(w, gain), the weight standardised per output channel
(Qiao et al. 2019; Brock et al. 2021 with a gain). f depends on the parameters alone, so example i's gradient of the
raw parameters is the chain rule J_fᵀ ĝ_i, where ĝ_i is the conv rule's per-example gradient w.r.t. ŵ: one vjp of f,
vmapped over the examples. Jᵀ is not an isometry, so the ghost norm of ĝ_i says nothing about ‖J_fᵀ ĝ_i‖: the ĝ_i
are instantiated (chunked over examples). The clipped sum is linear: Jᵀ(Σ c_i ĝ_i), one weight-gradient convolution
of c-scaled inputs and one vjp."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CoverageError
from . import base
from .base import add_grad, fold, owned, scale_smaller
from .conv import ConvRule, _conv_input, _per_example_weights, _weight_grad

_RAW = ("weight", "gain")  # the parameters f reads


def standardised(m: nn.Module, weight: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    """timm's f: F.batch_norm over each output channel's weights (training statistics, no running ones), times
    gain·scale for the scaled variant."""
    scale = None if gain is None else (gain * m.scale).view(-1)
    return F.batch_norm(weight.reshape(1, m.out_channels, -1), None, None, weight=scale, training=True, momentum=0.0,
                        eps=m.eps).reshape_as(weight)


class StdConvRule(ConvRule):
    name = "std_conv"

    def serves(self, m: nn.Module) -> bool:
        """Padding the conv rule reproduces: zeros, static (a dynamic TF 'SAME' pad goes to the exact fallback)."""
        return m.padding_mode == "zeros" and not getattr(m, "same_pad", False)

    def check(self, module, name):
        """This timm version's forward must be conv(x, f(w, gain)): compared once, at attach, on a small input."""
        w = module.weight
        if w.device.type == "meta":
            return
        k = [d * (s - 1) + 1 + st for s, d, st in zip(module.kernel_size, module.dilation, module.stride)]
        x = torch.randn(1, module.in_channels, *k, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            want = module(x)
            got = F.conv2d(x, standardised(module, w, getattr(module, "gain", None)), module.bias, module.stride,
                           module.padding, module.dilation, module.groups)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max())):
            raise CoverageError(f"'{name}' ({type(module).__name__}): this timm version's forward differs from "
                                "dptrain's rule for it; pass fallback=['<that module>'] (slow, exact) or report it")

    @staticmethod
    def _pull(entry):
        """(names of the owned raw parameters, vjp of f at their values: ĝ → their gradients), or ([], None)."""
        m = entry.module
        names = [n for n in _RAW if owned(entry, n) is not None]
        if not names:
            return [], None
        fixed = {"weight": m.weight.detach(), "gain": getattr(m, "gain", None)}
        fixed["gain"] = None if fixed["gain"] is None else fixed["gain"].detach()

        def f(*ps):
            return standardised(m, **{**fixed, **dict(zip(names, ps))})

        return names, torch.func.vjp(f, *(fixed[n] for n in names))[1]

    def norms(self, entry, recs, mode, keep=True):
        names, pull = self._pull(entry)
        if pull is None:  # only the bias trains: the plain conv's bias rule
            return super().norms(entry, recs, mode, keep)
        m, B = entry.module, recs[0].batch
        entry.choice = "instantiate"
        xs = [(*_conv_input(m, r.args[0]), r.grads[0]) for r in recs if r.grads[0] is not None]
        n2 = recs[0].args[0].new_zeros(B)
        if not xs:
            return n2, {"xs": xs, "pull": pull}
        step = max(1, base.PER_EXAMPLE_BUDGET // max(1, 2 * m.weight.numel()))  # ĝ and Jᵀĝ per example, chunked
        for lo in range(0, B, step):
            n = min(step, B - lo)
            part = [(x[lo * (x.shape[0] // B):(lo + n) * (x.shape[0] // B)], pad,
                     g[lo * (g.shape[0] // B):(lo + n) * (g.shape[0] // B)]) for x, pad, g in xs]
            g_hat = _per_example_weights(m, part, n, n2.new_zeros(n), keep=True)  # (n, *w.shape) w.r.t. ŵ
            for t in torch.vmap(pull)(g_hat):  # (n, *p.shape) w.r.t. each raw parameter
                n2[lo:lo + n] += t.reshape(n, -1).pow(2).sum(1)
        state = {"xs": xs, "pull": pull}
        if owned(entry, "bias") is not None:
            gb = sum(fold(g.reshape(g.shape[0], m.out_channels, -1).sum(-1), B) for _, _, g in xs)  # (B, C_out)
            n2 = n2 + gb.pow(2).sum(1)
            state["gb"] = gb
        return n2, state if keep else None

    def _add_raw(self, entry, pull, g_hat: torch.Tensor) -> None:
        names = [n for n in _RAW if owned(entry, n) is not None]
        for n, t in zip(names, pull(g_hat)):
            add_grad(owned(entry, n), t)

    def accumulate(self, entry, recs, c, state):
        if state is None or "pull" not in state:
            return super().accumulate(entry, recs, c, state or {})
        m = entry.module
        if state["xs"]:
            s = 0
            for x, pad, g in state["xs"]:  # Σ_i c_i ĝ_i by the weight-gradient convolution of c-scaled rows
                x, g = scale_smaller(x, g, c.repeat_interleave(x.shape[0] // c.shape[0]))
                s = s + _weight_grad(m, x, pad, g)
            self._add_raw(entry, state["pull"], s)
        if "gb" in state:
            add_grad(owned(entry, "bias"), c.to(state["gb"].dtype) @ state["gb"])

    def accumulate_plain(self, entry, recs):
        names, pull = self._pull(entry)
        m, b = entry.module, owned(entry, "bias")
        s = 0
        for r in recs:
            if r.grads[0] is None:
                continue
            x, pad = _conv_input(m, r.args[0])
            if pull is not None:
                s = s + _weight_grad(m, x, pad, r.grads[0])
            if b is not None:
                add_grad(b, r.grads[0].sum([0, *range(2, r.grads[0].dim())]))
        if pull is not None and torch.is_tensor(s):
            self._add_raw(entry, pull, s)
