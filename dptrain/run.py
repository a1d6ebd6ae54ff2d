"""run(cfg, run_dir) → summary: seed → data → privacy budget → model → engine → epochs → summary.json."""

from __future__ import annotations

import copy
import logging
import os
import statistics
import time

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from .allocator import keep_freed_memory
from .baselines import ENGINES, create_engine
from .data import create_dataset
from .errors import UserError
from .loop import evaluate, train_one_epoch
from .models import create_model, data_config
from .privacy.accounting import ACCOUNTANTS, default_delta, epsilon, noise_multiplier_for, steps_for
from .privacy.sampling import PoissonSampler, ShuffleSampler
from .seeding import create_streams
from .tracking import Tracker, git_commit, machine, peak_memory_mb

log = logging.getLogger("dptrain")
OPTIMIZERS = ("sgd", "adam")


def run(cfg, run_dir: str) -> dict:
    t_start, commit = time.time(), git_commit()  # the code that runs, even if HEAD moves meanwhile
    os.makedirs(run_dir, exist_ok=True)
    if cfg.keep_freed_memory:
        keep_freed_memory()  # ~1.7× faster CPU steps at batch 512, at a memory cost (allocator.py)
    streams = create_streams(cfg)  # every random stream from cfg.seed, or OS entropy (privacy/streams.py)
    torch.manual_seed(streams.seed_for("model"))
    device = _device(cfg.device)
    private = cfg.engine.name != "nonprivate"
    if cfg.engine.name not in ENGINES:
        raise UserError(f"unknown engine '{cfg.engine.name}'; valid: {', '.join(ENGINES)}")

    # data, at the input size and normalisation the model wants
    want = data_config(cfg.model.name, cfg.model.pretrained)
    ds = cfg.dataset
    if ds.features != "none" and (ds.augment or cfg.privacy.augmult > 1):
        raise UserError(f"dataset.features={ds.features} is computed once, before training: it cannot be combined "
                        "with dataset.augment or privacy.augmult (set them to false / 1)")
    data = create_dataset(ds.name, root=ds.root, image_size=ds.image_size or want.get("image_size"),
                          mean=want.get("mean"), std=want.get("std"), download=ds.download, cache=ds.cache,
                          val_fraction=ds.val_fraction, seed=cfg.seed, size=ds.size, num_classes=ds.num_classes,
                          channels=ds.channels, data_dir=cfg.data_dir, features=ds.features)
    n = len(data.train)

    # the privacy budget: q, steps and σ, fixed before training; training takes exactly `steps`
    budget = _budget(cfg, n, private)
    q, steps = budget["privacy/sample_rate"], budget["privacy/steps"]

    model = create_model(cfg.model.name, num_classes=data.num_classes, in_chans=data.in_chans,
                         img_size=cfg.model.img_size or data.image_size, pretrained=cfg.model.pretrained,
                         checkpoint=cfg.model.checkpoint, **cfg.model.kwargs).to(device)
    _check_input(model, data, cfg.model.name, device)
    fmt = torch.channels_last if cfg.model.channels_last else None  # NHWC: faster CPU convs, same values
    if fmt is not None:
        model = model.to(memory_format=fmt)
    ema = _ema(model, cfg.privacy.ema)
    optimizer = _optimizer(cfg.optimizer, model)
    scheduler = _schedule(cfg.optimizer.schedule, optimizer, steps)
    sigma = budget["privacy/noise_multiplier"]
    engine = create_engine(cfg.engine.name, model, optimizer, noise_multiplier=sigma or 0.0,
                           max_grad_norm=cfg.max_grad_norm, expected_batch_size=cfg.batch_size,
                           clipping=cfg.engine.clipping, gamma=cfg.engine.gamma, streams=streams,
                           augmult=cfg.privacy.augmult, passes=cfg.engine.passes)
    sampling = budget["privacy/sampling"] or "shuffle"
    sampler = (PoissonSampler(n, sample_rate=q, steps=steps, streams=streams) if sampling == "poisson"
               else ShuffleSampler(n, batch_size=cfg.batch_size, steps=steps, streams=streams))
    log.info("%s on %s (n=%d, %d classes, %dx%d) with %s: q=%.4g, %d steps, sigma=%s, delta=%s",
             cfg.model.name, data.name, n, data.num_classes, data.image_size, data.image_size, cfg.engine.name, q,
             steps, budget["privacy/noise_multiplier"], budget["privacy/delta"])

    tracker = Tracker(run_dir, logger=cfg.logger.name, project=cfg.logger.project, mode=cfg.logger.mode,
                      config=OmegaConf.to_container(cfg, resolve=True), name=cfg.name)
    per_epoch = max(1, round(n / cfg.batch_size))
    bar = tqdm(total=steps, disable=None if cfg.progress else True, dynamic_ncols=True, leave=False)
    aug = streams.generator("augment") if ds.augment else None
    it, done, seen, times, epoch, row = iter(sampler), 0, 0, [], 0, {}
    t_train = time.perf_counter()
    while done < steps:
        epoch += 1
        logical = [next(it) for _ in range(min(per_epoch, steps - done))]
        eps_so_far = row.get("privacy/eps_spent")

        def on_step(loss, ex, secs, base=seen, epoch=epoch, eps=eps_so_far):
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}", eps=eps,
                            samples_s=f"{(base + ex) / max(time.perf_counter() - t_train, 1e-9):.0f}")

        stats = train_one_epoch(engine, data.train, logical, physical_batch_size=cfg.physical_batch_size,
                                device=device, num_workers=ds.num_workers, augment_gen=aug,
                                augmult=cfg.privacy.augmult, ema=ema, scheduler=scheduler, memory_format=fmt,
                                on_step=on_step)
        done += len(logical)
        seen += stats["examples"]
        times += stats["step_times"]
        test = evaluate(ema.module if ema is not None else model, data.test, device=device,
                        num_workers=ds.num_workers)
        row = {"epoch": epoch, "step": done, "train/loss": stats["loss"], "test/acc": test["acc"],
               "test/loss": test["loss"], "privacy/eps_spent": _spent(budget, done)}
        tracker.log(row)
        bar.set_postfix(epoch=epoch, loss=f"{stats['loss']:.3f}", eps=row["privacy/eps_spent"],
                        acc=f"{test['acc']:.3f}")
    bar.close()
    train_s = time.perf_counter() - t_train
    plain = engine.detach()
    torch.save(plain.state_dict(), os.path.join(run_dir, "model.pt"))

    summary = {
        "test/acc": row["test/acc"], "train/loss": row["train/loss"], **budget, **streams.summary(),
        "privacy/eps_spent": _spent(budget, done),
        "perf/samples_per_s": seen / train_s if train_s > 0 else None,
        "perf/peak_mem_mb": peak_memory_mb(device),
        "perf/step_ms": 1000 * statistics.median(times) if times else None,
        "engine": cfg.engine.name, "model": cfg.model.name, "dataset": data.name, "epochs": epoch,
        "wall_s": time.time() - t_start, "device": str(device), "machine": machine(), "commit": commit,
        "name": cfg.name, "config": OmegaConf.to_container(cfg, resolve=True),
    }
    tracker.finish(summary)
    return summary


