"""run(cfg, run_dir) → summary: seed → data → privacy budget → model → engine → epochs → summary.json."""

from __future__ import annotations

import copy
import logging
import os
import statistics
import time

import torch
from omegaconf import OmegaConf
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dptrain import keys as key
from dptrain.config import check_paths, model_name, private, validate
from dptrain.data.datasets import Data, create_dataset
from dptrain.engines import ENGINES, PRECISIONS, Engine, create_engine
from dptrain.errors import Diverged, UserError, check_name
from dptrain.models.factory import checkpoint_provenance, create_model, data_config, grad_checkpointing
from dptrain.models.finetune import check_adapters_run, count_trainable, merge_lora, prepare, weights_from
from dptrain.privacy import CLIPPING
from dptrain.privacy.accounting import ACCOUNTANTS
from dptrain.privacy.sampling import PoissonSampler, ShuffleSampler
from dptrain.train import checkpoint as ckpt
from dptrain.train.allocator import keep_freed_memory
from dptrain.train.budget import SAMPLING, Budget, create_budget
from dptrain.train.distributed import SINGLE, Dist
from dptrain.train.epochs import Trained, bar_logging, train_epochs
from dptrain.train.ledger import METRIC_MODES, MetricNoise, TrainMetrics
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
    check_config(cfg)  # every check that needs no data, before anything loads
    streams = create_streams(cfg, restarts=dist.enabled or bool(cfg.resume))  # from cfg.seed, or OS entropy
    run_dir, resumed = _prepare(cfg, run_dir, dist)  # a resumed run's directory and state
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
    checkpoint, weights = _provenance(cfg, data, model)
    ema = _ema(model, cfg.privacy.ema)
    optimizer = create_optimizer(cfg.optimizer, model)
    scheduler = create_schedule(cfg.optimizer.schedule, optimizer, budget.steps)
    engine = _engine(cfg, model, optimizer, budget, streams, dist)
    sampler = _sampler(cfg, len(data.train), budget, streams, hooks, dist)
    if cfg.keep_freed_memory:  # ~1.7× faster CPU steps at batch 512, at a memory cost (allocator.py); set after the
        # data: the data preparation's freed buffers (features, statistics) go back to the OS
        keep_freed_memory(cfg.keep_freed_memory_max_gb)
    _log_setup(cfg, data, budget)

    tracker = _tracker(cfg, run_dir, dist)
    # random crops and flips at each step; stored views (features) are fixed: no augmentation stream
    augment = streams.generator("augment", *dist.substream) if cfg.dataset.augment and data.views == 1 else None
    saver = ckpt.Checkpointer(run_dir, every_s=cfg.checkpoint.every_s,
                              config=OmegaConf.to_container(cfg, resolve=True), commit=git[key.COMMIT], budget=budget,
                              model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, engine=engine,
                              sampler=sampler, augment=augment, t_start=t_start, dist=dist)
    saver.start(resumed)  # status.json "running"; a resumed run's state restored
    t_start = saver.t_start  # a resumed run's: its earlier parts' seconds included
    try:
        with bar_logging(cfg, dist):
            trained = train_epochs(cfg, engine, sampler, data, budget, model=model, ema=ema, scheduler=scheduler,
                                   tracker=tracker, augment=augment, device=device, memory_format=_memory_format(cfg),
                                   saver=saver, dist=dist, metrics=_train_metrics(cfg, budget, streams, dist),
                                   streams=streams)
    except Diverged as e:  # failed.json with the ε those steps spent; no model.pt, no summary.json
        err = _failed(cfg, data, budget, e, tracker=tracker, t_start=t_start, commit=git)
        saver.failed()
        raise err from None
    dist.check_replicas(model)
    if dist.is_main:
        # LoRA adapters merged: model.pt is the plain architecture (finetune.merge_lora)
        torch.save(merge_lora(engine.detach()).state_dict(), os.path.join(run_dir, "model.pt"))
    return dist.from_rank0(lambda: _finish(cfg, data, budget, trained, streams=streams, checkpoint=checkpoint,
                                           weights=weights, device=device, t_start=t_start, commit=git,
                                           tracker=tracker, saver=saver, dist=dist))  # rank 0's, on every rank


