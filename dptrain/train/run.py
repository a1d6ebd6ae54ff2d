"""run(cfg, run_dir) → summary: seed → data → privacy budget → model → engine → epochs → summary.json."""

from __future__ import annotations

import copy
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from dptrain import keys as key
from dptrain.config import check_paths, validate
from dptrain.data.datasets import NORMALIZE, Data, create_dataset
from dptrain.engines import ENGINES, PRECISIONS, Engine, create_engine
from dptrain.errors import Diverged, UserError, check_name
from dptrain.models.factory import checkpoint_provenance, create_model, data_config, grad_checkpointing
from dptrain.models.finetune import check_adapters_run, count_trainable, merge_lora, prepare, weights_from
from dptrain.privacy import CLIPPING
from dptrain.privacy.sampling import PoissonSampler, ShuffleSampler
from dptrain.train import checkpoint as ckpt
from dptrain.train.allocator import keep_freed_memory, trim_freed_memory
from dptrain.train.budget import Budget, create_budget
from dptrain.train.distributed import SINGLE, Dist
from dptrain.train.ledger import MetricNoise, TrainMetrics, release_validation
from dptrain.train.loop import evaluate, train_one_epoch
from dptrain.train.optim import create_optimizer, create_schedule
from dptrain.train.outputs import NullTracker, Tracker, git_state, machine, peak_memory_mb, reset_peak_memory
from dptrain.train.seeding import create_streams

log = logging.getLogger("dptrain")


def run(cfg, run_dir: str, *, hooks=None, dist: Dist = SINGLE) -> dict:
    """hooks (None for a plain run): an object with data(Data) → Data, model(module) → module and
    sampler(iterable of index tensors) → iterable, applied where the run makes each — dptrain-audit (audit.py)
    adds its canaries through them; a plain run never builds one.
    dist: this process's place in a data-parallel run (torchrun; distributed.py): rank 0 owns `run_dir`."""
    t_start, git = time.time(), git_state()  # the code that runs, even if HEAD moves meanwhile
    commit = git[key.COMMIT]
    run_dir, resumed = _prepare(cfg, run_dir, dist)  # config checked before anything loads; resume's state
    streams = create_streams(cfg)  # every random stream from cfg.seed, or OS entropy (privacy/streams.py)
    torch.manual_seed(streams.seed_for("model"))
    device = dist.place(_device(cfg.device))
    reset_peak_memory(device)  # perf/peak_mem_mb: this run's peak, not an earlier job's of the same sweep process

    with dist.rank0_first():  # one download
        data = _data(cfg, streams)
    if hooks is not None:
        data = hooks.data(data)
    budget = _budget(cfg, data, streams, resumed, dist)  # q, steps and σ, fixed before training

    model = _model(cfg, data, device, wrap=hooks.model if hooks is not None else None)
    dist.broadcast_module(model)
    if dist.enabled:  # dropout / drop-path: each rank its own draws (the weights are rank 0's, above)
        torch.manual_seed(streams.seed_for("model", *dist.substream))
    checkpoint = checkpoint_provenance(cfg.model.checkpoint, dataset=data.name)  # a private run's ε composes
    weights = {key.INIT: weights_from(model, pretrained=cfg.model.pretrained, checkpoint=cfg.model.checkpoint),
               key.TRAINABLE: cfg.model.trainable, key.TRAINABLE_PARAMS: count_trainable(model)}
    log.info("%s, model.trainable=%s", weights[key.INIT], cfg.model.trainable)
    ema = _ema(model, cfg.privacy.ema)
    optimizer = create_optimizer(cfg.optimizer, model)
    scheduler = create_schedule(cfg.optimizer.schedule, optimizer, budget.steps)
    engine = _engine(cfg, model, optimizer, budget, streams, dist)
    sampler = _sampler(cfg, len(data.train), budget, streams, hooks, dist)
    if cfg.keep_freed_memory:  # ~1.7× faster CPU steps at batch 512, at a memory cost (allocator.py); set after the
        keep_freed_memory()  # data: the data preparation's freed buffers (features, statistics) go back to the OS
    _log_setup(cfg, data, budget)

    tracker = _tracker(cfg, run_dir, dist)
    # random crops and flips at each step; stored views (features) are fixed: no augmentation stream
    augment = streams.generator("augment", *dist.substream) if cfg.dataset.augment and data.views == 1 else None
    saver = ckpt.Checkpointer(run_dir, every_s=cfg.checkpoint.every_s,
                              config=OmegaConf.to_container(cfg, resolve=True), commit=commit, budget=budget,
                              model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, engine=engine,
                              sampler=sampler, augment=augment, t_start=t_start, dist=dist)
    saver.start(resumed)  # status.json "running"; a resumed run's state restored
    t_start = saver.t_start  # a resumed run's: its earlier parts' seconds included
    try:
        with _bar_logging(cfg, dist):
            trained = _train(cfg, engine, sampler, data, budget, model=model, ema=ema, scheduler=scheduler,
                             tracker=tracker, augment=augment, device=device, saver=saver, dist=dist,
                             metrics=_train_metrics(cfg, budget, streams, dist), streams=streams)
    except Diverged as e:  # failed.json with the ε those steps spent; no model.pt, no summary.json
        err = _failed(cfg, data, budget, e, tracker=tracker, t_start=t_start, commit=git)
        saver.failed()
        raise err from None
    dist.check_replicas(model)
    if dist.is_main:
        # LoRA adapters merged: model.pt is the plain architecture (finetune.merge_lora)
        torch.save(merge_lora(engine.detach()).state_dict(), os.path.join(run_dir, "model.pt"))
    return dist.from_rank0(lambda: _finish(cfg, data, budget, trained, streams=streams, checkpoint=checkpoint,
                                           weights=weights,
                                           device=device, t_start=t_start, commit=git, tracker=tracker,
                                           saver=saver, dist=dist))  # written by rank 0, returned on every rank


