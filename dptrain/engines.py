"""Engines behind one interface (`Engine`): the built-in engine (mixed_ghost, ghost, per_sample), the Opacus
baselines (opacus: hooks; opacus_ghost: fast gradient clipping, two backward passes) and nonprivate.

All private engines see the same Poisson batches, divide by the same expected batch size L and add
N(0, σ²R²) once per logical batch, so their ε and their updates are comparable.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError, lookup
from .privacy import MODES, DPOptimizer, PrivacyEngine
from .privacy.engine import trainable_ids
from .privacy.streams import Streams


class Engine(Protocol):
    """What the training loop (loop.py), run.py and dptrain-bench ask of an engine.

    Per logical batch the loop calls `backward(model(x), y, last=...)` once per physical batch — `last=True` on
    the logical batch's final one — and then `step()` exactly once, also when the batch was empty (a Poisson
    batch can be: the step is then noise only). After the last step, `detach()` once.

    - `model`: the module to run forward (an engine may have wrapped the user's model, e.g. Opacus).
    - `backward(out, y, *, last) -> Tensor`: the summed cross-entropy of this physical batch, a 0-dim tensor on
      the device (for the progress bar and metrics; the loop reads it once per step, as each read waits for the
      device); its per-example gradients, clipped, are added to what earlier physical batches of the same
      logical batch left.
    - `step()`: noise N(0, σ²R²) added once to the clipped sum, ÷ L (the *expected* logical batch size),
      optimizer step, gradients zeroed. Non-private: ÷ L, step, zero.
    - `detach() -> nn.Module`: the user's model as a plain module again (no hooks, no wrappers), to save.
    - `autocast()`: the context the loop runs the forward in (torch.autocast for precision=bf16/fp16).
    - optional `sync(last) -> context`: entered around the forward too; DDP (nonprivate on N processes) skips its
      all-reduce unless `last`. On N processes (distributed.py) `step()` is also collective: every rank calls it
      for every logical batch, its shard empty or not.
    """

    model: nn.Module

    def backward(self, out: torch.Tensor, y: torch.Tensor, *, last: bool) -> torch.Tensor: ...

    def step(self) -> None: ...

    def detach(self) -> nn.Module: ...

    def autocast(self) -> contextlib.AbstractContextManager: ...


# precision → the autocast dtype of the forward (None: float32, no autocast)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp16's loss scale for the private engines: static. GradScaler's dynamic scale skips a step when some gradient
# overflowed — an event that depends on the batch and that the accountant never saw; with a fixed scale an
# overflowed example contributes nothing instead (PrivacyEngine.loss_scale), and every step is taken.
FP16_LOSS_SCALE = 2.0**10


class _Precision:
    """The forward of an engine under torch.autocast (`autocast()`, entered by the loop around model(x));
    parameters, gradients, noise and the optimizer stay float32."""

    def _set_precision(self, precision: str, model: nn.Module) -> None:
        self.precision = precision
        self.amp_dtype = lookup("precision", precision, PRECISIONS)
        self.device_type = next(model.parameters()).device.type

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)


def _divide_grads(optimizer, by: float) -> None:
    for g in optimizer.param_groups:
        for p in g["params"]:
            if p.grad is not None:
                p.grad.div_(by)


def _loss(out, y, augmult: int):
    """Summed cross-entropy; with K augmented rows per example, each example's loss is the mean of its K."""
    if augmult == 1:
        return F.cross_entropy(out, y, reduction="sum")
    return F.cross_entropy(out, y.repeat_interleave(augmult), reduction="sum") / augmult


class BuiltIn(_Precision):
    def __init__(self, model, optimizer, *, mode, noise_multiplier, max_grad_norm, expected_batch_size,
                 clipping="abadi", gamma=0.01, streams=None, augmult=1, passes=1, precision="fp32", dist=None):
        self.model, self.augmult = model, augmult
        self._set_precision(precision, model)
        if precision == "fp16" and passes == 2:
            raise UserError("precision=fp16 needs engine.passes=1 (or precision=bf16 with passes=2): an example whose "
                            "loss-scaled gradient overflows would carry inf/NaN rows through passes=2's tripwires")
        self.engine = PrivacyEngine(model, mode=mode, max_grad_norm=max_grad_norm, clipping=clipping, gamma=gamma,
                                    augmult=augmult, passes=passes)
        self.engine.loss_scale = FP16_LOSS_SCALE if precision == "fp16" else 1.0
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                     expected_batch_size=expected_batch_size, streams=streams, dist=dist)

    def backward(self, out, y, *, last: bool) -> torch.Tensor:
        loss = _loss(out.float(), y, self.augmult)
        # clipped per-example gradients summed into .grad (book-keeping; passes=2: two inside); fp16: S times them
        (loss * self.engine.loss_scale if self.engine.loss_scale != 1.0 else loss).backward()
        return loss.detach()

    def step(self) -> None:
        if self.engine.loss_scale != 1.0:  # fp16: .grad holds S·Σ c_i g_i
            _divide_grads(self.optimizer, self.engine.loss_scale)
        self.optimizer.step()  # noise once, ÷ L, step, zero

    def detach(self) -> nn.Module:
        return self.engine.detach()


