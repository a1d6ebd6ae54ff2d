"""`make gpu-check`: every check that needs a GPU, in one prepared command for a bare CUDA machine (issue #18, #34).

A lent GPU machine starts bare and offline, with torch (2.11), timm, numpy, pytest, pandas and matplotlib, and maybe
no `make`. From the repository root, one command (the no-make path; `make gpu-check` runs the same):

    mkdir -p $OUT && PYTHONPATH=. PYTHONUNBUFFERED=1 python3 -m dptrain.bench.gpu_check --out $OUT/gpu-check

kit         first, what dptrain needs and the machine lacks is installed from the committed wheel folder
            (wheels/, `make gpu-wheels` refreshes it): `pip install --no-index --find-links wheels --no-deps
            --target <site>` of the wheels whose distribution is not installed (the machine's torch is never
            touched), then dptrain itself (--no-deps --no-build-isolation) into the same folder; the working tree
            stays first on the path. No wheel folder: nothing installed, the sections that need Hydra or Opacus
            record their import error.
Then, in order of value, each written to <out>.json/.md as soon as it ends, under a time budget counted from the
command's start, install included (--time-budget-s, BUDGET_S = 390 s on CUDA): a section, and inside the long ones
each row (model, engine, probe, test case), starts only with its need left, else is recorded as skipped, so the
command ends by ~420 s and a rerun fits in one 600 s device command. One row's failure is that row's result (an
out-of-memory or a cuDNN/cuBLAS allocation error: "does not fit"; any other error: its line), never the section's.
  replay      passes=2 with dropout: the recomputed forward must draw the same masks from the device's generator
              (the norm pass and the clipped pass see one function), equal to passes=1 under the same seed
  bf16_bound  one example alone under bf16 autocast: its clipped gradient's norm ≤ R·(1 + 1e-3)
  headline    `dptrain model=beit dataset=cifar100 eps=1` for 3 steps, as a subprocess: CIFAR-100's shape as fake
              data at 224×224 (offline: no data, no pretrained weights) → <out>-headline-summary.json
  gpu_tests   `pytest -m gpu tests/test_gpu.py` in a subprocess (≤ 150 s), its log beside <out>.json
  bench       per model (vgg19 first, then resnet18, vit_base, beit_base at 224×224; CPU: 32×32): median step time
              of interleaved steps and peak memory (CUDA: max_memory_allocated, one engine at a time) of
              nonprivate, mixed_ghost, mixed_ghost_2pass, opacus in fp32 and in bf16
              → <bench-out>.{csv,md,png} (dptrain.bench.speed.write)
  max_batch   right after the first model's bench: the largest batch whose step's peak memory fits
              --memory-budget-mb, mixed_ghost vs opacus (the paper's "18× larger batch than Opacus" on VGG19):
              two probes fit memory = fixed + per-example·batch, then probes around the prediction pin it down
  exactness   the engine against the one-example-at-a-time float64 reference on the device (tests/reference.py,
              loaded from its file), tiny ViT, BEiT, Swin and ResNet (GroupNorm), every mode and passes=2
  beit_large  BEiT-large's memory per example of a physical batch (two batch sizes, the slope), bf16; CUDA only
A CPU dry run of the flow with small sizes (results/gpu-check-cpu-dryrun.md):

    PYTHONPATH=. python -m dptrain.bench.gpu_check --device cpu --bench-models cnn --memory-budget-mb 700 \
        --out /tmp/gpu-check/gpu-check
"""

from __future__ import annotations

import argparse
import gc
import glob
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

T0 = time.time()  # the clock starts before torch's import (seconds on a cold machine): the budget is the command's

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

MODES = ("mixed_ghost", "ghost", "per_sample")
SECTIONS = ["replay", "bf16_bound", "headline", "gpu_tests", "bench", "max_batch", "exactness", "beit_large"]
BENCH_MODELS = ["vgg19", "resnet18", "vit_base", "beit_base"]
BENCH_ENGINES = ["nonprivate", "mixed_ghost", "mixed_ghost_2pass", "opacus",
                 "nonprivate_bf16", "mixed_ghost_bf16", "mixed_ghost_2pass_bf16", "opacus_bf16"]
# the least time (s, CUDA) a section needs to be worth starting; the GPU estimate of each, not a measurement
NEEDS = {"replay": 5, "bf16_bound": 10, "headline": 60, "gpu_tests": 60, "bench": 30, "max_batch": 30,
         "exactness": 30, "beit_large": 30}