def _budget(cfg, data: Data, streams, resumed: dict | None, dist: Dist) -> Budget:
    """q, steps and σ by rank 0's accountant (a resumed run: the σ its steps used); training takes exactly `steps`."""
    n = len(data.train)
    if resumed:
        return ckpt.resumed_budget(resumed, n=n, batch_size=cfg.batch_size)
    return dist.from_rank0(lambda: create_budget(cfg, n, private=cfg.engine.name != "nonprivate",
                                                 secure=streams.secure, prior=data.prior,
                                                 num_classes=data.num_classes))


def _train_metrics(cfg, budget: Budget, streams, dist: Dist) -> TrainMetrics:
    """train/loss and train/acc as log.train_metrics says (ledger.py); a non-private run's exactly. The noise once,
    on rank 0's part of each step's sums."""
    mode = cfg.log.train_metrics if budget.noise_multiplier is not None else "nonprivate"
    return TrainMetrics(mode=mode, clip=budget.loss_clip, noise_multiplier=budget.metrics_noise,
                        expected_batch_size=cfg.batch_size, noise=MetricNoise(streams, 0) if dist.is_main else None)


def _validate(cfg, budget: Budget, data: Data, model, *, streams, device, epoch: int, done: int) -> dict:
    """The evaluation split's acc and loss as released: the test split's exactly (public); a held-out split of the
    private training set (dataset.val_fraction > 0) as log.val_metrics says, noised under dp (ledger.py)."""
    private = cfg.dataset.val_fraction > 0 and budget.noise_multiplier is not None
    mode = cfg.log.val_metrics if private else "nonprivate"
    if mode == "dp" and done not in budget.evaluated:  # the budget counted these evaluations only
        raise RuntimeError(f"evaluation at step {done} is not in the budget's {budget.evaluated}")
    if mode == "none":
        return {"acc": None, "loss": None}
    result = evaluate(model, data.test, device=device, num_workers=cfg.dataset.num_workers, views=data.test_views,
                      flip=data.test_flip, loss_clip=budget.loss_clip if mode == "dp" else None)
    return release_validation(result, mode=mode, clip=budget.loss_clip, noise_multiplier=budget.val_noise,
                              noise=MetricNoise(streams, 1), index=epoch)