class NonPrivate(_Precision):
    """fp16: torch's GradScaler (dynamic scale, skipped steps on overflow: no privacy to keep here).
    Data-parallel: torch's DistributedDataParallel (distributed.py `ddp`), its gradients all-reduced in the
    backward of each logical batch's last physical batch (`sync`, entered by the loop around the forward)."""

    def __init__(self, model, optimizer, *, expected_batch_size, augmult=1, precision="fp32", dist=None, **_):
        self.model, self.optimizer, self.L, self.augmult = model, optimizer, expected_batch_size, augmult
        self._set_precision(precision, model)
        self.scaler = torch.amp.GradScaler(self.device_type) if precision == "fp16" else None
        self.raw = model
        if dist is not None and dist.enabled:
            from .distributed import ddp

            self.model = ddp(model, dist, expected_batch_size=expected_batch_size)

    def sync(self, last: bool):
        """DDP: no all-reduce before the logical batch's last backward (gradient accumulation)."""
        if last or self.model is self.raw:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, out, y, *, last: bool) -> torch.Tensor:
        loss = _loss(out.float(), y, self.augmult)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach()

    def step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        _divide_grads(self.optimizer, self.L)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def detach(self) -> nn.Module:
        return self.raw


class Opacus(_Precision):
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


# name → factory; every factory takes create_engine's keyword arguments and ignores those it has no use for
ENGINES = {
    **{mode: partial(BuiltIn, mode=mode) for mode in MODES},
    "opacus": partial(Opacus, ghost=False),
    "opacus_ghost": partial(Opacus, ghost=True),
    "nonprivate": NonPrivate,
}


def create_engine(name: str, model, optimizer, *, noise_multiplier, max_grad_norm, expected_batch_size,
                  clipping="abadi", gamma=0.01, seed=0, secure=False, streams=None, augmult=1, passes=1,
                  precision="fp32", dist=None) -> Engine:
    """streams: the run's random streams (privacy/streams.py); default: Streams(seed, secure=secure).
    dist: this process's place in a data-parallel run (distributed.py); None: one process."""
    factory = lookup("engine", name, ENGINES)
    if passes not in (1, 2) or (passes == 2 and name not in MODES):
        raise UserError(f"engine.passes={passes}: 1, or 2 with a built-in engine ({', '.join(MODES)})")
    return factory(model, optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                   expected_batch_size=expected_batch_size, clipping=clipping, gamma=gamma,
                   streams=streams if streams is not None else Streams(seed, secure=secure), augmult=augmult,
                   passes=passes, precision=precision, dist=dist)
