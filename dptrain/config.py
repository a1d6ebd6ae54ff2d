"""Typed config: dataclass schemas in Hydra's ConfigStore, so a misspelled key fails at compose time.
YAML files under conf/ only fill in values."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from dptrain.errors import UserError, check_range

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo: <repo>/dptrain/config.py
CONF_DIR = os.path.join(ROOT, "conf")


def conf_options(group: str, conf_dir: str = CONF_DIR) -> list[str]:
    """The options of a conf group (conf/<group>/*.yaml), sorted: the one list of its names."""
    d = os.path.join(conf_dir, group)
    return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".yaml")) if os.path.isdir(d) else []


def _open_dict():
    """An empty dict node that stays open to new keys after Hydra sets the config struct (Hydra closes every dict,
    which made `model.kwargs.patch_size=4` fail with "Key 'patch_size' is not in struct" unless written with +)."""
    return OmegaConf.create({}, flags={"struct": False})


@dataclass
class LoraConfig:
    """model.trainable=lora: low-rank adapters (Hu et al. 2021, via peft) on the modules named by `targets` (peft's
    target_modules: a name or a dotted suffix of one). The default targets are the attention output and MLP layers of
    timm's ViT/BEiT/DeiT/Swin blocks: timm's BEiT attention calls F.linear(x, qkv.weight) itself, so an adapter on its
    `qkv` would never run (refused, finetune.py). For CNNs name convs, e.g. [conv1, conv2] for a ResNet."""

    rank: int = 8
    alpha: float = 16.0  # the update is B·A·alpha/rank
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attn.proj", "mlp.fc1", "mlp.fc2"])


@dataclass
class ModelConfig:
    name: str = "cnn"  # a conf/model name's timm model, any timm name, or "cnn"
    pretrained: bool = False  # timm's weights (needs network or a warm cache)
    checkpoint: str | None = None  # a local weights file (state_dict, or {"state_dict"|"model": ...})
    img_size: int | None = None  # for models that take it (ViT, BEiT); default: the data's image size
    # passed to timm.create_model / the CNN; open (not struct): model.kwargs.<arg>=... needs no leading +
    kwargs: dict[str, Any] = field(default_factory=lambda: _open_dict())
    channels_last: bool = False  # NHWC weights and inputs: ~10-20% faster conv steps on CPU (bench), same values
    grad_checkpointing: bool = False  # timm's activation checkpointing: less activation memory, one more forward
    # what trains (finetune.py): all | head (linear probe) | bias (DP-BiTFiT, Bu et al. 2022: every bias + the head)
    # | lora (adapters of model.lora + the head); the rest is frozen before the engine attaches
    trainable: str = "all"
    head_init: str = "default"  # the new classifier head: default (timm's / the model's init) | zero (weights and bias)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DatasetConfig:
    name: str = "digits"  # digits, cifar10, cifar100, folder, fake
    root: str | None = None  # cifar download dir / folder with train/ and test/
    image_size: int | None = None  # resize to; default: native, or the pretrained model's input size
    download: bool = True  # cifar: download when absent (needs network)
    num_workers: int = 0  # DataLoader workers for datasets decoded on the fly
    cache: bool = True  # decode small image datasets once into memory
    val_fraction: float = 0.0  # >0: hold out part of train as "test" (tune on it, not on the test split)
    augment: bool = False  # random crop (pad 4) + horizontal flip on each physical batch
    # test-time augmentation: evaluate on each held-out image and its mirror image, averaging the softmax (with
    # features: the mirror image's features, computed once; needs augment). Post-processing: no privacy cost
    tta: bool = False
    features: str = "none"  # none | scattering: a fixed ScatterNet transform, computed once (Tramèr & Boneh 2021)
    # none | dp: standardise each channel by a DP estimate of its mean and variance over the training examples
    # (two Gaussian mechanisms, noise normalize_noise × clip normalize_clip; their ε composes with training's)
    normalize: str = "none"
    normalize_noise: float = 8.0  # σ of each of the two statistics (Tramèr & Boneh's 8)
    normalize_clip: float = 2.0  # L2 bound on an example's per-channel means (and mean squares); data-independent
    # dataset=fake only (conf/dataset/fake.yaml sets them): null under a real dataset, whose data says them
    size: int | None = None  # training examples (test: a quarter)
    num_classes: int | None = None
    channels: int | None = None


@dataclass
class EngineConfig:
    name: str = "mixed_ghost"  # mixed_ghost, ghost, per_sample, opacus, opacus_ghost, nonprivate
    clipping: str = "abadi"  # abadi: min(1, R/‖g‖); automatic: R/(‖g‖+γ)
    gamma: float = 0.01  # automatic clipping's stability constant
    passes: int = 1  # 1: book-keeping, one backward; 2: norm pass, recomputed forward, clipped pass (less memory)


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd (momentum), adam
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant, cosine (lr → 0 over the run's steps; post-processing, free under DP)


@dataclass
class PrivacyConfig:
    accountant: str = "prv"  # prv, rdp, gdp
    sampling: str = "poisson"  # poisson (accounted), shuffle (NOT DP-accounted; ε reported as not guaranteed)
    noise_multiplier: float | None = None  # σ; derived from (eps, delta, q, steps) unless given
    secure: bool = False  # sampler AND noise from OS entropy (a CSPRNG) on every draw, not from `seed` (streams.py)
    secure_noise: bool | None = None  # deprecated alias: true means secure=true (seeding.py says why)
    augmult: int = 1  # augmentation multiplicity K: K augmented copies of each example, one clipped gradient
    ema: float | None = None  # exponential moving average of the weights for evaluation (e.g. 0.999)


@dataclass
class LoggerConfig:
    name: str = "none"  # none, wandb
    project: str = "dptrain"
    mode: str = "offline"  # wandb mode unless WANDB_MODE is set: offline, online, disabled


@dataclass
class LogConfig:
    """What a run releases besides the model, and at what privacy cost (ledger.py, summary.json privacy/ledger)."""

    # train/loss and train/acc: dp (clipped per-example loss and correctness summed with Gaussian noise in every
    # step, inside ε), none (not released), nonprivate (exact; ε then excludes them, and says so)
    train_metrics: str = "dp"
    val_metrics: str = "dp"  # the same for a held-out split of the private training set (dataset.val_fraction > 0)
    metrics_eps_fraction: float = 0.02  # each dp metric release costs this share of ε (the rest calibrates σ)
    loss_clip_factor: float = 2.0  # an example's loss is clipped to this × log(num_classes) (chance level's loss)


@dataclass
class CheckpointConfig:
    # checkpoint.pt in the run directory at every epoch end and at least every `every_s` seconds of training
    # (checkpoint.py); 0: no checkpoints at all (a killed run cannot be resumed)
    every_s: float = 300.0


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eps: float | None = 3.0  # target ε
    delta: float | None = None  # default: 1e-5 if below 1/n, else 1/(10 n); recorded
    epochs: float = 15.0  # may be fractional; steps = round(epochs / q)
    batch_size: int = 256  # logical (expected) batch size L; q = L / n
    physical_batch_size: int = 128  # memory chunk; never changes the privacy or the update
    max_grad_norm: float = 1.0  # per-example clipping bound R
    seed: int = 0  # every random stream (init, sampling, noise, augmentation) is spawned from it
    device: str = "auto"  # auto, cpu, cuda
    # fp32 (default); bf16: the forward under autocast, norms/clipping/noise/optimizer in float32 (the GPU choice:
    # same range as fp32, no loss scaling); fp16: as bf16 plus a static loss scale (older GPUs without bf16)
    precision: str = "fp32"
    progress: bool = True  # a progress bar on the terminal (epoch, loss, eps spent, samples/s)
    eval_every: int = 1  # evaluate after every N-th epoch and after the last; 0: the last only (test read once)
    keep_freed_memory: bool = False  # CPU: reuse freed buffers (faster large batches, more peak RSS; allocator.py)
    keep_freed_memory_max_gb: float = 6.0  # its cap: past this peak RSS (GB), freed buffers go back to the OS after all
    data_dir: str = "data"  # where cifar is downloaded / looked for, relative to the launch directory
    name: str = "train"  # run name: outputs/<name>/..., and the table name in reports
    resume: str | None = None  # a run directory: continue that run from its checkpoint.pt, with its saved config


# Every numeric knob's range, checked by `validate` at start, before the data loads: nan, inf and out-of-range
# values are one-line errors there, not a hang in the accountant or a run of NaN weights. A knob typed
# `X | None` may also be None. A test checks that every int/float field of TrainConfig is here or in UNRANGED.
RANGES = {
    "eps": "(0, inf)", "delta": "(0, 1)",  # δ < 1/n is checked once n is known (budget.py)
    "privacy.noise_multiplier": "(0, inf)", "max_grad_norm": "(0, inf)", "engine.gamma": "(0, inf)",
    "epochs": "(0, inf)", "batch_size": "[1, inf)", "physical_batch_size": "[1, inf)", "privacy.augmult": "[1, inf)",
    "privacy.ema": "(0, 1)",
    "optimizer.lr": "[0, inf)", "optimizer.momentum": "[0, 1)", "optimizer.weight_decay": "[0, inf)",
    "dataset.val_fraction": "[0, 1)", "dataset.size": "[1, inf)", "dataset.num_classes": "[2, inf)",
    "dataset.channels": "[1, inf)", "dataset.image_size": "[1, inf)", "dataset.num_workers": "[0, inf)",
    "model.img_size": "[1, inf)", "checkpoint.every_s": "[0, inf)", "eval_every": "[0, inf)",
    "keep_freed_memory_max_gb": "(0, inf)",
    "dataset.normalize_noise": "(0, inf)", "dataset.normalize_clip": "(0, inf)",
    "model.lora.rank": "[1, inf)", "model.lora.alpha": "(0, inf)", "model.lora.dropout": "[0, 1)",
    "log.metrics_eps_fraction": "(0, 0.25)", "log.loss_clip_factor": "(0, inf)",
}
UNRANGED = {"seed": "seeding.create_streams", "engine.passes": "create_engine: a choice, 1 or 2"}  # checked there


def numeric_fields(cls=None, prefix: str = "") -> dict[str, bool]:
    """Dotted path → whether None is allowed, for every int/float field of TrainConfig (nested configs too)."""
    cls = cls or TrainConfig
    out, hints = {}, typing.get_type_hints(cls)
    for f in fields(cls):
        t = hints[f.name]
        if is_dataclass(t):
            out |= numeric_fields(t, f"{prefix}{f.name}.")
            continue
        args = set(t.__args__) if isinstance(t, types.UnionType) else {t}
        if args - {type(None)} <= {int, float} and args != {type(None)}:
            out[prefix + f.name] = type(None) in args
    return out


def validate(cfg) -> None:
    """Raise a UserError (one line) for a key the schema does not know (`+epoch=1`, Hydra's own suggestion for a
    misspelled key, would otherwise be accepted and ignored) or the first numeric knob outside its RANGES entry."""
    schema = OmegaConf.get_type(cfg) if OmegaConf.is_config(cfg) else None  # TrainConfig, or a subclass (audit)
    schema = schema if isinstance(schema, type) and issubclass(schema, TrainConfig) else TrainConfig
    _check_known(OmegaConf.to_container(cfg, resolve=False), schema(), "", UserError)
    nullable = numeric_fields()
    for path, interval in RANGES.items():
        check_range(path, OmegaConf.select(cfg, path), interval, optional=nullable[path])


def private(cfg) -> bool:
    """Whether the run trains privately: every engine but engine=nonprivate clips and adds noise."""
    return cfg.engine.name != "nonprivate"


def check_paths(cfg) -> None:
    """A path the user gave that must exist does (torchvision's download would otherwise create dataset.root, at
    the filesystem root for `dataset.root=/nonexistent`). Separate from `validate`: it is about this machine,
    not the command line (tests/test_readme.py validates the README's commands, whose folders are placeholders)."""
    root = OmegaConf.select(cfg, "dataset.root")
    if root and not os.path.isdir(os.path.expanduser(str(root))):
        raise UserError(f"dataset.root={root}: directory not found (dptrain reads it, never creates it; for a "
                        f"download into a new folder, create it first)")


def _check_known(node: dict, schema, prefix: str, error) -> None:
    if not dataclasses.is_dataclass(schema):
        return  # free-form dicts (model.kwargs) take any key
    fields = {f.name: getattr(schema, f.name) for f in dataclasses.fields(schema)}
    for k, v in node.items():
        if k not in fields:
            near = difflib.get_close_matches(k, fields, n=1)
            raise error(f"unknown config key '{prefix}{k}'" + (f"; did you mean '{prefix}{near[0]}'?" if near else
                                                                f"; valid: {', '.join(fields)}"))
        if isinstance(v, dict):
            _check_known(v, fields[k], f"{prefix}{k}.", error)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    # conf/train.yaml's hydra.run.dir and output_subdir: `resume=<run dir>` runs in that run's directory, and keeps
    # its first .hydra/ (the original command) beside the resumes' own
    OmegaConf.register_new_resolver("dptrain_run_dir", lambda resume, new: resume or new, replace=True)
    OmegaConf.register_new_resolver("dptrain_hydra_subdir", lambda resume, now: f".hydra/resume-{now}" if resume
                                    else ".hydra", replace=True)


def model_name(model: dict, image_size: int | None = None) -> str:
    """What ran, not only the timm name: `vit_tiny_patch16_224 (patch_size=4) at 32x32` — a kwarg overrides what
    the name says. The built-in CNNs' kwargs are their conf defaults (conf/model/cnn.yaml): left out."""
    name, kwargs = model.get("name"), dict(model.get("kwargs") or {})
    out = str(name)
    if kwargs and name not in ("cnn", "scatter_cnn"):
        out += " (" + ", ".join(f"{k}={v}" for k, v in kwargs.items()) + ")"
    size = model.get("img_size") or image_size
    return out + (f" at {size}x{size}" if size else "")
