"""One bench step: an engine label → a model, engine and batch (`build`), its timed step, interleaved step times."""

from __future__ import annotations

import statistics
import sys
import time

import torch

from dptrain.engines import create_engine
from dptrain.errors import first_line
from dptrain.models.factory import create_model, grad_checkpointing
from dptrain.models.finetune import set_trainable

# bench-only names: a BEiT of vit_tiny's size (dim 192, depth 12, 3 heads; relative position bias, layer scale)
SIZED = {"beit_tiny": ("beit_base", {"embed_dim": 192, "num_heads": 3})}


def build(model_name: str, size: int, engine: str, batch: int, device: torch.device, seed: int = 0, dist=None,
          expected_batch_size: int | None = None, trainable: str = "all"):
    """trainable: model.trainable's subset (finetune.py; lora with conf's default LoraConfig), frozen before the
    engine attaches, as a run does."""
    from dptrain.config import LoraConfig  # Hydra: gpu_check imports this module before its kit installs Hydra

    ckpt = "_ckpt" in engine  # <engine>_ckpt: with the model's activation checkpointing
    engine = engine.replace("_ckpt", "")
    torch.manual_seed(seed)
    kw = {"patch_size": 4} if model_name.startswith(("vit", "beit")) and size <= 64 else {}
    model_name, extra = SIZED.get(model_name, (model_name, {}))
    model = create_model(model_name, num_classes=10, img_size=size, **kw, **extra)
    if ckpt:
        grad_checkpointing(model, model_name)
    model = set_trainable(model, trainable, LoraConfig()).to(device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    name, passes, precision = parse_engine(engine)
    eng = create_engine(name, model, opt, noise_multiplier=1.0, max_grad_norm=1.0,
                        expected_batch_size=expected_batch_size or batch, passes=passes, precision=precision, dist=dist)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return eng, x, y


def parse_engine(label: str) -> tuple[str, int, str]:
    """An engine label → (engine, passes, precision): <engine>[_2pass][_bf16|_fp16], e.g. mixed_ghost_bf16 (a `_ckpt`
    anywhere in the label, handled by `build`, turns on the model's activation checkpointing)."""
    precision = "fp32"
    for p in ("bf16", "fp16"):
        if label.endswith("_" + p):
            label, precision = label.removesuffix("_" + p), p
    if label.endswith("_2pass"):
        return label.removesuffix("_2pass"), 2, precision
    return label, 1, precision


def one_step(eng, x, y, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    with eng.autocast():
        out = eng.model(x)
    eng.backward(out, y, last=True)
    eng.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def time_engines(model_name, size, batch, engines, device, steps=10, warmup=2,
                 errors: dict | None = None, trainable: str = "all", left=None) -> dict[str, float]:
    """Median step time (s) per engine, steps interleaved round-robin in this process. `errors`, if given, gets
    engine → the one line of an engine that could not be built or stepped. left: a callable giving the seconds
    left to the caller (gpu_check's clock): no round starts with under 5 s left (the medians of the rounds run)."""
    built = {}
    errors = {} if errors is None else errors
    for e in engines:
        try:
            built[e] = build(model_name, size, e, batch, device, trainable=trainable)
        except Exception as err:  # e.g. Opacus cannot run the model: recorded, not fatal
            errors[e] = f"cannot build: {type(err).__name__}: {first_line(err)}"
            print(f"  {e}: cannot build ({type(err).__name__}: {str(err)[:100]})", file=sys.stderr)
    times = {e: [] for e in built}
    for i in range(warmup + steps):
        if left is not None and left() < 5:
            for e in built:
                if not times[e]:
                    errors[e] = f"not timed: the time budget ran out after {i} round(s) of warm-up"
            break
        for e, (eng, x, y) in list(built.items()):
            try:
                t = one_step(eng, x, y, device)
            except Exception as err:
                errors[e] = f"step failed: {type(err).__name__}: {first_line(err)}"
                print(f"  {e}: step failed ({type(err).__name__}: {str(err)[:100]})", file=sys.stderr)
                del built[e]
                times.pop(e)
                continue
            if i >= warmup:
                times[e].append(t)
    return {e: statistics.median(ts) for e, ts in times.items() if ts}