# the command's default budget on CUDA, from its start (torch's import and the kit's install included): a section or
# a row starts only with its need left, so the command ends by ~420 s, and a rerun fits in a 600 s device command
BUDGET_S = 390.0
# RuntimeErrors that mean "this does not fit in device memory": cuDNN and cuBLAS report a failed allocation in their
# own words (and cuDNN refuses sizes past its limits), not as torch's OutOfMemoryError
_ALLOC = re.compile(r"out of memory|ALLOC_FAILED|CUBLAS_STATUS_NOT_INITIALIZED|CUDNN_STATUS_NOT_SUPPORTED|"
                    r"CUDNN_STATUS_INTERNAL_ERROR|cudaErrorMemoryAllocation|[Ff]ailed to allocate")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo/dptrain/<role>/x.py


def tiny_models() -> dict:
    import timm

    from dptrain.models.factory import create_model

    v = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3, drop_path_rate=0.0)
    return {
        "vit": lambda: timm.create_model("vit_tiny_patch16_224", init_values=0.1, **v),
        "beit": lambda: timm.create_model("beit_base_patch16_224", init_values=0.1, **v),
        "swin": lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=16, patch_size=2, window_size=4,
                                          embed_dim=8, depths=(2, 2), num_heads=(2, 2), num_classes=3,
                                          drop_path_rate=0.0),
        "resnet18_gn": lambda: create_model("resnet18", num_classes=3),
    }


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _alloc_error(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and bool(_ALLOC.search(str(e))))


