"""create_model: timm.create_model (or the small CNN) + BatchNorm→GroupNorm + head + checkpoint loading."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import os

import timm
import torch
from omegaconf import OmegaConf
from torch import nn

from dptrain import keys as key
from dptrain.config import CONF_DIR, conf_options
from dptrain.errors import UserError

log = logging.getLogger("dptrain.models")

BUILT_IN = ("cnn", "scatter_cnn")  # the models defined here; every other name is timm's


@functools.cache
def conf_models() -> dict[str, str]:
    """conf/model/<option>.yaml → the model.name it sets: the conf names, the one list of them (a run composes
    model=<option> into its model.name; create_model also takes the option itself, as the bench does)."""
    return {o: OmegaConf.load(os.path.join(CONF_DIR, "model", f"{o}.yaml")).name for o in conf_options("model")}


class CNN(nn.Module):
    """The end-to-end CNN of Papernot et al. 2021 / Tramèr & Boneh 2021 (59.2% on CIFAR-10 at ε=3):
    per stage two 3×3 convs then 2×2 max-pool; then a hidden fc layer and the classifier. tanh, as those
    papers found best under DP. The last feature map is average-pooled to `pool`×`pool` and flattened: at 32×32
    input with pool 4 that is the identity (the papers flatten 128×4×4 = 2048 features into the hidden layer);
    adaptive pooling lets the same model take 8×8 digits."""

    def __init__(self, num_classes=10, in_chans=3, channels=(32, 64, 128), hidden=128, act="tanh", norm="none",
                 pool=4):
        super().__init__()
        acts = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
        if act not in acts:
            raise UserError(f"unknown model.kwargs.act '{act}'; valid: {', '.join(acts)}")
        layers, c = [], in_chans
        for out in channels:
            for _ in range(2):
                layers.append(nn.Conv2d(c, out, 3, padding=1))
                if norm == "group":
                    layers.append(nn.GroupNorm(min(16, out), out))
                layers.append(acts[act]())
                c = out
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(pool * pool * c, hidden), acts[act](),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.head(self.pool(self.features(x)))


class ScatterCNN(nn.Module):
    """The CNN that Tramèr & Boneh 2021 train on ScatterNet features (CIFAR-10, ε = 3: 69.3% with DP data
    normalisation): norm="group" — GroupNorm(groups, affine=False), the variant they use for Fashion-MNIST, which
    spends no privacy budget — or norm="none" for features standardised by dataset.normalize=dp (their CIFAR-10
    variant); on the (81·C, H/4, W/4) features, conv-pool-conv of `width` channels, tanh, and a linear
    classifier on the flattened map. Needs dataset.features=scattering."""

    def __init__(self, num_classes=10, in_chans=243, img_size=8, width=64, groups=27, act="tanh", norm="group"):
        super().__init__()
        if norm not in ("group", "none"):
            raise UserError(f"unknown model.kwargs.norm '{norm}'; valid: group (GroupNorm of `groups` groups), none "
                            "(the features come standardised: dataset.normalize=dp)")
        if norm == "group" and in_chans % groups:
            raise UserError(f"scatter_cnn takes ScatterNet features (dataset.features=scattering): {in_chans} input "
                            f"channels do not split into model.kwargs.groups={groups} groups")
        acts = {"tanh": nn.Tanh, "relu": nn.ReLU}
        if act not in acts:
            raise UserError(f"unknown model.kwargs.act '{act}'; valid: {', '.join(acts)}")
        a = acts[act]
        self.norm = nn.GroupNorm(groups, in_chans, affine=False) if norm == "group" else nn.Identity()
        self.features = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), a(), nn.MaxPool2d(2),
                                      nn.Conv2d(width, width, 3, padding=1), a())
        self.head = nn.Linear(width * (img_size // 2) ** 2, num_classes)  # 64·4·4 features on CIFAR (8×8 maps)

    def forward(self, x):
        return self.head(self.features(self.norm(x)).flatten(1))


def fix_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace every BatchNorm — any `_BatchNorm` subclass, timm's BatchNormAct2d (EfficientNet, MobileNetV3,
    RegNet, DenseNet…) included, which Opacus' ModuleValidator.fix misses — by GroupNorm with gcd(32, C) groups
    (Opacus' choice): BatchNorm mixes the examples of a batch, so per-example gradients are undefined under it.
    timm's fused activation and dropout are kept after the GroupNorm. Returns (model, number replaced)."""
    n = 0

    def convert(bn: nn.Module) -> nn.Module:
        gn = nn.GroupNorm(math.gcd(32, bn.num_features), bn.num_features, affine=bn.affine)
        act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)  # timm BatchNormAct2d
        if isinstance(act, nn.Module) or isinstance(drop, nn.Module):
            return nn.Sequential(gn, *(m for m in (drop, act) if isinstance(m, nn.Module)))
        return gn

    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        return convert(model), 1
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model, 0
    model = copy.deepcopy(model)  # the caller's model stays as it was (e.g. to load a BatchNorm checkpoint)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, convert(child))
                n += 1
    return model, n