def _provenance(cfg, data: Data, model) -> tuple[dict | None, dict]:
    """Where the starting weights came from (a private run's ε composes with theirs) and what trains."""
    checkpoint = checkpoint_provenance(cfg.model.checkpoint, dataset=data.name)
    weights = {key.INIT: weights_from(model, pretrained=cfg.model.pretrained, checkpoint=cfg.model.checkpoint),
               key.TRAINABLE: cfg.model.trainable, key.TRAINABLE_PARAMS: count_trainable(model)}
    log.info("%s, model.trainable=%s", weights[key.INIT], cfg.model.trainable)
    return checkpoint, weights


def _budget(cfg, data: Data, streams, resumed: dict | None, dist: Dist) -> Budget:
    """q, steps and σ by rank 0's accountant (a resumed run: the σ its steps used); training takes exactly `steps`."""
    n = len(data.train)
    if resumed:
        return ckpt.resumed_budget(resumed, n=n, batch_size=cfg.batch_size)
    return dist.from_rank0(lambda: create_budget(cfg, n, secure=streams.secure, prior=data.prior,
                                                 num_classes=data.num_classes))


def _train_metrics(cfg, budget: Budget, streams, dist: Dist) -> TrainMetrics:
    """train/loss and train/acc as log.train_metrics says (ledger.py); a non-private run's exactly. The noise once,
    on rank 0's part of each step's sums."""
    mode = cfg.log.train_metrics if budget.private else "nonprivate"
    return TrainMetrics(mode=mode, clip=budget.loss_clip, noise_multiplier=budget.metrics_noise,
                        expected_batch_size=cfg.batch_size, noise=MetricNoise(streams, 0) if dist.is_main else None)


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


def check_config(cfg) -> None:
    """Every check of the config that needs no data, made once, first, by every run (`run`): keys and numbers
    (config.validate, also the CLI's check before torch loads), names, and what the settings need of each other.
    What needs the training set's size is budget.py's; the dataset's own names, data's."""
    validate(cfg)
    check_name("engine", cfg.engine.name, ENGINES)
    check_name("precision", cfg.precision, PRECISIONS)
    check_name("engine.clipping", cfg.engine.clipping, CLIPPING)
    _check_views(cfg)
    if private(cfg):  # a non-private run has no accountant, sampling rule or metric noise to name
        check_name("accountant", cfg.privacy.accountant, ACCOUNTANTS)
        check_name("privacy.sampling", cfg.privacy.sampling, SAMPLING)
        check_name("log.train_metrics", cfg.log.train_metrics, METRIC_MODES)
        check_name("log.val_metrics", cfg.log.val_metrics, METRIC_MODES)
        if cfg.eps is None and cfg.privacy.noise_multiplier is None:
            raise UserError("eps must be > 0 (got None), or give privacy.noise_multiplier")


def _check_views(cfg) -> None:
    """Augmentation multiplicity and the views it needs: fresh augmentations, or features' two fixed views."""
    ds, augmult = cfg.dataset, cfg.privacy.augmult
    if augmult > 1 and not ds.augment:
        raise UserError(f"privacy.augmult={augmult} needs dataset.augment=true (identical copies add nothing)")
    # features are computed once, before training: the only augmentation is a second fixed view per example (the
    # mirror image's features), and each step trains on both (augmentation multiplicity 2)
    if ds.features != "none" and ds.augment and augmult != 2:
        raise UserError(f"dataset.features={ds.features} with dataset.augment=true stores two fixed views of each "
                        f"example (the image and its mirror image): set privacy.augmult=2 (got {augmult}), or "
                        "dataset.augment=false")


def _prepare(cfg, run_dir: str, dist: Dist) -> tuple[str, dict | None]:
    """The run directory (a resumed run's own; rank 0's under torchrun) and a resumed run's checkpoint."""
    # resume=<run dir>: continue that run (checkpoint.py). Under torchrun rank 0 reads and checks its checkpoint
    # (on as many processes as wrote it) and sends it to every rank, each of which restores its own part
    resumed = dist.from_rank0(lambda: ckpt.load(cfg, world_size=dist.world_size)) if cfg.resume else None
    run_dir = dist.agree(str(cfg.resume) if cfg.resume else run_dir)  # rank 0's; the others write nothing there
    dist.check_same(OmegaConf.to_yaml(cfg), "config")
    if dist.is_main:
        os.makedirs(run_dir, exist_ok=True)
    return run_dir, resumed


def _data(cfg, streams) -> Data:
    """The dataset, at the input size and normalisation the model wants."""
    check_paths(cfg)  # dataset.root exists: a download would create it
    want = data_config(cfg.model.name, cfg.model.pretrained)
    ds = cfg.dataset
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
    return AveragedModel(copy.deepcopy(model), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