def _engine(cfg, model, optimizer, budget: Budget, streams, dist: Dist) -> Engine:
    return create_engine(cfg.engine.name, model, optimizer, noise_multiplier=budget.noise_multiplier or 0.0,
                         max_grad_norm=cfg.max_grad_norm, expected_batch_size=cfg.batch_size,
                         clipping=cfg.engine.clipping, gamma=cfg.engine.gamma, streams=streams,
                         augmult=cfg.privacy.augmult, passes=cfg.engine.passes, precision=cfg.precision, dist=dist)


def _sampler(cfg, n: int, budget: Budget, streams, hooks, dist: Dist):
    """The logical batches the budget accounts for: Poisson at q (or shuffled, as the budget says); under torchrun
    the same logical batch on every rank, this rank's part of it."""
    q, steps = budget.sample_rate, budget.steps
    sampler = (PoissonSampler(n, sample_rate=q, steps=steps, streams=streams) if (budget.sampling or "shuffle")
               == "poisson" else ShuffleSampler(n, batch_size=cfg.batch_size, steps=steps, streams=streams))
    if hooks is not None:
        sampler = hooks.sampler(sampler)
    return dist.shard(sampler) if dist.enabled else sampler


def _log_setup(cfg, data: Data, budget: Budget) -> None:
    from dptrain.cli.terminal import model_name

    log.info("%s on %s (n=%d, %d classes, %dx%d) with %s: q=%.4g, %d steps, sigma=%s, delta=%s",
             model_name(OmegaConf.to_container(cfg.model)), data.name, len(data.train), data.num_classes,
             data.image_size, data.image_size,
             cfg.engine.name, budget.sample_rate, budget.steps, budget.noise_multiplier, budget.delta)


def _tracker(cfg, run_dir: str, dist: Dist):
    """metrics.jsonl, summary.json and wandb, on rank 0 only."""
    if not dist.is_main:
        return NullTracker()
    return Tracker(run_dir, logger=cfg.logger.name, project=cfg.logger.project, mode=cfg.logger.mode,
                   config=OmegaConf.to_container(cfg, resolve=True), name=cfg.name)


def _finish(cfg, data: Data, budget: Budget, trained, *, streams, checkpoint, weights, device, t_start, commit, tracker,
            saver, dist: Dist) -> dict:
    """summary.json (rank 0), status.json "finished", checkpoint.pt removed."""
    summary = _summary(cfg, data, budget, trained, streams=streams.describe(), checkpoint=checkpoint, weights=weights,
                       device=device, t_start=t_start, commit=commit, resumed=saver.resumed)
    summary[key.DEVICE] = dist.describe(device)  # 'cpu x2 (gloo)' on two processes
    tracker.finish(summary)
    saver.finished()
    return summary


def _prepare(cfg, run_dir: str, dist: Dist) -> tuple[str, dict | None]:
    """Every check that needs no data (check_config), the run directory (a resumed run's own; rank 0's under
    torchrun) and a resumed run's checkpoint."""
    check_config(cfg)
    if cfg.dataset.normalize == "dp" and (cfg.privacy.secure or cfg.privacy.secure_noise) and (dist.enabled or
                                                                                              cfg.resume):
        # seeded, the statistics are redrawn identically (one release); from the OS, each process or resume would
        # release another estimate that the budget does not count
        raise UserError("dataset.normalize=dp with privacy.secure draws the statistics' noise from the OS once per "
                        "process: not under torchrun or resume=; run it in one uninterrupted process, or without "
                        "privacy.secure")
    # resume=<run dir>: continue that run (checkpoint.py). Under torchrun rank 0 reads and checks its checkpoint
    # (on as many processes as wrote it) and sends it to every rank, each of which restores its own part
    resumed = dist.from_rank0(lambda: ckpt.load(cfg, world_size=dist.world_size)) if cfg.resume else None
    run_dir = dist.agree(str(cfg.resume) if cfg.resume else run_dir)  # rank 0's; the others write nothing there
    dist.check_same(OmegaConf.to_yaml(cfg), "config")
    if dist.is_main:
        os.makedirs(run_dir, exist_ok=True)
    return run_dir, resumed


