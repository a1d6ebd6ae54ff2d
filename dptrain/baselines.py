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

ENGINES = (*MODES, "opacus", "opacus_ghost", "nonprivate")


def _loss(out, y, augmult: int):
    """Summed cross-entropy; with K augmented rows per example, each example's loss is the mean of its K."""
    if augmult == 1:
        return F.cross_entropy(out, y, reduction="sum")
    return F.cross_entropy(out, y.repeat_interleave(augmult), reduction="sum") / augmult


class BuiltIn:
    def __init__(self, model, optimizer, *, mode, noise_multiplier, max_grad_norm, expected_batch_size,
                 clipping="abadi", gamma=0.01, seed=0, secure=False, augmult=1, passes=1):
        self.model, self.augmult = model, augmult
        self.engine = PrivacyEngine(model, mode=mode, max_grad_norm=max_grad_norm, clipping=clipping, gamma=gamma,
                                    augmult=augmult, passes=passes)
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                     expected_batch_size=expected_batch_size, seed=seed, secure=secure)

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

    def __init__(self, model, optimizer, *, ghost, noise_multiplier, max_grad_norm, expected_batch_size, seed=0,
                 secure=False, **_):
        from opacus.validators import ModuleValidator

        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise UserError(f"Opacus cannot train this model: {errors[0]}")
        _check_opacus_supports(model, "opacus_ghost" if ghost else "opacus")
        model = _clone_outputs(model)
        gen = None if secure else torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        # loss_reduction="mean": Opacus then rescales per-example gradients by the physical batch size and
        # divides the noisy sum by L (with "sum" it would not divide at all)
        kw = dict(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                  expected_batch_size=expected_batch_size, loss_reduction="mean", generator=gen, secure_mode=secure)
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


def _check_opacus_supports(model: nn.Module, name: str) -> None:
    """Opacus refuses a module that owns trainable parameters and holds buffers anywhere below it (its
    GradSampleModule.validate: the buffers would not be private) — timm BEiT's attention (k_bias and the
    relative-position index) and every module above it — with a page-long NotImplementedError. Say it in one
    line, naming the deepest such module, before anything is wrapped."""
    from opacus.utils.module_utils import trainable_modules

    bad = [(n, m) for n, m in trainable_modules(model) if any(True for _ in m.buffers())]
    if bad:
        n, m = max(bad, key=lambda b: b[0].count(".") + bool(b[0]))
        buffers = ", ".join(b for b, _ in m.named_buffers())[:80]
        raise UserError(f"engine={name} cannot train this model: Opacus refuses module '{n or '<root>'}' "
                        f"({type(m).__name__}: trainable parameters and buffers {buffers}); use engine=mixed_ghost")


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
                  clipping="abadi", gamma=0.01, seed=0, secure=False, augmult=1, passes=1):
    if name not in ENGINES:
        raise UserError(f"unknown engine '{name}'; valid: {', '.join(ENGINES)}")
    if passes not in (1, 2) or (passes == 2 and name not in MODES):
        raise UserError(f"engine.passes={passes}: 1, or 2 with a built-in engine ({', '.join(MODES)})")
    kw = dict(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
              seed=seed, secure=secure)
    if name in MODES:
        return BuiltIn(model, optimizer, mode=name, clipping=clipping, gamma=gamma, augmult=augmult, passes=passes,
                       **kw)
    if name == "nonprivate":
        return NonPrivate(model, optimizer, augmult=augmult, **kw)
    if clipping != "abadi" or augmult != 1:
        raise UserError(f"engine.clipping={clipping} and privacy.augmult={augmult} need a built-in engine "
                        f"({', '.join(MODES)}) or nonprivate")
    return Opacus(model, optimizer, ghost=name == "opacus_ghost", **kw)
