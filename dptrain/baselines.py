"""Engines behind one interface: the built-in engine (mixed_ghost, ghost, per_sample), the Opacus
baselines (opacus: hooks; opacus_ghost: fast gradient clipping, two backward passes) and nonprivate.

Per logical batch the loop calls `backward(out, y, last=...)` once per physical batch, then `step()`.
All private engines see the same Poisson batches, divide by the same expected batch size L and add
N(0, σ²R²) once per logical batch, so their ε and their updates are comparable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .privacy import MODES, DPOptimizer, PrivacyEngine
from .privacy.streams import Streams

ENGINES = (*MODES, "opacus", "opacus_ghost", "nonprivate")


def _loss(out, y, augmult: int):
    """Summed cross-entropy; with K augmented rows per example, each example's loss is the mean of its K."""
    if augmult == 1:
        return F.cross_entropy(out, y, reduction="sum")
    return F.cross_entropy(out, y.repeat_interleave(augmult), reduction="sum") / augmult


class BuiltIn:
    def __init__(self, model, optimizer, *, mode, noise_multiplier, max_grad_norm, expected_batch_size,
                 clipping="abadi", gamma=0.01, streams=None, augmult=1, passes=1):
        self.model, self.augmult = model, augmult
        self.engine = PrivacyEngine(model, mode=mode, max_grad_norm=max_grad_norm, clipping=clipping, gamma=gamma,
                                    augmult=augmult, passes=passes)
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                     expected_batch_size=expected_batch_size, streams=streams)

    def backward(self, out, y, *, last: bool) -> float:
        loss = _loss(out, y, self.augmult)
        loss.backward()  # clipped per-example gradients summed into .grad (book-keeping; passes=2: two inside)
        return loss.item()

    def step(self) -> None:
        self.optimizer.step()  # noise once, ÷ L, step, zero

    def describe(self) -> str:
        return self.engine.describe()

    def detach(self) -> nn.Module:
        return self.engine.detach()


class NonPrivate:
    def __init__(self, model, optimizer, *, expected_batch_size, augmult=1, **_):
        self.model, self.optimizer, self.L, self.augmult = model, optimizer, expected_batch_size, augmult

    def backward(self, out, y, *, last: bool) -> float:
        loss = _loss(out, y, self.augmult)
        loss.backward()
        return loss.item()

    def step(self) -> None:
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.grad.div_(self.L)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def describe(self) -> str:
        return "  non-private: plain autograd, no clipping, no noise"

    def detach(self) -> nn.Module:
        return self.model


class Opacus:
    """Opacus 1.x as users run it: GradSampleModule + DPOptimizer (hooks), or the fast-gradient-clipping
    trio (ghost). Physical batches accumulate through `signal_skip_step`, as BatchMemoryManager does."""

    def __init__(self, model, optimizer, *, ghost, noise_multiplier, max_grad_norm, expected_batch_size, streams,
                 **_):
        from opacus.validators import ModuleValidator

        if streams.secure:  # Opacus' secure_mode needs torchcsprng; without it, it draws from torch's global PRNG
            raise UserError("privacy.secure=true needs a built-in engine: Opacus' secure mode needs torchcsprng "
                            f"(not installed); valid: {', '.join(MODES)}")

        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise UserError(f"Opacus cannot train this model: {errors[0]}")
        model = _clone_outputs(model)
        gen = streams.generator("opacus", device=next(model.parameters()).device)
        # loss_reduction="mean": Opacus then rescales per-example gradients by the physical batch size and
        # divides the noisy sum by L (with "sum" it would not divide at all)
        kw = dict(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                  expected_batch_size=expected_batch_size, loss_reduction="mean", generator=gen)
        if ghost:
            from opacus.grad_sample import GradSampleModuleFastGradientClipping
            from opacus.optimizers import DPOptimizerFastGradientClipping
            from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

            self.model = GradSampleModuleFastGradientClipping(model, max_grad_norm=max_grad_norm,
                                                              use_ghost_clipping=True, loss_reduction="mean")
            self.optimizer = DPOptimizerFastGradientClipping(optimizer, **kw)
            self.criterion = DPLossFastGradientClipping(self.model, self.optimizer,
                                                        nn.CrossEntropyLoss(), loss_reduction="mean")
        else:
            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer as OpacusDPOptimizer

            self.model = GradSampleModule(model, loss_reduction="mean")
            self.optimizer = OpacusDPOptimizer(optimizer, **kw)
            self.criterion = nn.CrossEntropyLoss()
        self.ghost, self._stepped = ghost, False

    def backward(self, out, y, *, last: bool) -> float:
        loss = self.criterion(out, y)
        loss.backward()
        self.optimizer.signal_skip_step(do_skip=not last)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._stepped = last
        return float(loss.item()) * len(y)  # the loop reports summed losses

    def step(self) -> None:
        if not self._stepped:  # an empty Poisson batch: a noise-only step, N(0, σ²R²)/L
            from opacus.optimizers.optimizer import _generate_noise

            opt = self.optimizer
            std = opt.noise_multiplier * opt.max_grad_norm
            for p in opt.params:
                p.grad = _generate_noise(std, p, opt.generator, opt.secure_mode) / opt.expected_batch_size
            opt.original_optimizer.step()
            opt.original_optimizer.zero_grad(set_to_none=True)
        self._stepped = False

    def describe(self) -> str:
        return f"  opacus {'fast gradient (ghost) clipping' if self.ghost else 'hooks'}"

    def detach(self) -> nn.Module:
        return _unclone(self.model._module)


class _Cloned(nn.Module):
    """Returns a copy of the wrapped layer's output: Opacus' full backward hooks forbid in-place ops on a
    hooked output (timm's `x += shortcut`, ReLU(inplace=True))."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, *args, **kwargs):
        out = self.m(*args, **kwargs)
        return out.clone() if torch.is_tensor(out) else out


def _clone_outputs(model: nn.Module) -> nn.Module:
    for name, child in list(model.named_children()):
        if any(True for _ in child.parameters(recurse=False)) and not any(True for _ in child.children()):
            setattr(model, name, _Cloned(child))
        else:
            _clone_outputs(child)
    return model


def _unclone(model: nn.Module) -> nn.Module:
    for name, child in list(model.named_children()):
        setattr(model, name, child.m if isinstance(child, _Cloned) else _unclone(child))
    return model


def create_engine(name: str, model, optimizer, *, noise_multiplier, max_grad_norm, expected_batch_size,
                  clipping="abadi", gamma=0.01, seed=0, secure=False, streams=None, augmult=1, passes=1):
    if name not in ENGINES:
        raise UserError(f"unknown engine '{name}'; valid: {', '.join(ENGINES)}")
    if passes not in (1, 2) or (passes == 2 and name not in MODES):
        raise UserError(f"engine.passes={passes}: 1, or 2 with a built-in engine ({', '.join(MODES)})")
    kw = dict(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
              streams=streams if streams is not None else Streams(seed, secure=secure))
    if name in MODES:
        return BuiltIn(model, optimizer, mode=name, clipping=clipping, gamma=gamma, augmult=augmult, passes=passes,
                       **kw)
    if name == "nonprivate":
        return NonPrivate(model, optimizer, augmult=augmult, **kw)
    if clipping != "abadi" or augmult != 1:
        raise UserError(f"engine.clipping={clipping} and privacy.augmult={augmult} need a built-in engine "
                        f"({', '.join(MODES)}) or nonprivate")
    return Opacus(model, optimizer, ghost=name == "opacus_ghost", **kw)