def check_config(cfg) -> None:
    """Every check that needs no data: numbers in range, keys and names known (also tests/test_readme.py's)."""
    validate(cfg)  # every numeric knob finite and in range (config.RANGES), every key known
    check_name("engine", cfg.engine.name, ENGINES)
    check_name("precision", cfg.precision, PRECISIONS)
    check_name("engine.clipping", cfg.engine.clipping, CLIPPING)
    check_name("dataset.normalize", cfg.dataset.normalize, NORMALIZE)


def _data(cfg, streams) -> Data:
    """The dataset, at the input size and normalisation the model wants."""
    check_paths(cfg)  # dataset.root exists: a download would create it
    want = data_config(cfg.model.name, cfg.model.pretrained)
    ds = cfg.dataset
    # features are computed once, before training: the only augmentation is a second fixed view per example (the
    # mirror image's features), and each step trains on both (augmentation multiplicity 2)
    if ds.features != "none" and ds.augment and cfg.privacy.augmult != 2:
        raise UserError(f"dataset.features={ds.features} with dataset.augment=true stores two fixed views of each "
                        f"example (the image and its mirror image): set privacy.augmult=2 (got "
                        f"{cfg.privacy.augmult}), or dataset.augment=false")
    data = create_dataset(ds, image_size=ds.image_size or want.get("image_size"), seed=cfg.seed,
                          data_dir=cfg.data_dir, mean=want.get("mean"), std=want.get("std"), streams=streams)
    if data.num_classes < 2:  # one class: every prediction is right, and the reported accuracy says nothing
        raise UserError(f"dataset '{data.name}' has {data.num_classes} class; classification needs at least 2 (a "
                        "folder dataset: one subfolder per class under train/ and test/)")
    return data


def _model(cfg, data: Data, device: torch.device, wrap=None) -> torch.nn.Module:
    try:
        model = create_model(cfg.model.name, num_classes=data.num_classes, in_chans=data.in_chans,
                             img_size=cfg.model.img_size or data.image_size, pretrained=cfg.model.pretrained,
                             checkpoint=cfg.model.checkpoint, **cfg.model.kwargs).to(device)
    except TypeError as e:  # a model.kwargs.<arg> the model's constructor does not take
        if "keyword argument" not in str(e):
            raise
        raise UserError(f"model '{cfg.model.name}': {e} (from model.kwargs)") from None
    if cfg.model.grad_checkpointing:
        grad_checkpointing(model, cfg.model.name)
    model = prepare(model, cfg.model)  # model.head_init, model.trainable: frozen before the engine attaches
    if wrap is not None:
        model = wrap(model)
    _check_input(model, data, cfg.model.name, device)
    check_adapters_run(model, _example(data, device))  # model.trainable=lora: no adapter the forward skips
    fmt = _memory_format(cfg)
    return model if fmt is None else model.to(memory_format=fmt)


def _memory_format(cfg):
    return torch.channels_last if cfg.model.channels_last else None  # NHWC: faster CPU convs, same values


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


