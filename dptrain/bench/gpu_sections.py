"""The GPU check's correctness sections, each on the device: the engine against the float64 reference, passes=2's
replay of dropout, one example's bf16 bound, the headline command for a few steps, the `gpu` tests."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import timm
import torch
import torch.nn.functional as F

from dptrain.bench.kit import ROOT
from dptrain.errors import first_line
from dptrain.models.factory import create_model
from dptrain.privacy import MODES, PrivacyEngine
from dptrain.testing import check, tiny_swin


def tiny_models() -> dict:
    """Tiny ViT, BEiT, Swin and ResNet (GroupNorm) on 16×16 inputs, 3 classes."""
    v = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3, drop_path_rate=0.0)
    return {
        "vit": lambda: timm.create_model("vit_tiny_patch16_224", init_values=0.1, **v),
        "beit": lambda: timm.create_model("beit_base_patch16_224", init_values=0.1, **v),
        "swin": tiny_swin,
        "resnet18_gn": lambda: create_model("resnet18", num_classes=3),
    }


def exactness(device: torch.device, clock=None) -> dict:
    """The engine against the one-example-at-a-time float64 reference on the device: tiny_models(), every mode and
    passes=2; per case its max relative error or its error's line."""
    out = {}
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(b, 3, 16, 16, generator=g).to(device), torch.randint(0, 3, (b,), generator=g).to(device))
            for b in (2, 3)]
    for name, make in tiny_models().items():
        for mode, passes in [*((m, 1) for m in MODES), ("mixed_ghost", 2)]:
            if clock is not None and clock.left() < 5:
                out[f"{name}/{mode}/passes={passes}"] = "skipped: time budget"
                continue
            torch.manual_seed(0)
            try:
                err, _ = check(make().to(device), data, mode=mode, max_grad_norm=0.5, passes=passes)
                out[f"{name}/{mode}/passes={passes}"] = err
            except Exception as e:  # noqa: BLE001 - recorded, the other cases go on
                out[f"{name}/{mode}/passes={passes}"] = f"{type(e).__name__}: {first_line(e)}"
    return out


def dropout_replay(device: torch.device) -> dict:
    """passes=2 with dropout: the recomputed forward draws the same masks from the device's generator (the norm pass
    and the clipped pass see one function), equal to passes=1 under the same seed."""

    def grads(passes: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3)).to(device)
        engine = PrivacyEngine(model, max_grad_norm=0.1, passes=passes)
        x, y = torch.randn(6, 8, device=device), torch.tensor([0, 1, 2, 0, 1, 2], device=device)
        torch.manual_seed(1)
        torch.cuda.manual_seed_all(1)
        F.cross_entropy(model(x), y, reduction="sum").backward()
        engine.detach()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    a, b = grads(1), grads(2)
    return {"max_abs_diff_passes2_vs_1": (a - b).abs().max().item(), "ok": bool(torch.allclose(a, b, atol=1e-6))}


def bf16_bound(device: torch.device, clock=None) -> dict:
    """One example alone under bf16 autocast: its clipped gradient's norm ≤ R·(1 + 1e-3), per tiny model."""
    out = {}
    for name, make in tiny_models().items():
        if clock is not None and clock.left() < 5:
            out[name] = "skipped: time budget"
            continue
        try:
            torch.manual_seed(0)
            model = make().to(device)
            R = 1e-3
            engine = PrivacyEngine(model, max_grad_norm=R)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(torch.randn(1, 3, 16, 16, device=device))
            F.cross_entropy(logits.float(), torch.tensor([1], device=device), reduction="sum").backward()
            total = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters())).item()
            out[name] = {"norm_over_R": total / R, "ok": total <= R * (1 + 1e-3)}
            engine.detach()
        except Exception as e:  # noqa: BLE001 - recorded, the other models go on
            out[name] = f"{type(e).__name__}: {first_line(e)}"
    return out


def gpu_tests(device: torch.device, log: str, timeout: float = 600) -> dict:
    """The `gpu` tests in a subprocess (a crash there costs this section only); the log to `log`."""
    try:
        found = importlib.util.find_spec("pytest") is not None
    except (ImportError, ValueError):  # an import hook that refuses it, a None in sys.modules
        found = False
    if not found:
        return {"ran": False, "why": "pytest is not installed"}
    env = {**os.environ, "DPTRAIN_TEST_DEVICE": device.type, "WANDB_MODE": "offline",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-rfE",
           os.path.join(ROOT, "tests", "bench", "test_gpu.py")]
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
        text, code = out.stdout + out.stderr, out.returncode
    except subprocess.TimeoutExpired as e:
        text = "".join(b.decode() if isinstance(b, bytes) else (b or "") for b in (e.stdout, e.stderr))
        text, code = text + f"\n[gpu-check: stopped by the time budget after {timeout:.0f} s]\n", "timeout"
    with open(log, "w") as f:
        f.write(text)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed|error)", ln)), lines[-1] if lines
                   else "")
    return {"ran": True, "returncode": code, "summary": summary.strip("= "), "log": log}


def headline(device, out_prefix: str, timeout: float) -> dict:
    """The README's headline command, `dptrain model=beit dataset=cifar100 eps=1`, for a few steps, as a user runs
    it (a subprocess): CIFAR-100's shape (100 classes) as fake data, as the machine is offline (no CIFAR-100, no
    pretrained weights: model.pretrained=false), at the 224×224 the pretrained BEiT trains at; 768 examples at the
    default batch size 256, one epoch: 3 steps. CPU (a dry run): 32×32, 96 examples, batches of 32."""
    gpu = device.type == "cuda"
    run_dir = tempfile.mkdtemp(prefix="dptrain-headline-")  # model.pt (BEiT-base: 340 MB) stays out of $OUT
    args = ["model=beit", "dataset=fake", "eps=1", "dataset.num_classes=100", "model.pretrained=false",
            *(["dataset.image_size=224", "dataset.size=768"] if gpu else
              ["dataset.image_size=32", "dataset.size=96", "batch_size=32", "physical_batch_size=16"]),
            "epochs=1", f"device={device.type}", "progress=false", "checkpoint.every_s=0", f"hydra.run.dir={run_dir}"]
    out: dict = {"command": "dptrain " + " ".join(a for a in args if not a.startswith("hydra.run.dir"))}
    t = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "dptrain", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=max(timeout, 1), env={**os.environ, "WANDB_MODE": "offline"})
        out.update(returncode=r.returncode, seconds=round(time.time() - t, 1))
        summary = os.path.join(run_dir, "summary.json")
        if r.returncode == 0 and os.path.exists(summary):
            with open(summary) as f:
                out["summary"] = {k: v for k, v in json.load(f).items() if k not in ("config", "privacy/streams")}
            with open(out_prefix + "-headline-summary.json", "w") as f:
                json.dump(out, f, indent=1)
        else:
            out["stderr"] = (r.stdout + r.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        out["error"] = f"stopped by the time budget after {timeout:.0f} s"
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return out