def _reference():
    """tests/reference.py (the one-example-at-a-time float64 reference), loaded from its file: tests/ stays off
    sys.path (its modules would shadow others for the rest of the command)."""
    spec = importlib.util.spec_from_file_location("dptrain_gpu_check_reference",
                                                  os.path.join(ROOT, "tests", "reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exactness(device: torch.device, clock=None) -> dict:
    check = _reference().check
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
                out[f"{name}/{mode}/passes={passes}"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def dropout_replay(device: torch.device) -> dict:
    from dptrain.privacy import PrivacyEngine

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
    from dptrain.privacy import PrivacyEngine

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
            out[name] = _one_line(e)
    return out


class Clock:
    """The time budget of the whole command: seconds left (inf without a budget), from t0 (default: now)."""

    def __init__(self, budget_s: float | None, t0: float | None = None):
        self.t0, self.budget = time.time() if t0 is None else t0, budget_s

    def left(self) -> float:
        return math.inf if self.budget is None else self.budget - (time.time() - self.t0)


def _dist_name(wheel: str) -> str:
    """A wheel file's distribution name, normalised (PEP 503): hydra_core-1.3.8-py3-none-any.whl → hydra-core."""
    return re.sub(r"[-_.]+", "-", os.path.basename(wheel).split("-")[0]).lower()


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def install_kit(wheels: str = "wheels", site: str | None = None, dptrain: bool = True,
                timeout: float = 300) -> dict:
    """Install the wheel folder's distributions this Python lacks into `site` (pip --target: --no-index, --no-deps,
    so nothing is downloaded and the installed torch is never touched), then dptrain itself; put the working tree
    and `site` on sys.path and on PYTHONPATH (the subprocesses: gpu tests, memory probes). No wheel folder: nothing
    installed, and the report says which of them are missing."""
    wheels = os.path.join(ROOT, wheels) if not os.path.isabs(wheels) else wheels
    site = site or os.path.join(tempfile.gettempdir(), "dptrain-site")
    found = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    out: dict = {"wheels": wheels, "site": site}
    paths = [ROOT]
    if not found:
        out["why"] = f"no wheel folder ({wheels} holds no .whl): nothing installed"
    else:
        need = [w for w in found if not _installed(_dist_name(w))]
        out["present"] = sorted(_dist_name(w) for w in found if w not in need)
        out["installed"] = sorted(_dist_name(w) for w in need)
        pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
               "--find-links", wheels, "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade", "--target", site]
        if need:
            r = subprocess.run([*pip, *need], capture_output=True, text=True, timeout=max(timeout, 1))
            out["pip_returncode"] = r.returncode
            if r.returncode:
                out["pip_error"] = (r.stdout + r.stderr)[-1500:]
        if dptrain:  # dptrain itself (metadata, console scripts); setuptools of this Python, no download
            r = subprocess.run([*pip, "--no-build-isolation", ROOT], capture_output=True, text=True,
                               timeout=max(timeout, 1), cwd=tempfile.gettempdir())
            out["dptrain"] = "installed" if r.returncode == 0 else f"not installed: {(r.stdout + r.stderr)[-500:]}"
        paths.append(site)
    for p in paths:
        if p not in sys.path:
            sys.path.insert(0 if p == ROOT else len(sys.path), p)
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    importlib.invalidate_caches()
    out["missing"] = [m for m in ("hydra", "omegaconf", "antlr4", "opacus", "kymatio", "submitit", "pytest")
                      if importlib.util.find_spec(m) is None]
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
           os.path.join(ROOT, "tests", "test_gpu.py")]
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


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _cuda_peak(eng, batch: int, size: int, device, notes: dict | None = None) -> float:
    """Peak allocated memory (MB, the engine's model and optimizer state included) of one step at `batch`; inf when
    the step does not fit: torch's out-of-memory or cuDNN's/cuBLAS's allocation errors (`_alloc_error`; its line to
    notes[batch]). Any other error propagates, to be recorded as its row's."""
    x = y = None
    try:
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        from dptrain.bench.speed import one_step

        one_step(eng, x, y, device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    except RuntimeError as e:
        if not _alloc_error(e):
            raise
        if notes is not None:
            notes[batch] = _one_line(e)
        return math.inf
    finally:
        del x, y
        eng.optimizer.zero_grad(set_to_none=True) if hasattr(eng, "optimizer") else None
        _free(device)


def cuda_memory(model: str, size: int, batch: int, device, engine: str) -> dict:
    """One engine's peak memory on CUDA (built alone): peak_mem_mb, extra_mem_mb (above the model and the engine
    before any step); a step that does not fit: a note instead."""
    from dptrain.bench.speed import build

    eng, x, y = build(model, size, engine, batch, device)
    del x, y
    _free(device)
    base = torch.cuda.memory_allocated(device) / 2**20  # the model and the engine, before any step
    notes: dict = {}
    _cuda_peak(eng, batch, size, device, notes)  # warm-up: the optimizer's state, cuDNN's workspaces
    peak = _cuda_peak(eng, batch, size, device, notes)
    del eng
    _free(device)
    if not math.isfinite(peak):
        return {"note": f"memory: out of memory at batch {batch} ({notes.get(batch, '')})"}
    return {"peak_mem_mb": peak, "extra_mem_mb": peak - base}


def bench_model(model: str, size: int, batch: int, steps: int, device, clock: Clock,
                engines=BENCH_ENGINES, memory=None) -> list[dict]:
    """dptrain.bench.speed rows of one model, one per engine whatever fails: interleaved step times (until the clock
    runs out); each engine's memory, `memory(engine)` → dict (CUDA default: cuda_memory, one engine at a time),
    checked against the clock before each engine; an engine's error is its row's note."""
    from dptrain.bench.speed import time_engines

    if memory is None and device.type == "cuda":
        def memory(e):
            return cuda_memory(model, size, batch, device, e)

    errors: dict = {}
    times = time_engines(model, size, batch, engines, device, steps=steps, errors=errors, left=clock.left)
    _free(device)
    rows = []
    for e in engines:
        row = {"model": model, "size": size, "batch": batch, "engine": e, "step_ms": None, "peak_mem_mb": None,
               "extra_mem_mb": None, "max_batch": None, "note": errors.get(e)}
        if e in times:
            row["step_ms"] = 1000 * times[e]
            if memory is not None and clock.left() < 10:
                row["note"] = "memory: skipped (time budget)"
            elif memory is not None:
                try:
                    row.update(memory(e))
                except Exception as err:  # noqa: BLE001 - this row's result; the other engines go on
                    row["note"] = f"memory: {_one_line(err)}"
                    _free(device)
        rows.append(row)
        print(f"   {model} {e:<24} {row['step_ms'] or math.nan:9.1f} ms  peak {row['peak_mem_mb'] or math.nan:8.0f}"
              f" MB  {row['note'] or ''}", flush=True)
    return rows


def max_batch_search(peak, budget_mb: float, probes=(8, 16), max_probes: int = 7, clock: Clock | None = None,
                     hi_cap: int = 1 << 14) -> dict:
    """The largest batch b with peak(b) ≤ budget_mb. Memory is close to affine in b: two probes give fixed +
    per-example·b, the prediction and its neighbour are probed, then bisection between the largest batch seen to
    fit and the smallest seen over, until they are adjacent ("exact") or the probes or the time run out."""
    seen: dict[int, float] = {}

    def probe(b):
        if b not in seen:
            seen[b] = peak(b)
        return seen[b]

    for b in probes:
        probe(b)
    (b1, p1), (b2, p2) = sorted(seen.items())[:2]
    slope = (p2 - p1) / (b2 - b1) if math.isfinite(p1) and math.isfinite(p2) else math.nan
    fixed = p1 - slope * b1
    pred = int((budget_mb - fixed) // slope) if slope > 0 else None

    def bounds():
        lo = max((b for b, p in seen.items() if p <= budget_mb), default=0)
        hi = min((b for b, p in seen.items() if p > budget_mb), default=None)
        return lo, hi

    guesses = [] if pred is None else [min(max(pred, 1), hi_cap), min(max(pred + 1, 1), hi_cap)]
    while len(seen) < max_probes and (clock is None or clock.left() > 5):
        lo, hi = bounds()
        if hi is not None and hi <= lo + 1:
            break
        nxt = next((g for g in guesses if g not in seen and lo < g and (hi is None or g < hi)), None)
        if nxt is None:
            if hi is None and lo >= hi_cap:
                break
            nxt = min(2 * lo, hi_cap) if hi is None else (lo + hi) // 2
        probe(nxt)
    lo, hi = bounds()
    return {"max_batch": lo, "exact": hi is not None and hi == lo + 1, "smallest_over": hi,
            "predicted": pred, "mb_per_example": slope, "fixed_mb": fixed, "budget_mb": budget_mb,
            "probes": {str(b): round(p, 1) if math.isfinite(p) else "out of memory" for b, p in sorted(seen.items())}}


def _max_batch_one(model: str, size: int, device, budget_mb: float, clock: Clock, engine: str) -> dict:
    """max_batch_search of one engine; CUDA: the engine built once, probed in-process (peak allocated; an
    allocation error is that probe's "does not fit"); CPU: one fresh process per probe (dptrain.bench.speed.peak_memory,
    peak RSS with torch's libraries)."""
    from dptrain.bench.speed import build, peak_memory

    if device.type != "cuda":
        def cpu_peak(b):
            m = peak_memory(model, size, b, engine, device.type, steps=1)
            return math.inf if m is None else m["peak_mb"]

        return max_batch_search(cpu_peak, budget_mb, max_probes=4, clock=clock)
    notes: dict = {}
    eng, x, y = build(model, size, engine, 8, device)
    del x, y
    try:
        _cuda_peak(eng, 8, size, device, notes)  # warm-up
        res = max_batch_search(lambda b: _cuda_peak(eng, b, size, device, notes), budget_mb, clock=clock)
    finally:
        eng = None  # noqa: F841 - frees the engine (the probe's closure holds the name)
        _free(device)
    if notes:
        res["allocation_errors"] = {str(b): why for b, why in sorted(notes.items())}
    return res


def max_batch(model: str, size: int, device, budget_mb: float, clock: Clock,
              engines=("mixed_ghost", "opacus")) -> dict:
    """max_batch_search per engine, each engine's error or time-budget skip recorded as its own result."""
    out = {}
    for e in engines:
        if clock.left() < 20:
            out[e] = {"skipped": f"time budget: {clock.left():.0f} s left"}
            continue
        t = time.time()
        try:
            res = _max_batch_one(model, size, device, budget_mb, clock, e)
        except Exception as err:  # noqa: BLE001 - this engine's result; the other goes on
            res = {"error": _one_line(err)}
            _free(device)
        res["seconds"] = round(time.time() - t, 1)
        out[e] = res
        print(f"   max batch {model} {e}: {json.dumps(res)}", flush=True)
    a, b = (out.get(e, {}) for e in engines[:2])
    if a.get("max_batch") and b.get("max_batch"):  # a ratio of lower bounds means little: said so
        out[f"{engines[0]}_over_{engines[1]}"] = a["max_batch"] / b["max_batch"]
        out["ratio_exact"] = bool(a["exact"] and b["exact"])
    return out


def beit_large(device, size: int = 224, clock: Clock | None = None) -> dict:
    from dptrain.bench.speed import build

    peaks, notes = {}, {}
    for b in (8, 16):
        if clock is not None and clock.left() < 10:
            peaks[b] = "skipped: time budget"
            continue
        try:
            eng, x, y = build("beit_large", size, "mixed_ghost_bf16", b, device)
        except RuntimeError as e:  # the model itself does not fit: this batch's result
            if not _alloc_error(e):
                raise
            peaks[b], notes[b] = math.inf, _one_line(e)
            _free(device)
            continue
        del x, y
        _cuda_peak(eng, b, size, device, notes)
        peaks[b] = _cuda_peak(eng, b, size, device, notes)
        del eng
        _free(device)
    out = {"peak_mb": {b: p if not isinstance(p, float) or math.isfinite(p) else "out of memory"
                       for b, p in peaks.items()}, **({"allocation_errors": notes} if notes else {})}
    if all(isinstance(p, float) and math.isfinite(p) for p in peaks.values()):
        out["mb_per_example"] = (peaks[16] - peaks[8]) / 8
    return out


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


def _fmt(v, spec=".3g"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def summary_md(report: dict, rows: list[dict]) -> str:
    """The headline numbers: per model, DP's cost against the same precision's nonprivate and against Opacus."""
    lines = ["| model | engine | step ms | × nonprivate (same precision) | × opacus | peak MB | note |",
             "|---|---|---|---|---|---|---|"]
    by = {(r["model"], r["engine"]): r for r in rows}
    for r in rows:
        prec = "_bf16" if r["engine"].endswith("_bf16") else "_fp16" if r["engine"].endswith("_fp16") else ""
        base, op = by.get((r["model"], "nonprivate" + prec)), by.get((r["model"], "opacus"))
        def ratio(ref, r=r):
            return r["step_ms"] / ref["step_ms"] if r["step_ms"] and ref and ref["step_ms"] else None

        lines.append(f"| {r['model']} {r['size']}px b{r['batch']} | {r['engine']} | {_fmt(r['step_ms'], '.1f')} | "
                     f"{_fmt(ratio(base), '.2f')} | {_fmt(ratio(op), '.2f') if not prec else ''} | "
                     f"{_fmt(r['peak_mem_mb'], '.0f')} | {(r.get('note') or '')[:120]} |")
    mb = report.get("max_batch")
    if isinstance(mb, dict) and "error" not in mb:
        budget = next((v["budget_mb"] for v in mb.values() if isinstance(v, dict)), None)
        lines += ["", f"max batch under {_fmt(budget, '.0f')} MB of peak memory:", ""]
        for e, v in mb.items():
            if isinstance(v, dict) and "max_batch" in v:
                lines.append(f"- {e}: {v['max_batch']} ({'exact' if v['exact'] else 'lower bound'}; "
                             f"{_fmt(v['mb_per_example'])} MB per example + {_fmt(v['fixed_mb'], '.0f')} MB)")
            else:
                lines.append(f"- {e}: {_fmt(v, '.2f') if not isinstance(v, dict) else json.dumps(v)[:200]}")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/gpu-check", help="output prefix (.json, .md, -tests.log)")
    ap.add_argument("--bench-out", default=None, help="the bench's output prefix (.csv, .md, .png; default: "
                    "bench-gpu beside --out, bench-cpu on CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bench-models", nargs="+", default=BENCH_MODELS,
                    help="the bench's models, the first one also for max_batch (a CPU dry run: cnn)")
    ap.add_argument("--bench-engines", nargs="+", default=BENCH_ENGINES)
    ap.add_argument("--size", type=int, default=None, help="bench input size (default: 224 on CUDA, 32 on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="bench batch (default: 32 on CUDA, 8 on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per engine (default: 5 on CUDA, 2 on CPU)")
    ap.add_argument("--memory-budget-mb", type=float, default=40960.0,
                    help="max_batch's budget of peak memory (default 40 GiB, an A100-40GB's worth)")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="the whole command's budget from its start: a section or row that would start with too "
                         f"little left is skipped (default: {BUDGET_S:.0f} on CUDA, none on CPU)")
    ap.add_argument("--wheels", default="wheels", help="the wheel folder installed first (see kit above)")
    ap.add_argument("--site", default=None, help="where the wheels go (default: <tmp>/dptrain-site)")
    ap.add_argument("--no-install", action="store_true", help="skip the kit: install nothing")
    ap.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS, help="which sections to run")
    return ap


def _save(report: dict, rows: list[dict], args, bench_out: str, command: list[str]) -> None:
    """Write <out>.json and <out>.md (and the bench's files when it has rows): called after every section."""
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    if rows:
        try:
            from dptrain.bench.speed import write

            write(rows, bench_out, device=args.device, argv=["python -m dptrain.bench.gpu_check", *command])
            report["bench_files"] = [bench_out + x for x in (".csv", ".md", ".png")]
        except Exception:  # noqa: BLE001 - pandas/matplotlib missing: the rows stay in the json
            report["bench_files"] = {"error": traceback.format_exc()[-600:]}
    with open(args.out + ".md", "w") as f:
        f.write(f"# gpu-check ({report['env']['name']}, torch {report['env']['torch']}, python "
                f"{report['env']['python']})\n\ncommand: `python -m dptrain.bench.gpu_check {' '.join(command)}`\n\n")
        if rows or "max_batch" in report:
            f.write(summary_md(report, rows) + "\n")
        f.write("```json\n" + json.dumps(report, indent=1, default=str) + "\n```\n")


def _plan(args, device, clock: Clock, size: int, batch: int, steps: int, rows: list[dict]) -> list[tuple]:
    """(name, thunk) per section, in SECTIONS' order; the first bench model's max_batch right after its bench."""
    gpu = device.type == "cuda"
    plan = [("kit", lambda: install_kit(args.wheels, args.site, timeout=min(300, clock.left() - 5)))
            ] if not args.no_install else []
    models = list(args.bench_models)

    def bench_section(m):
        def go():
            new = bench_model(m, size, batch, steps, device, clock, args.bench_engines)
            rows.extend(new)
            return {r["engine"]: {k: r[k] for k in ("step_ms", "peak_mem_mb", "note") if r[k] is not None}
                    for r in new}
        return go

    sections = {
        "replay": lambda: dropout_replay(device),
        "bf16_bound": lambda: bf16_bound(device, clock),
        "headline": lambda: headline(device, args.out, timeout=min(180, clock.left() - 5)),
        "max_batch": lambda: max_batch(models[0], size, device, args.memory_budget_mb, clock),
        # capped: the bench and the max batch after it must keep a share of the budget
        "gpu_tests": lambda: gpu_tests(device, args.out + "-tests.log", timeout=min(150, clock.left() - 5)),
        "exactness": lambda: exactness(device, clock),
        "beit_large": lambda: beit_large(device, size, clock),
    }
    rest = [(f"bench/{m}", bench_section(m)) for m in models[1:]] if "bench" in args.sections else []
    for name in SECTIONS:
        if name not in args.sections or (name == "beit_large" and not gpu):
            continue
        if name == "bench":
            plan.append((f"bench/{models[0]}", bench_section(models[0])))
        else:
            plan.append((name, sections[name]))
            if name == "max_batch":
                plan += rest
    return plan if "max_batch" in args.sections else plan + rest  # no max_batch: the other models last


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    command = sys.argv[1:] if argv is None else list(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    # as a program, the clock runs from the process's start (T0: before torch's import); called in-process, from now
    clock = Clock(args.time_budget_s if args.time_budget_s is not None else BUDGET_S if gpu else None,
                  t0=T0 if argv is None else None)
    size = args.size or (224 if gpu else 32)
    batch, steps = args.batch or (32 if gpu else 8), args.steps or (5 if gpu else 2)
    bench_out = args.bench_out or os.path.join(os.path.dirname(args.out), "bench-gpu" if gpu else "bench-cpu")
    report = {"env": {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
                      "name": torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu"},
              "args": vars(args), "seconds": {}}
    for d in {os.path.dirname(args.out), os.path.dirname(bench_out)}:
        os.makedirs(d or ".", exist_ok=True)
    rows: list[dict] = []

    for name, run in _plan(args, device, clock, size, batch, steps, rows):
        t = time.time()
        need = NEEDS.get(name.split("/")[0], 0)
        if clock.left() < need:
            report[name] = {"skipped": f"time budget: {clock.left():.0f} s left, this section needs ~{need} s"}
            print(f"== {name}: skipped ({clock.left():.0f} s left)", flush=True)
            _save(report, rows, args, bench_out, command)
            continue
        print(f"== {name} ({'' if clock.budget is None else f'{clock.left():.0f} s left'})", flush=True)
        try:
            report[name] = run()
        except Exception:  # noqa: BLE001 - one section's failure must not cost the others
            report[name] = {"error": traceback.format_exc()[-2000:]}
        report["seconds"][name] = round(time.time() - t, 1)
        print(json.dumps(report[name], default=str)[:2000], flush=True)
        print(f"   ({report['seconds'][name]} s)", flush=True)
        _save(report, rows, args, bench_out, command)
    report["seconds"]["total"] = round(time.time() - clock.t0, 1)
    _save(report, rows, args, bench_out, command)
    print(f"wrote {args.out}.json, {args.out}.md" + (f", {bench_out}.{{csv,md,png}}" if rows else ""), flush=True)


if __name__ == "__main__":
    main()
