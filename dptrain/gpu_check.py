"""`make gpu-check`: every check that needs a GPU, in one prepared command for a bare CUDA machine.

Needs only torch, timm and numpy (no Hydra, Opacus or wandb: a lent GPU machine starts bare and offline) and
runs from the repository root:

    PYTHONPATH=. python -m dptrain.gpu_check --out $OUT/gpu-check      # on the GPU machine
    make gpu-check                                                      # here: the same on CPU, small sizes

It writes <out>.json and <out>.md:
  exactness   the engine against the one-example-at-a-time float64 reference on the device (tests/reference.py),
              tiny ViT, BEiT, Swin and ResNet (GroupNorm), every mode and passes=2
  replay      passes=2 with dropout: the recomputed forward must draw the same masks from the device's generator
              (the norm pass and the clipped pass see one function), equal to passes=1 under the same seed
  bf16_bound  one example alone under bf16 autocast: its clipped gradient's norm ≤ R·(1 + 1e-3)
  bench       median step time (interleaved) and peak memory (torch.cuda.max_memory_allocated, one engine at a
              time) of nonprivate / mixed_ghost / mixed_ghost passes=2, fp32 and bf16, at 224×224 (CPU: 32×32);
              BEiT-large's memory per example in a physical batch (two batch sizes, the slope)
  gpu_tests   `pytest -m gpu tests/test_gpu.py` in a subprocess (issue #18 item 3), its log beside <out>.json;
              recorded as not run when pytest is not installed (the end-to-end tests also need Hydra)
Each section records its error instead of stopping the others. A CPU dry run of the flow with small sizes:

    PYTHONPATH=. python -m dptrain.gpu_check --device cpu --bench-models resnet18 --out /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

MODES = ("mixed_ghost", "ghost", "per_sample")
SECTIONS = ["exactness", "replay", "bf16_bound", "bench", "gpu_tests"]


def tiny_models() -> dict:
    import timm

    from .models import create_model

    v = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3, drop_path_rate=0.0)
    return {
        "vit": lambda: timm.create_model("vit_tiny_patch16_224", init_values=0.1, **v),
        "beit": lambda: timm.create_model("beit_base_patch16_224", init_values=0.1, **v),
        "swin": lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=16, patch_size=2, window_size=4,
                                          embed_dim=8, depths=(2, 2), num_heads=(2, 2), num_classes=3,
                                          drop_path_rate=0.0),
        "resnet18_gn": lambda: create_model("resnet18", num_classes=3),
    }


def exactness(device: torch.device) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from reference import check

    out = {}
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(b, 3, 16, 16, generator=g).to(device), torch.randint(0, 3, (b,), generator=g).to(device))
            for b in (2, 3)]
    for name, make in tiny_models().items():
        for mode, passes in [*((m, 1) for m in MODES), ("mixed_ghost", 2)]:
            torch.manual_seed(0)
            try:
                err, _ = check(make().to(device), data, mode=mode, max_grad_norm=0.5, passes=passes)
                out[f"{name}/{mode}/passes={passes}"] = err
            except Exception as e:  # noqa: BLE001 - recorded, the other cases go on
                out[f"{name}/{mode}/passes={passes}"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def dropout_replay(device: torch.device) -> dict:
    from .privacy import PrivacyEngine

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


def bf16_bound(device: torch.device) -> dict:
    from .privacy import PrivacyEngine

    out = {}
    for name, make in tiny_models().items():
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
    return out


def gpu_tests(device: torch.device, log: str) -> dict:
    """The `gpu` tests in a subprocess (a crash there costs this section only); the log to `log`."""
    try:
        found = importlib.util.find_spec("pytest") is not None
    except (ImportError, ValueError):  # an import hook that refuses it, a None in sys.modules
        found = False
    if not found:
        return {"ran": False, "why": "pytest is not installed"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "DPTRAIN_TEST_DEVICE": device.type, "WANDB_MODE": "offline",
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-rfE",
                          os.path.join(root, "tests", "test_gpu.py")], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    with open(log, "w") as f:
        f.write(out.stdout + out.stderr)
    lines = out.stdout.strip().splitlines()
    return {"ran": True, "returncode": out.returncode, "summary": lines[-1] if lines else "", "log": log}


def bench(device: torch.device, size: int, batch: int, steps: int,
          models=("resnet18", "vit_base", "beit_base")) -> dict:
    from .bench import build, one_step, time_engines

    engines = ["nonprivate", "mixed_ghost", "mixed_ghost_2pass", "nonprivate_bf16", "mixed_ghost_bf16"]
    out = {}
    for model in models:
        times = time_engines(model, size, batch, engines, device, steps=steps)
        row = {e: {"step_ms": 1000 * t} for e, t in times.items()}
        for e in engines:
            if e in row and device.type == "cuda":
                row[e]["peak_mb"] = _peak(lambda e=e, m=model: build(m, size, e, batch, device), one_step, device)
        for e, base in (("mixed_ghost", "nonprivate"), ("mixed_ghost_2pass", "nonprivate"),
                        ("mixed_ghost_bf16", "nonprivate_bf16")):
            if e in row and base in row:
                row[e]["time_vs_" + base] = row[e]["step_ms"] / row[base]["step_ms"]
                if "peak_mb" in row[e]:
                    row[e]["peak_vs_" + base] = row[e]["peak_mb"] / row[base]["peak_mb"]
        out[f"{model}/{size}/b{batch}"] = row
        print(f"  bench {model}: {json.dumps(row)}", flush=True)
    if device.type == "cuda":  # BEiT-large: memory per example of a physical batch, from two batch sizes
        peaks = {b: _peak(lambda b=b: build("beit_large", size, "mixed_ghost_bf16", b, device), one_step, device)
                 for b in (8, 16)}
        out["beit_large/mixed_ghost_bf16/peak_mb"] = peaks
        out["beit_large/mb_per_example"] = (peaks[16] - peaks[8]) / 8
    return out


def _peak(make, step, device) -> float:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    eng, x, y = make()
    for _ in range(2):
        step(eng, x, y, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    del eng, x, y
    return peak


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/gpu-check", help="output prefix (.json, .md)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bench-models", nargs="+", default=["resnet18", "vit_base", "beit_base"],
                    help="the bench's models (a CPU dry run: resnet18 alone)")
    ap.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS, help="which sections to run")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    report = {"env": {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
                      "name": torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu"}}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    sections = {"exactness": lambda: exactness(device), "replay": lambda: dropout_replay(device),
                "bf16_bound": lambda: bf16_bound(device),
                "bench": lambda: bench(device, 224 if gpu else 32, 32 if gpu else 8, 5 if gpu else 2,
                                       tuple(args.bench_models)),
                "gpu_tests": lambda: gpu_tests(device, args.out + "-tests.log")}
    for name, run in ((n, sections[n]) for n in SECTIONS if n in args.sections):
        t = time.time()
        print(f"== {name}", flush=True)
        try:
            report[name] = run()
        except Exception:  # noqa: BLE001 - one section's failure must not cost the others
            report[name] = {"error": traceback.format_exc()[-2000:]}
        report.setdefault("seconds", {})[name] = round(time.time() - t, 1)
        print(json.dumps(report[name], default=str)[:2000], flush=True)
        print(f"   ({report['seconds'][name]} s)", flush=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(args.out + ".md", "w") as f:
        f.write(f"# gpu-check ({report['env']['name']}, torch {report['env']['torch']})\n\n")
        f.write("command: `PYTHONPATH=. python -m dptrain.gpu_check`\n\n```json\n")
        f.write(json.dumps(report, indent=1, default=str) + "\n```\n")
    print(f"wrote {args.out}.json, {args.out}.md", flush=True)


if __name__ == "__main__":
    main()
