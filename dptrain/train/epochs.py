"""The epochs of a run (run.py's last act before the summary): logical batches until the budget's steps are taken,
and after each epoch the evaluation, the checkpoint and one metrics.jsonl line; the progress bar."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dptrain import keys as key
from dptrain.data.datasets import Data
from dptrain.engines import Engine
from dptrain.errors import Diverged
from dptrain.train import checkpoint as ckpt
from dptrain.train.allocator import trim_freed_memory
from dptrain.train.budget import Budget
from dptrain.train.distributed import SINGLE, Dist
from dptrain.train.ledger import MetricNoise, TrainMetrics, release_validation
from dptrain.train.loop import evaluate, train_one_epoch

log = logging.getLogger("dptrain")


@dataclass
class Trained:
    """What the epochs leave for the summary."""

    last: dict  # the last epoch's metrics.jsonl line
    epochs: float  # expected passes over the training set (_epochs_done)
    steps: int
    examples: int  # examples trained on, over all steps
    step_times: list[float]  # seconds per optimizer step
    train_s: float
    warnings: list[str]  # summary.json's: what was logged as WARNING (_loss_warning)


def train_epochs(cfg, engine: Engine, sampler, data: Data, budget: Budget, *, model, ema, scheduler, tracker,
                 augment, device, memory_format, saver: ckpt.Checkpointer, dist: Dist = SINGLE,
                 metrics: TrainMetrics | None = None, streams=None) -> Trained:
    """Epochs of ≈ n / L logical batches (_epoch_end; the last one shorter) until the budget's steps are taken; after
    each, evaluate `model` (its EMA if any), checkpoint, and log one metrics.jsonl line (rank 0: the evaluation,
    ε, the bar; the checkpoint is every rank's call, written by rank 0 with each rank's own state). Also
    checkpoints after a step when `saver` is due (under torchrun: rank 0's decision, on every rank). A resumed run
    starts at its checkpoint's position."""
    steps, q = budget.steps, budget.sample_rate
    at = saver.position  # zeros, or where a resumed run's checkpoint left off
    bar = tqdm(total=steps, initial=at.steps, disable=None if cfg.progress and dist.is_main else True,
               dynamic_ncols=True, leave=True)  # kept on screen when the run ends
    it, done, seen, times, epoch, rows = saver.batches(sampler), at.done, at.seen, list(at.times), at.epoch, at.rows
    row = rows[-1] if rows else {}
    cap = metrics.clip if metrics is not None and metrics.mode == "dp" else None  # the released loss's bound
    warnings = [w for w in [_loss_warning(rows, data.num_classes, cfg.optimizer.lr, cap)] if w]  # a resumed run's
    t_train = time.perf_counter() - at.train_s
    # the bar's ε: the last epoch end's, or the prior's before the first; refreshed within an epoch when the bar shows
    live = LiveEps(budget, row[key.EPS_SPENT] if key.EPS_SPENT in row else budget.eps_spent(0), on=not bar.disable)
    while done < steps:
        epoch += 1
        logical = [next(it) for _ in range(max(1, _epoch_end(epoch, q, steps) - done))]
        totals = at.totals if epoch == at.epoch + 1 else {}  # a checkpoint inside this epoch: its steps are taken
        here = ckpt.Position(epoch - 1, done, seen, times, totals, rows)  # inside this epoch, as totals grow
        on_step = _on_step(bar, saver, live, metrics, base=seen, epoch=epoch, here=here, n=len(logical),
                           t_train=t_train)
        if metrics is not None:  # the key of the noise of the epoch's first step not yet taken
            metrics.index = done + len(totals.get("step_times", ()))
        try:
            stats = train_one_epoch(engine, data.train, logical[len(totals.get("step_times", ())):],
                                    physical_batch_size=cfg.physical_batch_size, device=device,
                                    num_workers=cfg.dataset.num_workers, augment_gen=augment,
                                    augmult=cfg.privacy.augmult, views=data.views, ema=ema, scheduler=scheduler,
                                    memory_format=memory_format, on_step=on_step, totals=totals, metrics=metrics)
        except BaseException as e:  # Diverged, Ctrl-C: the bar ends its line before the CLI's one line
            bar.close()
            if isinstance(e, Diverged):
                e.steps += done  # the run's steps, not the epoch's
            raise
        done += len(logical)
        stats.update(_released(stats, metrics, dist))
        seen += stats["examples"]
        times += stats["step_times"]
        if dist.is_main:
            row = _row(cfg, budget, data, ema.module if ema is not None else model, stats, streams=streams,
                       device=device, epoch=epoch, done=done)
            rows.append(row)
            live.value = row[key.EPS_SPENT]
        # before the line leaves the process: a resumed run then never logs (releases) a step twice. Every rank
        # (torchrun: each sends rank 0 its own state; rank 0 writes)
        saver.save(ckpt.Position(epoch, done, seen, times, {}, rows, time.perf_counter() - t_train),
                   eps_spent=row.get(key.EPS_SPENT))
        if dist.is_main:
            _log_epoch(cfg, tracker, bar, rows, warnings, num_classes=data.num_classes, cap=cap, loss=stats["loss"],
                       metrics=metrics)
    bar.close()
    return Trained(last=row, epochs=_epochs_done(epoch, done, q), steps=done, examples=seen, step_times=times,
                   train_s=time.perf_counter() - t_train, warnings=warnings)


def _on_step(bar, saver: ckpt.Checkpointer, live: LiveEps, metrics, *, base: int, epoch: int, here: ckpt.Position,
             n: int, t_train: float):
    """After each step of an epoch of `n`: the bar, and a checkpoint when `saver` is due (not after the epoch's last
    step: its end checkpoints)."""
    def on_step(loss, ex, secs):
        trim_freed_memory()  # keep_freed_memory's heap, fragmented by steps of varying size (allocator.py)
        bar.update(1)
        bar.set_postfix(epoch=epoch, **_loss_postfix(loss, metrics), **_eps_postfix(live.at(bar.n)),
                        samples_s=f"{(base + ex) / max(time.perf_counter() - t_train, 1e-9):.0f}")
        if len(here.totals["step_times"]) < n and saver.due():
            here.train_s = time.perf_counter() - t_train
            saver.save(here)

    return on_step


def _row(cfg, budget: Budget, data: Data, model, stats: dict, *, streams, device, epoch: int, done: int) -> dict:
    """The epoch's metrics.jsonl line: the released train metrics, the evaluation when due, ε spent."""
    # eval_every=0: only after the last epoch, so a reported row's test split is read once
    due = done >= budget.steps or (cfg.eval_every and epoch % cfg.eval_every == 0)
    test = (_validate(cfg, budget, data, model, streams=streams, device=device, epoch=epoch, done=done) if due
            else {"acc": None, "loss": None})
    return {key.EPOCH: epoch, key.STEP: done, key.TRAIN_LOSS: stats["loss"], key.TRAIN_ACC: stats["acc"],
            key.TEST_ACC: test["acc"], key.TEST_LOSS: test["loss"], key.EPS_SPENT: budget.eps_spent(done)}


def _log_epoch(cfg, tracker, bar, rows: list[dict], warnings: list[str], *, num_classes: int, cap, loss,
               metrics) -> None:
    """The epoch's metrics.jsonl line (rows[-1]), a new divergence warning, and the bar's epoch-end postfix."""
    row = rows[-1]
    tracker.log(row)
    if (warning := _loss_warning(rows, num_classes, cfg.optimizer.lr, cap)) and warning not in warnings:
        log.warning("%s", warning)
        warnings.append(warning)
    bar.set_postfix(epoch=row[key.EPOCH], **_loss_postfix(loss, metrics), **_eps_postfix(row[key.EPS_SPENT]),
                    acc="-" if row[key.TEST_ACC] is None else f"{row[key.TEST_ACC]:.3f}")


def _validate(cfg, budget: Budget, data: Data, model, *, streams, device, epoch: int, done: int) -> dict:
    """The evaluation split's acc and loss as released: the test split's exactly (public); a held-out split of the
    private training set (dataset.val_fraction > 0) as log.val_metrics says, noised under dp (ledger.py)."""
    private = cfg.dataset.val_fraction > 0 and budget.private
    mode = cfg.log.val_metrics if private else "nonprivate"
    if mode == "dp" and done not in budget.evaluated:  # the budget counted these evaluations only
        raise RuntimeError(f"evaluation at step {done} is not in the budget's {budget.evaluated}")
    if mode == "none":
        return {"acc": None, "loss": None}
    result = evaluate(model, data.test, device=device, num_workers=cfg.dataset.num_workers, views=data.test_views,
                      flip=data.test_flip, loss_clip=budget.loss_clip if mode == "dp" else None)
    return release_validation(result, mode=mode, clip=budget.loss_clip, noise_multiplier=budget.val_noise,
                              noise=MetricNoise(streams, 1), index=epoch)


def _loss_warning(rows: list[dict], num_classes: int, lr: float, cap: float | None = None) -> str | None:
    """The released training loss (cross-entropy) says the weights are running away: two orders of magnitude above
    a uniform guess's, ln C — or, when the loss is released privately (each example's clipped to `cap`,
    log.train_metrics=dp), at 90% of that cap, i.e. nearly every example's loss above it. Read from the released
    values only, so the warning is post-processing of what the ledger counts. None: no sign of it."""
    chance = math.log(max(num_classes, 2))
    limit = 100 * chance if cap is None else 0.9 * cap
    for r in rows:
        loss = r.get(key.TRAIN_LOSS)
        if loss is not None and loss >= limit:
            what = (f"{loss / chance:.3g}x that of a uniform guess" if cap is None else
                    f"at the released loss's per-example bound ({cap:.2f}: {cap / chance:.3g}x that of a uniform "
                    "guess)")
            return (f"train loss {loss:.3g} in epoch {r[key.EPOCH]} is {what} (ln {num_classes} = {chance:.2f}): "
                    f"training is diverging; lower optimizer.lr (now {lr:g})")
    return None


class LiveEps:
    """ε spent for the progress bar, recomputed within an epoch — but an accountant call can take longer than many
    steps: recomputed only once the time since the last call is 50× that call's, so the bar costs the run at most
    ~2% (nothing without a bar)."""

    def __init__(self, budget: Budget, value, *, on: bool):
        self.budget, self.value, self.on, self.next_at = budget, value, on and budget.private, 0.0

    def at(self, steps: int):
        now = time.perf_counter()
        if self.on and now >= self.next_at:
            self.value = self.budget.eps_spent(steps)
            self.next_at = time.perf_counter() + 50 * (time.perf_counter() - now)
        return self.value


def bar_logging(cfg, dist: Dist):
    """While the progress bar shows (a terminal, rank 0), log lines go through tqdm.write: printed above the bar,
    not glued onto it with a stale copy of the bar left behind."""
    shows = cfg.progress and dist.is_main and sys.stderr.isatty()
    return logging_redirect_tqdm() if shows else contextlib.nullcontext()


def _released(stats: dict, metrics: TrainMetrics | None, dist: Dist) -> dict:
    """The epoch's train loss and accuracy as released: the sums over the ranks (noised once, on rank 0) ÷ the
    count (ledger.TrainMetrics.count); None under log.train_metrics=none."""
    loss_sum, correct, examples = dist.sum(stats["loss_sum"], stats["correct"], stats["examples"])
    if metrics is None:
        return {"loss": loss_sum / max(examples, 1), "acc": None, "examples": int(examples)}
    count = metrics.count(len(stats["step_times"]), int(examples))
    if metrics.mode == "none":
        return {"loss": None, "acc": None, "examples": int(examples)}
    loss, acc = loss_sum / count, correct / count
    if metrics.mode == "dp":  # noised: back into the values' range (post-processing, no privacy cost)
        loss, acc = min(max(loss, 0.0), metrics.clip), min(max(acc, 0.0), 1.0)
    return {"loss": loss, "acc": acc, "examples": int(examples)}


def _epoch_end(epoch: int, q: float, steps: int) -> int:
    """The steps taken when `epoch` (1, 2, ...) ends: k expected passes over the data at sample rate q take
    round(k / q) steps, as budget.py's steps = round(epochs / q) does; the budget's steps cap the last, partial
    one."""
    return min(steps, round(epoch / q))


def _epochs_done(epoch: int, done: int, q: float) -> float:
    """summary.json's `epochs`: the whole epochs before `epoch` plus the fraction of its steps taken — `epochs` of
    the config for a run that completes a whole number of them (keys.EPOCHS)."""
    start, end = _epoch_end(epoch - 1, q, done), round(epoch / q)
    return round(epoch - 1 + (done - start) / max(end - start, 1), 4) if epoch else 0.0


def _loss_postfix(loss, metrics) -> dict:
    """The progress bar's training loss: as released (noised under log.train_metrics=dp); none when not released."""
    return {} if loss is None or (metrics is not None and metrics.mode == "none") else {"loss": f"{loss:.3f}"}


def _eps_postfix(eps) -> dict:
    """The progress bar's ε: spent so far; none for a non-private run."""
    return {} if eps is None else {"eps": f"{eps:.3g}"}
