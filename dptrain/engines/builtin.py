"""engine=mixed_ghost|ghost|per_sample: the built-in privacy engine (dptrain.privacy) and its DPOptimizer."""

from __future__ import annotations

import torch
from torch import nn

from dptrain.engines.base import FP16_LOSS_SCALE, Precision, divide_grads, summed_loss
from dptrain.errors import UserError
from dptrain.privacy import DPOptimizer, PrivacyEngine


class BuiltIn(Precision):
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
        loss = summed_loss(out.float(), y, self.augmult)
        # clipped per-example gradients summed into .grad (book-keeping; passes=2: two inside); fp16: S times them
        (loss * self.engine.loss_scale if self.engine.loss_scale != 1.0 else loss).backward()
        return loss.detach()

    def step(self) -> None:
        if self.engine.loss_scale != 1.0:  # fp16: .grad holds S·Σ c_i g_i
            divide_grads(self.optimizer, self.engine.loss_scale)
        self.optimizer.step()  # noise once, ÷ L, step, zero

    def detach(self) -> nn.Module:
        return self.engine.detach()

    def state_dict(self) -> dict:
        """The noise chunk generators, by device (DPOptimizer's own)."""
        return {"noise": self.optimizer.generator_states()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.set_generator_states(state["noise"])
