"""engine=opacus|opacus_ghost: Opacus 1.x as users run it, in the same runner and on the same batches."""

from __future__ import annotations

import torch
from torch import nn

from dptrain.engines.base import FP16_LOSS_SCALE, Precision
from dptrain.errors import UserError
from dptrain.privacy import MODES
from dptrain.privacy.engine import trainable_ids

# opacus is imported inside the functions that use it: a heavy optional dependency, loaded only when an Opacus
# engine is built


class Opacus(Precision):
    """Opacus 1.x as users run it: GradSampleModule + DPOptimizer (hooks), or the fast-gradient-clipping
    trio (ghost). Physical batches accumulate through `signal_skip_step`, as BatchMemoryManager does.

    Mixed precision (engine=opacus only): the forward under torch.autocast, parameters, noise and the optimizer
    float32, as Opacus 1.6 supports it. Opacus' hooks leave bf16/fp16 per-example gradients and would take their
    norms and clip factors in that precision (a rounded norm lets a clipped example exceed R by ~2⁻⁸); here they are
    cast to float32 before its optimizer clips them, so norms, clip factors and the clipped sum are float32 of the
    same per-example gradients (the built-in engine's bound: ≤ R up to float32 rounding). fp16: the static loss scale
    S = FP16_LOSS_SCALE, the per-example gradients divided by S before clipping (clipping the scaled ones at R would
    clip at R·S), an example whose scaled gradient overflowed left out (`dropped`), every step taken — as the
    built-in engine does (GradScaler's unscale_ reaches .grad, not Opacus' grad_sample, and skips steps).
    opacus_ghost refuses reduced precision: its clipped sum comes from a second backward of Σ c_i·loss_i through the
    reduced-precision graph, not from the quantities its norms were taken of (see `_AMP_GHOST`)."""

    def __init__(self, model, optimizer, *, ghost, noise_multiplier, max_grad_norm, expected_batch_size, streams,
                 clipping="abadi", augmult=1, precision="fp32", dist=None, **_):
        self._set_precision(precision, model)
        if ghost and self.amp_dtype is not None:
            raise UserError(f"precision={precision} needs engine=opacus (hooks), a built-in engine "
                            f"({', '.join(MODES)}) or nonprivate: {_AMP_GHOST}")
        if clipping != "abadi" or augmult != 1:
            raise UserError(f"engine.clipping={clipping} and privacy.augmult={augmult} need a built-in engine "
                            f"({', '.join(MODES)}) or nonprivate")
        if streams.secure:  # Opacus' secure_mode needs torchcsprng; without it, it draws from torch's global PRNG
            raise UserError("privacy.secure=true needs a built-in engine: Opacus' secure mode needs torchcsprng "
                            f"(not installed); valid: {', '.join(MODES)}")

        _check_opacus_supports(model, "opacus_ghost" if ghost else "opacus")
        model = _clone_outputs(model)
        gen = streams.generator("opacus", device=next(model.parameters()).device)
        # loss_reduction="mean": Opacus then rescales per-example gradients by the physical batch size and
        # divides the noisy sum by L (with "sum" it would not divide at all)
        kw = dict(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                  expected_batch_size=expected_batch_size, loss_reduction="mean", generator=gen)
        self.dist = dist if dist is not None and dist.enabled else None
        if self.dist is not None:  # Opacus' own data parallelism: DPDDP + its distributed optimizers
            model, kw = _opacus_distributed(model, kw, self.dist)
        if ghost:
            from opacus.grad_sample import GradSampleModuleFastGradientClipping
            from opacus.optimizers import DPOptimizerFastGradientClipping

            if self.dist is not None:
                from opacus.optimizers import (
                    DistributedDPOptimizerFastGradientClipping as DPOptimizerFastGradientClipping,
                )
            from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

            self.model = GradSampleModuleFastGradientClipping(model, max_grad_norm=max_grad_norm,
                                                              use_ghost_clipping=True, loss_reduction="mean")
            self.optimizer = DPOptimizerFastGradientClipping(optimizer, **kw)
            self.criterion = DPLossFastGradientClipping(self.model, self.optimizer,
                                                        nn.CrossEntropyLoss(), loss_reduction="mean")
        else:
            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer as OpacusDPOptimizer

            if self.dist is not None:
                from opacus.optimizers import DistributedDPOptimizer as OpacusDPOptimizer

            self.model = GradSampleModule(model, loss_reduction="mean")
            self.optimizer = OpacusDPOptimizer(optimizer, **kw)
            self.criterion = nn.CrossEntropyLoss()
        self._stepped = False
        self.loss_scale = FP16_LOSS_SCALE if precision == "fp16" else 1.0
        self.dropped = 0  # fp16: examples whose scaled per-example gradient overflowed, left out so far
        self._trainable = trainable_ids(self.model)

    def _unscaled_fp32_grad_samples(self) -> None:
        """Under autocast, before Opacus' optimizer clips: every p.grad_sample in float32 and divided by the loss
        scale, so Opacus takes the norms and clip factors of the unscaled per-example gradients in float32 and sums
        exactly the tensors it measured. fp16: an example whose scaled gradient is not finite gets zero rows in
        every p.grad_sample (norm 0, nothing added: a function of that example alone, ≤ R), not a NaN step."""
        params = [p for p in self.optimizer.params if getattr(p, "grad_sample", None) is not None]
        for p in params:
            gs = p.grad_sample
            gs = torch.cat(gs, 0) if isinstance(gs, list) else gs
            p.grad_sample = gs.float() / self.loss_scale if self.loss_scale != 1.0 else gs.float()
        if self.loss_scale != 1.0 and params:
            ok = torch.stack([torch.isfinite(p.grad_sample.reshape(len(p.grad_sample), -1)).all(1) for p in params])
            bad = ~ok.all(0)
            if bad.any():
                self.dropped += int(bad.sum())
                for p in params:
                    p.grad_sample = p.grad_sample.masked_fill(bad.view(-1, *[1] * (p.grad_sample.dim() - 1)), 0.0)

    def backward(self, out, y, *, last: bool) -> torch.Tensor:
        if trainable_ids(self.model) != self._trainable:
            # Opacus hooks the modules trainable at wrap time and its optimizer noises only requires_grad
            # parameters: a layer unfrozen later would have no per-example gradient, one frozen later its stale .grad
            raise UserError("engine=opacus: the trainable parameters changed after Opacus wrapped the model; freeze "
                            "or unfreeze before training starts, or use a built-in engine (it re-plans)")
        loss = self.criterion(out.float() if self.amp_dtype is not None else out, y)
        (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()
        if self.amp_dtype is not None:
            self._unscaled_fp32_grad_samples()
        self.optimizer.signal_skip_step(do_skip=not last)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._stepped = last
        return loss.detach().double() * len(y)  # the loop reports summed losses (float64: a float's product)

    def step(self) -> None:
        if not self._stepped:  # an empty Poisson batch: a noise-only step, N(0, σ²R²)/L
            from opacus.optimizers.optimizer import _generate_noise

            opt = self.optimizer
            std = opt.noise_multiplier * opt.max_grad_norm
            for p in opt.params:
                if self.dist is None or self.dist.is_main:  # data-parallel: noise on rank 0, as Opacus does
                    p.grad = _generate_noise(std, p, opt.generator, opt.secure_mode) / opt.expected_batch_size
                else:  # this rank's shard was empty: it joins the all-reduce with zeros
                    p.grad = torch.zeros_like(p)
            if self.dist is not None:
                opt.reduce_gradients()  # the all-reduce the ranks with examples run in opt.step()
            opt.original_optimizer.step()
            opt.original_optimizer.zero_grad(set_to_none=True)
        self._stepped = False

    def state_dict(self) -> dict:
        """Opacus' noise generator (its optimizer's; this rank's on N processes, rank 0 drawing the noise)."""
        return {"opacus": self.optimizer.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.generator.set_state(state["opacus"])

    def detach(self) -> nn.Module:
        inner = self.model._module
        return _unclone(inner.module if self.dist is not None else inner)  # DPDDP holds the model in .module


_AMP_GHOST = ("Opacus' ghost clipping takes its clipped sum from a second backward of Σ c_i·loss_i through the "
              "reduced-precision graph, not from the per-example quantities its norms came from, so a clipped example "
              "can exceed R by that backward's rounding")


def _opacus_distributed(model, kw: dict, dist):
    """DPDDP (broadcasts rank 0's weights) and Opacus' distributed optimizers, which add the noise on rank 0
    only, all-reduce (sum) and divide by the world size — so each rank divides by L/world: ÷ L in total."""
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    return DPDDP(model), {**kw, "expected_batch_size": kw["expected_batch_size"] / dist.world_size}


def _check_opacus_supports(model: nn.Module, name: str) -> None:
    """Opacus refuses a module that owns trainable parameters and holds buffers anywhere below it (its
    GradSampleModule.validate: the buffers would not be private) — timm BEiT's attention (k_bias and the
    relative-position index) and every module above it — with a page-long NotImplementedError. Say it in one
    line, naming the deepest such module, before anything is wrapped. Likewise a module Opacus' ModuleValidator
    refuses (nn.MultiheadAttention, nn.LSTM, ...: its message names neither the module nor another engine)."""
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:  # Opacus' errors do not say where: the first trainable module whose validator complains
        checks = ModuleValidator.VALIDATORS
        n, m = next(((n, m) for n, m in trainable_modules(model) if type(m) in checks and checks[type(m)](m)),
                    ("", model))
        errors = checks[type(m)](m) if n else errors
        why = " ".join(str(errors[0]).split()).split(". ")[0]  # Opacus' first sentence, on one line
        raise UserError(f"engine={name} cannot train this model: Opacus refuses module '{n or '<root>'}' "
                        f"({type(m).__name__}: {why}); use engine=mixed_ghost")
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

    def __getattr__(self, name: str):
        """The wrapped layer's attributes too: a parent that reads its child's weight (peft's LoRA layer reads
        `lora_A.weight.dtype` before calling it) still finds it."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("m"), name)


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