def _budget(cfg, n: int, private: bool) -> dict:
    """Validate the privacy inputs and fix (q, steps, σ, δ) before training."""
    L = cfg.batch_size
    if not 1 <= L <= n:
        raise UserError(f"batch_size={L} must be between 1 and the training set size n={n}")
    if cfg.physical_batch_size < 1:
        raise UserError(f"physical_batch_size must be >= 1, got {cfg.physical_batch_size}")
    if not cfg.epochs > 0:
        raise UserError(f"epochs must be > 0, got {cfg.epochs}")
    if not cfg.max_grad_norm > 0:
        raise UserError(f"max_grad_norm must be > 0, got {cfg.max_grad_norm}")
    if cfg.privacy.augmult < 1 or (cfg.privacy.augmult > 1 and not cfg.dataset.augment):
        raise UserError(f"privacy.augmult={cfg.privacy.augmult} needs an integer >= 1, and dataset.augment=true "
                        "when > 1 (identical copies add nothing)")
    q = L / n
    steps = steps_for(cfg.epochs, q)
    keys = ["privacy/eps", "privacy/delta", "privacy/noise_multiplier", "privacy/accountant", "privacy/sampling",
            "privacy/eps_guaranteed"]
    budget = dict.fromkeys(keys)
    budget.update({"privacy/sample_rate": q, "privacy/steps": steps})
    if not private:
        return budget
    p = cfg.privacy
    if p.accountant not in ACCOUNTANTS:
        raise UserError(f"unknown accountant '{p.accountant}'; valid: {', '.join(ACCOUNTANTS)}")
    if p.sampling not in ("poisson", "shuffle"):
        raise UserError(f"unknown privacy.sampling '{p.sampling}'; valid: poisson, shuffle")
    delta = cfg.delta if cfg.delta is not None else default_delta(n)
    if not 0 < delta < 1 / n:
        raise UserError(f"delta={delta} must be in (0, 1/n) = (0, {1 / n:.3g}) for n={n} training examples")
    sigma = p.noise_multiplier
    if sigma is None:
        if cfg.eps is None or not cfg.eps > 0:
            raise UserError(f"eps must be > 0 (got {cfg.eps}), or give privacy.noise_multiplier")
        try:
            sigma = noise_multiplier_for(eps=cfg.eps, delta=delta, sample_rate=q, steps=steps, accountant=p.accountant)
        except ValueError as e:
            raise UserError(f"cannot reach eps={cfg.eps} in {steps} steps at q={q:.4g}: {e}") from None
    elif sigma <= 0:
        raise UserError(f"privacy.noise_multiplier must be > 0, got {sigma}")
    if p.sampling == "shuffle":
        log.warning("privacy.sampling=shuffle: fixed-size shuffled batches are NOT what the accountant assumes; "
                    "the reported eps is not a guarantee")
    budget.update({"privacy/eps": cfg.eps if p.noise_multiplier is None else None, "privacy/delta": delta,
                   "privacy/noise_multiplier": sigma, "privacy/accountant": p.accountant,
                   "privacy/sampling": p.sampling, "privacy/eps_guaranteed": p.sampling == "poisson"})
    return budget


