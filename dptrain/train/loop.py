"""train_one_epoch and evaluate: they take objects, never the config; `Position`: where training stands."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from dptrain.data.datasets import augment, batches
from dptrain.errors import Diverged
from dptrain.privacy.sampling import physical


@dataclass
class Position:
    """Where training stands: the counters at the start of the epoch in progress, and that epoch's steps already
    taken (`totals`: train_one_epoch's running sums). At an epoch boundary `totals` is empty. A checkpoint saves
    it (`state_dict`) and a resumed run continues from it (`from_state_dict`)."""

    epoch: int = 0  # epochs completed
    done: int = 0  # optimizer steps before the epoch in progress
    seen: int = 0  # examples trained on before it
    times: list = field(default_factory=list)  # seconds of each of those steps
    totals: dict = field(default_factory=dict)  # the epoch in progress: {"loss", "examples", "step_times"}
    rows: list = field(default_factory=list)  # metrics.jsonl's lines so far
    train_s: float = 0.0  # seconds of training so far (summary's samples/s)
    wall_s: float = 0.0  # seconds of the run so far (summary's wall_s)

    @property
    def steps(self) -> int:
        return self.done + len(self.totals.get("step_times", ()))

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> Position:
        return cls(**state)


def train_one_epoch(engine, train_set, logical_batches, *, physical_batch_size, device, num_workers=0,
                    augment_gen=None, augmult=1, views=1, ema=None, scheduler=None, memory_format=None, on_step=None,
                    totals=None, metrics=None) -> dict:
    """One pass over `logical_batches` (index tensors): each is split into physical batches, each physical
    batch goes through forward + engine.backward, then engine.step() once (noise-only if empty).
    augmult, views, augment_gen, memory_format: how a physical batch becomes the model's input (`_inputs`).
    ema: an AveragedModel, scheduler: an lr scheduler, each updated after every optimizer step.
    Divergence guard: a non-finite loss (any physical batch) or non-finite weights (after every step) raise
    Diverged with the steps spent so far; the step in progress counts, as its loss was seen and an engine may
    already have applied it (Opacus steps inside backward).
    totals: the epoch's running sums {"loss", "examples", "step_times"}, updated after every step (what a
    mid-epoch checkpoint saves); a run resumed inside an epoch passes its checkpoint's, with the batches left.
    metrics: a ledger.TrainMetrics — the epoch's loss and accuracy as released (under log.train_metrics=dp: clipped,
    noised in every step, ÷ steps·L), and what on_step shows; None: the engine's mean loss over the examples seen."""
    model = engine.model
    model.train()
    params = list(model.parameters())
    chunks = [physical(idx, physical_batch_size) for idx in logical_batches]
    # CUDA: pinned host batches, so the non_blocking copies below overlap the host's next work
    stream = batches(train_set, [c for cs in chunks for c in cs], num_workers=num_workers,
                     pin_memory=device.type == "cuda")
    prepare = partial(_inputs, device=device, views=views, augmult=augmult, augment_gen=augment_gen,
                      memory_format=memory_format)
    totals = totals if totals is not None else {}
    loss_sum, seen = totals.setdefault("loss", 0.0), totals.setdefault("examples", 0)
    correct = totals.setdefault("correct", 0.0)  # with metrics: loss_sum and correct are the released sums
    # the engine's summed loss stays on the device (float64, added in the order a Python float would be: the same
    # bits) and is read once per step, not once per physical batch: each read waits for the device. With metrics it
    # only guards against divergence: the released sums are the metrics'
    running = torch.tensor(loss_sum if metrics is None else 0.0, dtype=torch.float64, device=device)
    times = totals.setdefault("step_times", [])  # appended in place
    for cs in chunks:
        t0 = time.perf_counter()
        for j, _ in enumerate(cs):
            x, y = prepare(*next(stream))
            out = _forward(engine, model, x, last=j == len(cs) - 1)
            if metrics is not None:
                metrics.add(out, y)
            running += engine.backward(out, y, last=j == len(cs) - 1)  # a 0-dim tensor (or a float): no host sync
            seen += len(y)
        total = running.item()  # a non-finite loss of any physical batch makes the sum non-finite
        if not math.isfinite(total):  # before the step: the step in progress counts, its update is not made
            raise Diverged(f"non-finite training loss ({total})", steps=len(times) + 1)
        if metrics is None:
            loss_sum = total
        engine.step()
        if metrics is not None:  # the step's sums as released (noise added even to an empty batch's)
            step_loss, step_correct = metrics.step()
            loss_sum, correct = loss_sum + step_loss, correct + step_correct
        _after_step(model, params, ema, scheduler, times, t0)
        totals["loss"], totals["examples"], totals["correct"] = loss_sum, seen, correct
        if on_step is not None:
            on_step(loss_sum / (metrics.count(len(times), seen) if metrics is not None else max(seen, 1)), seen,
                    sum(times))
    count = metrics.count(len(times), seen) if metrics is not None else max(seen, 1)
    return {"loss": loss_sum / count, "acc": correct / count if metrics is not None else None, "examples": seen,
            "step_times": times, "loss_sum": loss_sum, "correct": correct}


