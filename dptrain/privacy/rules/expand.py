"""Expanding rules: parameters a module applies itself, by broadcasting over the batch. Inside the forward the
engine hands the module a per-example stand-in of each owned parameter — a (B, ...) tensor whose rows are
copies of it — so autograd delivers the gradient of row i, which is example i's gradient of the parameter.
The module's other code runs unchanged and its children keep their own rules.

Only for known classes whose use of the parameter is known to broadcast that way (a generic expansion could
broadcast a (B, d) stand-in against a (T, d) tensor when T == B, silently).
"""

from __future__ import annotations

import torch
from timm.models.beit import Beit
from timm.models.cait import Cait
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import CoverageError
from .base import Rule, add_grad, fold, weighted_sum


class ExpandRule(Rule):
    """Base of the expanding rules: `taps` builds the stand-ins, `run` calls the forward with them, and
    `per_example` turns tap k's gradient (B, ...) into [(index of the owned parameter, (B, *p.shape))]."""

    expands = True

    def taps(self, module: nn.Module, params: list[tuple[str, nn.Parameter]], rows: int) -> list[torch.Tensor]:
        raise NotImplementedError

    def run(self, module: nn.Module, forward, params, taps: list[torch.Tensor], args, kwargs):
        """Default: the module's own forward with each owned parameter replaced by its tap."""
        for (name, _), t in zip(params, taps):
            module._parameters[name] = t
        try:
            return forward(*args, **kwargs)
        finally:
            for name, p in params:
                module._parameters[name] = p

    def per_example(self, entry, k: int, g: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        return [(k, g)]

    @torch.no_grad()
    def verify(self, module: nn.Module, name: str, x: torch.Tensor) -> None:
        """A rule whose `run` re-implements a timm forward must compute timm's function: compared once, at attach,
        on a random input (eval mode), so a timm release that changes the module fails closed."""
        params = [(n, p) for n, p in module.named_parameters(recurse=False)]
        if not params or params[0][1].device.type == "meta":
            return
        was = module.training
        module.eval()
        try:
            want = module(x)
            got = self.run(module, module.forward, params, self.taps(module, params, x.shape[0]), (x,), {})
        finally:
            module.train(was)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-7):
            raise CoverageError(f"'{name}' ({type(module).__name__}): this timm version's forward differs from "
                                "dptrain's rule for it; pass fallback=['<that module>'] (slow, exact) or report it")

    def norms(self, entry, recs, mode, keep=True):
        entry.choice = "instantiate"
        B = recs[0].batch
        per: list[torch.Tensor | None] = [None] * len(entry.params)
        for r in recs:
            for k, g in enumerate(r.grads):
                if g is None:
                    continue
                for j, t in self.per_example(entry, k, fold(g, B)):
                    per[j] = t if per[j] is None else per[j] + t
        n2 = entry.params[0][1].new_zeros(B)  # in the parameters' dtype (float64 stays float64)
        for t in per:
            if t is not None:
                n2 = n2 + t.reshape(B, -1).pow(2).sum(1).to(n2.dtype)
        return n2, per

    def accumulate(self, entry, recs, c, state):
        for (_, p), t in zip(entry.params, state):
            if t is not None:
                add_grad(p, weighted_sum(t, c))


class TokenRule(ExpandRule):
    """Parameters a vision transformer adds to its token sequence (cls/reg/dist tokens, absolute position
    embeddings), each (1, N, d) and used only through broadcasting over the batch: stand-in (B, N, d)."""

    name = "token"
    NAMES = ("cls_token", "reg_token", "dist_token", "pos_embed")

    @staticmethod
    def applies(module: nn.Module, own: list) -> bool:
        kinds = (VisionTransformer, VisionTransformerDistilled, Beit, Cait, Eva)
        return (type(module) in kinds and not getattr(module, "dynamic_img_size", False)
                and all(n in TokenRule.NAMES and p.dim() == 3 and p.shape[0] == 1 for n, p in own))

    def taps(self, module, params, rows):
        return [p.detach().expand(rows, *p.shape[1:]) for _, p in params]  # (B, N, d)


class GammaRule(ExpandRule):
    """A block's own layer scale: `x + drop_path(γ * branch(x))` with γ (d,) and branch(x) (B, N, d), as in
    timm's BEiT and CaiT blocks. Stand-in (B, 1, d): example i's gradient is Σ_t g_it ⊙ branch_it."""

    name = "gamma"
    NAMES = ("gamma_1", "gamma_2")

    def check(self, module, name):
        bad = [n for n, p in module.named_parameters(recurse=False) if n not in self.NAMES or p.dim() != 1]
        if bad:
            raise CoverageError(f"block '{name}' owns parameters the layer-scale rule does not know: {bad}")

    def taps(self, module, params, rows):
        return [p.detach().view(1, 1, -1).expand(rows, 1, p.shape[0]) for _, p in params]

    def per_example(self, entry, k, g):
        return [(k, g.reshape(g.shape[0], -1))]  # (B, 1, d) → (B, d)


class ConvNeXtGammaRule(GammaRule):
    """timm ConvNeXtBlock's own layer scale, applied as `x.mul(gamma.reshape(1, -1, 1, 1))` — a reshape a
    (B, C) stand-in cannot pass through, so `run` is the block's forward with the stand-in (B, C, 1, 1)."""

    name = "gamma"
    NAMES = ("gamma",)

    def check(self, module, name):
        super().check(module, name)
        conv = module.conv_dw
        x = torch.randn(2, conv.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
        self.verify(module, name, x.to(next(module.parameters())))

    def taps(self, module, params, rows):
        return [p.detach().view(1, -1, 1, 1).expand(rows, p.shape[0], 1, 1) for _, p in params]

    def run(self, m, forward, params, taps, args, kwargs):
        (x,) = args
        shortcut = x
        x = m.conv_dw(x)
        if m.use_conv_mlp:
            x = m.mlp(m.norm(x))
        else:
            x = m.mlp(m.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return m.drop_path(x.mul(taps[0])) + m.shortcut(shortcut)