def timm_name(name: str) -> str:
    return conf_models().get(name, name)


def data_config(name: str, pretrained: bool) -> dict:
    """The input size and normalisation a pretrained timm model expects ({} for from-scratch models)."""
    if not pretrained or timm_name(name) in BUILT_IN:
        return {}
    cfg = timm.models.get_pretrained_cfg(timm_name(name))
    if cfg is None:
        return {}
    return {"image_size": cfg.input_size[-1], "mean": tuple(cfg.mean), "std": tuple(cfg.std)}


def create_model(name: str, *, num_classes: int, in_chans: int = 3, img_size: int | None = None,
                 pretrained: bool = False, checkpoint: str | None = None, fix_bn: bool = True, **kwargs) -> nn.Module:
    name = timm_name(name)
    if name == "timm":  # conf/model/timm.yaml's placeholder: the user gave no name
        raise UserError("model=timm needs a timm model name: dptrain model=timm model.name=<name> (e.g. convnext_atto; "
                        "python -c 'import timm; print(timm.list_models())')")
    if pretrained and name in BUILT_IN:
        raise UserError(f"model={name} has no pretrained weights: train it from scratch (regime=scratch, or "
                        "model.pretrained=false)")
    pretrained = pretrained and not checkpoint  # model.checkpoint's weights replace timm's: no download
    if name == "cnn":
        model = CNN(num_classes=num_classes, in_chans=in_chans, **kwargs)
    elif name == "scatter_cnn":
        model = ScatterCNN(num_classes=num_classes, in_chans=in_chans, img_size=img_size or 8, **kwargs)
    else:
        model = _timm(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, pretrained=pretrained,
                      **kwargs)
    if not fix_bn:
        if checkpoint:
            load_checkpoint(model, checkpoint)
        return model
    fixed, n = fix_batchnorm(model)
    lost = n if pretrained else 0  # BatchNorm weights of timm's that GroupNorm cannot take
    if checkpoint:
        try:  # a checkpoint of a dptrain run (GroupNorm) ...
            load_checkpoint(fixed, checkpoint)
        except UserError:  # ... or of the original architecture (BatchNorm), converted after loading
            load_checkpoint(model, checkpoint)
            fixed, lost = fix_batchnorm(model)
    if lost:  # finetune.weights_from says so in summary.json and the final line
        log.warning("converted %d pretrained BatchNorm layers to GroupNorm (per-example gradients need it): they "
                    "start afresh, so the network is not the pretrained one any more", lost)
    elif n:
        log.info("converted %d BatchNorm layers to GroupNorm (per-example gradients need it)", n)
    fixed.batchnorm_replaced = lost  # a plain attribute (not state), for finetune.weights_from
    return fixed


def _timm(name, *, num_classes, in_chans, img_size, pretrained, **kwargs):
    if not timm.is_model(name):
        raise UserError(f"unknown model '{name}'; conf names: {', '.join(conf_models())}; or any timm name "
                        "(python -c 'import timm; print(timm.list_models())')")
    if kwargs and set(kwargs) <= {"channels", "hidden", "act", "norm", "pool"}:
        raise UserError(f"model.kwargs {dict(kwargs)} are the small CNN's settings (conf/model/cnn.yaml); for a timm "
                        f"model pick its group: dptrain model=timm model.name={name}")
    kw = dict(num_classes=num_classes, in_chans=in_chans, **kwargs)
    if pretrained:
        log.info("loading timm's pretrained weights of %s (Hugging Face cache, else the hub)", name)
    try:
        with _quiet_hub():
            try:
                return timm.create_model(name, pretrained=pretrained, **kw,
                                         **({"img_size": img_size} if img_size else {}))
            except TypeError:  # a model that takes no img_size (CNNs are size-agnostic)
                return timm.create_model(name, pretrained=pretrained, **kw)
    except TypeError as e:
        raise UserError(f"model '{name}' rejected model.kwargs {dict(kwargs)}: {e}") from None
    except (OSError, RuntimeError) as e:
        if pretrained:
            raise UserError(_weights_missing(name, e)) from None
        raise


@contextlib.contextmanager
def _quiet_hub():
    """The Hugging Face hub's per-retry warnings (~20 lines over ~45 s offline without HF_HUB_OFFLINE=1) kept off the
    console: a failed load ends in _weights_missing's one line."""
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.setLevel(level)