def _train(cfg, engine: Engine, sampler, data: Data, budget: Budget, *, model, ema, scheduler, tracker, augment,
           device, saver: ckpt.Checkpointer, dist: Dist = SINGLE, metrics: TrainMetrics | None = None,
           streams=None) -> Trained:
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
        n = len(logical)
        here = ckpt.Position(epoch - 1, done, seen, times, totals, rows)  # inside this epoch, as totals grow

        def on_step(loss, ex, secs, base=seen, epoch=epoch, here=here, n=n):
            trim_freed_memory()  # keep_freed_memory's heap, fragmented by steps of varying size (allocator.py)
            bar.update(1)
            bar.set_postfix(epoch=epoch, **_loss_postfix(loss, metrics), **_eps_postfix(live.at(bar.n)),
                            samples_s=f"{(base + ex) / max(time.perf_counter() - t_train, 1e-9):.0f}")
            if len(here.totals["step_times"]) < n and saver.due():  # the epoch's last step: its end checkpoints
                here.train_s = time.perf_counter() - t_train
                saver.save(here)

        if metrics is not None:  # the key of the noise of the epoch's first step not yet taken
            metrics.index = done + len(totals.get("step_times", ()))
        try:
            stats = train_one_epoch(engine, data.train, logical[len(totals.get("step_times", ())):],
                                    physical_batch_size=cfg.physical_batch_size, device=device,
                                    num_workers=cfg.dataset.num_workers, augment_gen=augment,
                                    augmult=cfg.privacy.augmult, views=data.views, ema=ema, scheduler=scheduler,
                                    memory_format=_memory_format(cfg), on_step=on_step, totals=totals,
                                    metrics=metrics)
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
            # eval_every=0: only after the last epoch, so a reported row's test split is read once
            due = done >= steps or (cfg.eval_every and epoch % cfg.eval_every == 0)
            test = (_validate(cfg, budget, data, ema.module if ema is not None else model, streams=streams,
                              device=device, epoch=epoch, done=done) if due else {"acc": None, "loss": None})
            row = {key.EPOCH: epoch, key.STEP: done, key.TRAIN_LOSS: stats["loss"], key.TRAIN_ACC: stats["acc"],
                   key.TEST_ACC: test["acc"], key.TEST_LOSS: test["loss"], key.EPS_SPENT: budget.eps_spent(done)}
            rows.append(row)
            live.value = row[key.EPS_SPENT]
        # before the line leaves the process: a resumed run then never logs (releases) a step twice. Every rank
        # (torchrun: each sends rank 0 its own state; rank 0 writes)
        saver.save(ckpt.Position(epoch, done, seen, times, {}, rows, time.perf_counter() - t_train),
                   eps_spent=row.get(key.EPS_SPENT))
        if not dist.is_main:
            continue
        tracker.log(row)
        if (warning := _loss_warning(rows, data.num_classes, cfg.optimizer.lr, cap)) and warning not in warnings:
            log.warning("%s", warning)
            warnings.append(warning)
        bar.set_postfix(epoch=epoch, **_loss_postfix(stats["loss"], metrics), **_eps_postfix(row[key.EPS_SPENT]),
                        acc="-" if test["acc"] is None else f"{test['acc']:.3f}")
    bar.close()
    return Trained(last=row, epochs=_epochs_done(epoch, done, q), steps=done, examples=seen, step_times=times,
                   train_s=time.perf_counter() - t_train, warnings=warnings)


def _loss_warning(rows: list[dict], num_classes: int, lr: float, cap: float | None = None) -> str | None:
    """The released training loss (cross-entropy) says the weights are running away (lr=1e6 once "finished
    successfully" at loss 5.9e5): two orders of magnitude above a uniform guess's, ln C — or, when the loss is
    released privately (each example's clipped to `cap`, log.train_metrics=dp), at 90% of that cap, i.e. nearly
    every example's loss above it. Read from the released values only, so the warning is post-processing of what
    the ledger counts. None: no sign of it."""
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
    """ε spent for the progress bar, recomputed within an epoch (it showed epoch 1's start, 0, for all of epoch 1)
    — but a PRV accountant call takes 0.3-0.8 s on 2 cores, longer than many steps: recomputed only once the time
    since the last call is 50× that call's, so the bar costs the run at most ~2% (nothing without a bar)."""

    def __init__(self, budget: Budget, value, *, on: bool):
        self.budget, self.value, self.on, self.next_at = budget, value, on and budget.noise_multiplier is not None, 0.0

    def at(self, steps: int):
        now = time.perf_counter()
        if self.on and now >= self.next_at:
            self.value = self.budget.eps_spent(steps)
            self.next_at = time.perf_counter() + 50 * (time.perf_counter() - now)
        return self.value


def _bar_logging(cfg, dist: Dist):
    """While the progress bar shows (a terminal, rank 0), log lines go through tqdm.write: printed above the bar,
    not glued onto it with a stale copy of the bar left behind."""
    import contextlib
    import sys

    from tqdm.contrib.logging import logging_redirect_tqdm

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
    round(k / q) steps, as budget.py's steps = round(epochs / q) does (epochs of round(n / L) steps made 15 epochs
    on digits 14 epochs of 6 steps); the budget's steps cap the last, partial one."""
    return min(steps, round(epoch / q))


