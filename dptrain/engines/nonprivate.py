"""engine=nonprivate: the same loop without privacy (the baseline of every speed ratio)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dptrain.engines.base import Precision, divide_grads, summed_loss
from dptrain.train.distributed import ddp


class NonPrivate(Precision):
    """fp16: torch's GradScaler (dynamic scale, skipped steps on overflow: no privacy to keep here).
    Data-parallel: torch's DistributedDataParallel (distributed.py `ddp`), its gradients all-reduced in the
    backward of each logical batch's last physical batch (`sync`, entered by the loop around the forward)."""

    def __init__(self, model, optimizer, *, expected_batch_size, augmult=1, precision="fp32", dist=None, **_):
        self.model, self.optimizer, self.L, self.augmult = model, optimizer, expected_batch_size, augmult
        self._set_precision(precision, model)
        self.scaler = torch.amp.GradScaler(self.device_type) if precision == "fp16" else None
        self.raw = model
        if dist is not None and dist.enabled:
            self.model = ddp(model, dist, expected_batch_size=expected_batch_size)

    def sync(self, last: bool):
        """DDP: no all-reduce before the logical batch's last backward (gradient accumulation)."""
        if last or self.model is self.raw:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, out, y, *, last: bool) -> torch.Tensor:
        loss = summed_loss(out.float(), y, self.augmult)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach()

    def step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        divide_grads(self.optimizer, self.L)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def detach(self) -> nn.Module:
        return self.raw

    def state_dict(self) -> dict:
        """fp16: GradScaler's scale and growth tracker; nothing else is random or carried between steps."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