def _inputs(x, y, *, device, views, augmult, augment_gen, memory_format):
    """A physical batch as the model's input. views K: the dataset stores K fixed views of each example,
    (B, K, ...): its K rows, no augmentation. augmult K: each example enters as K independently augmented rows
    (clipped as one example). augment_gen: random crops and flips from that generator."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if views > 1:
        x = x.flatten(0, 1)  # (B, K, ...) → (B·K, ...): an example's views are consecutive
    elif augmult > 1:
        x = x.repeat_interleave(augmult, dim=0)  # (B·K, ...): an example's copies are consecutive
    if augment_gen is not None:
        x = augment(x, augment_gen)
    if memory_format is not None and x.dim() == 4:
        x = x.contiguous(memory_format=memory_format)
    return x, y


def _forward(engine, model, x, *, last: bool):
    # precision=bf16/fp16: the forward only; backward and noise stay float32. sync: DDP (nonprivate on N
    # processes) all-reduces only in the logical batch's last backward
    with engine.autocast(), (engine.sync(last) if hasattr(engine, "sync") else contextlib.nullcontext()):
        return model(x)


def _after_step(model, params, ema, scheduler, times: list, t0: float) -> None:
    """The EMA and the lr schedule after an optimizer step; the step's seconds appended to `times`; Diverged if a
    weight is not finite."""
    if ema is not None:
        ema.update_parameters(model)
    if scheduler is not None:
        scheduler.step()
    finite = all_finite(params)  # reads a flag: waits for the step's kernels, so the time below is the step's
    times.append(time.perf_counter() - t0)
    if not finite:
        raise Diverged("non-finite weights after the update", steps=len(times))


@torch.no_grad()
def all_finite(tensors: list[torch.Tensor]) -> bool:
    """No nan or inf anywhere. The fused 2-norms first (a small fraction of a step); only if one is not finite —
    nan, inf, or a finite |w| > ~1e19 whose square overflows — the max |w| (much slower, cannot overflow)
    decides."""
    if not tensors:
        return True
    if torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all():
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, ord=math.inf))).all())


@torch.no_grad()
def evaluate(model, test_set, *, device, batch_size=512, num_workers=0, views=1, flip=False, loss_clip=None) -> dict:
    """Accuracy and mean cross-entropy over `test_set`, and their sums ("correct", "loss_sum", "n"). Test-time
    augmentation (dataset.tta): views > 1, inputs (B, views, ...) whose softmax is averaged over the views; flip, the
    softmax of each image and of its mirror image averaged. The loss is then the cross-entropy of the averaged
    softmax. loss_clip: each example's loss clipped to it (a private held-out split's release, ledger.py)."""
    model.eval()
    n, correct, loss = 0, 0, 0.0
    idx = torch.arange(len(test_set))
    for x, y in batches(test_set, list(torch.split(idx, batch_size)), num_workers=num_workers):
        x, y = x.to(device), y.to(device)
        if views > 1 or flip:
            rows = x.flatten(0, 1) if views > 1 else torch.cat([x, x.flip(-1)])  # (B·V, ...) or (2B, ...)
            p = model(rows).float().softmax(-1)
            p = p.view(len(y), views, -1).mean(1) if views > 1 else p.view(2, len(y), -1).mean(0)
            out = p.clamp_min(1e-12).log()  # log of the averaged softmax: cross_entropy below is its NLL
        else:
            out = model(x)
        per = F.cross_entropy(out.float(), y, reduction="none")  # (B,)
        loss += (per if loss_clip is None else per.clamp(max=loss_clip)).double().sum().item()
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    return {"acc": correct / max(n, 1), "loss": loss / max(n, 1), "correct": correct, "loss_sum": loss, "n": n}