def _epochs_done(epoch: int, done: int, q: float) -> float:
    """summary.json's `epochs`: the whole epochs before `epoch` plus the fraction of its steps taken — `epochs` of
    the config for a run that completes a whole number of them (schema.EPOCHS)."""
    start, end = _epoch_end(epoch - 1, q, done), round(epoch / q)
    return round(epoch - 1 + (done - start) / max(end - start, 1), 4) if epoch else 0.0


def _loss_postfix(loss, metrics) -> dict:
    """The progress bar's training loss: as released (noised under log.train_metrics=dp); none when not released."""
    return {} if loss is None or (metrics is not None and metrics.mode == "none") else {"loss": f"{loss:.3f}"}


def _eps_postfix(eps) -> dict:
    """The progress bar's ε: spent so far; none for a non-private run."""
    return {} if eps is None else {"eps": f"{eps:.3g}"}


def _summary(cfg, data: Data, budget: Budget, trained: Trained, *, streams: dict, checkpoint: dict | None,
             weights: dict, device, t_start: float, commit, resumed: list) -> dict:
    """summary.json: schema.SUMMARY's keys, in that order."""
    t = trained
    return {
        key.TEST_ACC: t.last[key.TEST_ACC], key.TRAIN_LOSS: t.last[key.TRAIN_LOSS],
        key.TRAIN_ACC: t.last.get(key.TRAIN_ACC), **budget.summary(t.steps),
        key.STREAMS: streams, key.CHECKPOINT: checkpoint,
        key.CHECKPOINT_EPS_SPENT: (checkpoint or {}).get(key.EPS_SPENT),
        key.SAMPLES_PER_S: t.examples / t.train_s if t.train_s > 0 else None,
        key.PEAK_MEM_MB: peak_memory_mb(device),
        key.STEP_MS: 1000 * statistics.median(t.step_times) if t.step_times else None,
        key.ENGINE: cfg.engine.name, key.MODEL: cfg.model.name, **weights, key.DATASET: data.name,
        key.EPOCHS: t.epochs, key.WALL_S: time.time() - t_start, key.DEVICE: str(device), key.MACHINE: machine(),
        **commit, key.NAME: cfg.name, key.RESUMED: resumed, key.WARNINGS: t.warnings,
        key.CONFIG: OmegaConf.to_container(cfg, resolve=True),
    }


def _failed(cfg, data: Data, budget: Budget, e: Diverged, *, tracker, t_start: float, commit) -> UserError:
    """Mark the run failed — failed.json: the error, the steps spent and their ε (schema.FAILED) — and return the
    one-line error the CLI prints."""
    record = {key.STATUS: "failed", key.ERROR: f"training diverged: {e.what}", key.STEP: e.steps,
              **budget.summary(e.steps), key.ENGINE: cfg.engine.name, key.MODEL: cfg.model.name,
              key.DATASET: data.name, key.WALL_S: time.time() - t_start, **commit, key.NAME: cfg.name,
              key.CONFIG: OmegaConf.to_container(cfg, resolve=True)}
    path = tracker.fail(record)
    eps = record[key.EPS_SPENT]
    spent = "" if eps is None else f", eps spent {eps:.4g} (delta {budget.delta:.3g})"
    return UserError(f"training diverged in step {e.steps} of {budget.steps}: {e.what}{spent}; run marked failed "
                     f"in {path} (no summary.json); lower optimizer.lr")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available; use device=cpu or device=auto")
    return torch.device(name)


def _check_input(model, data, name: str, device) -> None:
    """One example through the model before training, so that a model/input mismatch (a timm model whose
    downsampling needs a larger image, a fixed img_size) is a one-line error rather than a traceback."""
    x = _example(data, device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except (RuntimeError, AssertionError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"model '{name}' cannot take the {tuple(x.shape[1:])} images of dataset '{data.name}' "
                        f"({first}); set dataset.image_size to a size the model accepts") from None
    finally:
        model.train(was)


def _example(data, device) -> torch.Tensor:
    """The first training example as a batch of one (its first view)."""
    x = data.train[0][0]
    return (x[0] if data.views > 1 else x).unsqueeze(0).to(device)


def _ema(model, decay):
    """An exponential moving average of the weights for evaluation: post-processing, free under DP.
    Copied before the engine attaches, so the copy is a plain module."""
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(copy.deepcopy(model), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