def _weights_missing(name: str, e: Exception) -> str:
    """The one line for pretrained weights that cannot be had (offline, no cache): which weights, and the ways out.
    timm fetches them from the Hugging Face hub into its cache ($HF_HOME/hub) once; HF_HUB_OFFLINE=1 reads that
    cache without asking the network (otherwise each file is retried for ~1 min before this error)."""
    cfg = timm.models.get_pretrained_cfg(name)
    where = ((cfg.hf_hub_id and f"hf-hub:{cfg.hf_hub_id}") or cfg.url or cfg.file) if cfg else None
    if where is None or "No pretrained weights exist" in str(e):
        return (f"timm has no pretrained weights for '{name}': train it from scratch with regime=scratch, or give "
                "a weights file with model.checkpoint=<file>")
    return (f"cannot load the pretrained weights of '{name}' ({where}; {type(e).__name__}: offline, or not in the "
            "Hugging Face cache): go online once (they are cached; later runs can set HF_HUB_OFFLINE=1), or point "
            "HF_HOME at a cache that holds them, or give a weights file with model.checkpoint=<file>, or train from "
            "scratch with regime=scratch (model.pretrained=false keeps the fine-tuning recipe)")


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a local weights file: a state_dict, or a dict holding one under 'state_dict', 'model' or
    'model_state_dict'. Keys whose shapes differ (a classifier head for another number of classes) are
    skipped and logged; every other key must match."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint '{path}' (corrupt or not a torch file): {type(e).__name__}") from None
    for k in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(k), dict):
            obj = obj[k]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"checkpoint '{path}' holds no state_dict")
    obj = {k.removeprefix("module.").removeprefix("_module."): v for k, v in obj.items()}
    own = model.state_dict()
    skipped = [k for k, v in obj.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in obj.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        raise UserError(f"checkpoint '{path}' does not match the model: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    log_loaded(path, skipped, own)


def log_loaded(path: str, skipped: list[str], own: dict) -> None:
    """INFO when every tensor loaded; a WARNING naming the skipped ones (a shape that differs: usually the head for
    another number of classes) and their share of the model's values, so a stem that did not fit is not a
    footnote: a run that trains most of its weights from scratch is not the fine-tuning it claims to be."""
    if not skipped:
        log.info("loaded checkpoint %s", path)
        return
    total = sum(v.numel() for v in own.values()) or 1
    share = sum(own[k].numel() for k in skipped) / total
    names = ", ".join(skipped[:8]) + (f" and {len(skipped) - 8} more" if len(skipped) > 8 else "")
    log.warning("checkpoint %s: %d tensor(s) of a different shape NOT loaded, %.1f%% of the model's values, "
                "trained from scratch: %s", path, len(skipped), 100 * share, names)


# what a checkpoint's provenance keeps of the summary.json beside it (schema.py's key strings)
PROVENANCE = (key.EPS_SPENT, key.EPS, key.DELTA, key.ACCOUNTANT, key.EPS_GUARANTEED, key.STEPS, key.DATASET, key.MODEL,
              key.ENGINE, key.NAME, key.COMMIT, key.CHECKPOINT)


def checkpoint_provenance(path: str | None, *, dataset: str) -> dict | None:
    """Where model.checkpoint's weights came from, for this run's summary: when the file sits in a dptrain run
    directory (its model.pt beside its summary.json), that run's ε, δ, dataset, ... — and its own checkpoint's,
    so a chain of continued runs stays visible. Training on weights that were trained privately is fine only on
    other data: where the data overlap, the two runs' budgets compose (ε and δ add up at most), and this run's
    privacy/eps_spent counts this run alone. Says so as a warning."""
    if not path:
        return None
    summary_path = os.path.join(os.path.dirname(os.path.abspath(path)), "summary.json")
    prov = {"path": os.path.abspath(path), "summary": None}
    if not os.path.isfile(summary_path):
        log.info("model.checkpoint %s: no dptrain summary.json beside it; if its weights were trained on private "
                 "data, that cost is not counted here", path)
        return prov
    try:
        s = json.load(open(summary_path))
    except (OSError, ValueError) as e:
        log.warning("model.checkpoint %s: unreadable summary.json beside it (%s)", path, type(e).__name__)
        return prov
    prov["summary"] = summary_path
    prov |= {k: s.get(k) for k in PROVENANCE}
    eps = s.get(key.EPS_SPENT)
    spent = f"spent eps={eps:.4g} (delta={s.get(key.DELTA)})" if eps is not None else "trained WITHOUT privacy"
    log.warning("model.checkpoint comes from a dptrain run (%s) that %s on dataset '%s'; this run trains on '%s'. "
                "Where the data overlap, the budgets compose (eps and delta add up at most): this run's eps_spent "
                "counts this run only", summary_path, spent, s.get(key.DATASET), dataset)
    return prov


def grad_checkpointing(model: nn.Module, name: str) -> nn.Module:
    """Activation checkpointing (timm's set_grad_checkpointing: each block's activations recomputed in the backward)
    — less activation memory for one more forward of each block. The privacy engine clips exactly through it."""
    if not hasattr(model, "set_grad_checkpointing"):
        raise UserError(f"model.grad_checkpointing=true: '{name}' has no set_grad_checkpointing (timm models do); "
                        "use model.grad_checkpointing=false")
    model.set_grad_checkpointing(True)
    return model