def _spent(budget: dict, steps: int) -> float | None:
    if budget["privacy/noise_multiplier"] is None:
        return None
    return epsilon(noise_multiplier=budget["privacy/noise_multiplier"], sample_rate=budget["privacy/sample_rate"],
                   steps=steps, delta=budget["privacy/delta"], accountant=budget["privacy/accountant"])


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available; use device=cpu or device=auto")
    return torch.device(name)


def _optimizer(o, model):
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    raise UserError(f"unknown optimizer '{o.name}'; valid: {', '.join(OPTIMIZERS)}")


def _check_input(model, data, name: str, device) -> None:
    """One example through the model before training, so that a model/input mismatch (a timm model whose
    downsampling needs a larger image, a fixed img_size) is a one-line error rather than a traceback."""
    x = data.train[0][0].unsqueeze(0).to(device)
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


def _schedule(name: str, optimizer, steps: int):
    """Learning-rate schedule over the run's optimizer steps (one per logical batch)."""
    if name == "constant":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    raise UserError(f"unknown optimizer.schedule '{name}'; valid: constant, cosine")


def _ema(model, decay):
    """An exponential moving average of the weights for evaluation: post-processing, free under DP.
    Copied before the engine attaches, so the copy is a plain module."""
    if decay is None:
        return None
    if not 0 < decay < 1:
        raise UserError(f"privacy.ema must be in (0, 1), got {decay}")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(copy.deepcopy(model), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

