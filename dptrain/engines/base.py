"""The protocol every engine keeps (`Engine`) and what the engines share: the forward's precision and the loss.

All private engines see the same Poisson batches, divide by the same expected batch size L and add
N(0, σ²R²) once per logical batch, so their ε and their updates are comparable.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dptrain.errors import lookup


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
    - `state_dict() -> dict` / `load_state_dict(state)`: the engine's own state beyond the model's and the torch
      optimizer's, between two steps — its noise generators (none in secure mode: OS entropy), a loss scaler —
      so that a resumed run draws what the uninterrupted one draws (checkpoint.py; on N processes, this rank's).
      An engine without them is not checkpointed (`checkpointable`): its runs cannot be resumed.
    """

    model: nn.Module

    def backward(self, out: torch.Tensor, y: torch.Tensor, *, last: bool) -> torch.Tensor: ...

    def step(self) -> None: ...

    def detach(self) -> nn.Module: ...

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def checkpointable(engine) -> bool:
    """Whether `engine` can save and restore its own state (the `Engine` protocol's state_dict/load_state_dict)."""
    return callable(getattr(engine, "state_dict", None)) and callable(getattr(engine, "load_state_dict", None))


# precision → the autocast dtype of the forward (None: float32, no autocast)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp16's loss scale for the private engines: static. GradScaler's dynamic scale skips a step when some gradient
# overflowed — an event that depends on the batch and that the accountant never saw; with a fixed scale an
# overflowed example contributes nothing instead (PrivacyEngine.loss_scale), and every step is taken.
FP16_LOSS_SCALE = 2.0**10


class Precision:
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


def divide_grads(optimizer, by: float) -> None:
    for g in optimizer.param_groups:
        for p in g["params"]:
            if p.grad is not None:
                p.grad.div_(by)


def summed_loss(out, y, augmult: int):
    """Summed cross-entropy; with K augmented rows per example, each example's loss is the mean of its K."""
    if augmult == 1:
        return F.cross_entropy(out, y, reduction="sum")
    return F.cross_entropy(out, y.repeat_interleave(augmult), reduction="sum") / augmult
