"""The GPU check's bench and memory rows: interleaved step times and each engine's peak memory per model, the
largest batch under a memory budget, BEiT-large's memory per example. One row's failure is that row's result: an
out-of-memory or a cuDNN/cuBLAS allocation error is "does not fit", any other error its line; the clock (the
command's time budget) is checked between rows."""

from __future__ import annotations

import gc
import json
import math
import re
import time

import torch

from dptrain.bench import steps
from dptrain.bench.memory import peak_memory
from dptrain.errors import first_line

BENCH_ENGINES = ["nonprivate", "mixed_ghost", "mixed_ghost_2pass", "opacus",
                 "nonprivate_bf16", "mixed_ghost_bf16", "mixed_ghost_2pass_bf16", "opacus_bf16"]
# RuntimeErrors that mean "this does not fit in device memory": cuDNN and cuBLAS report a failed allocation in their
# own words (and cuDNN refuses sizes past its limits), not as torch's OutOfMemoryError
_ALLOC = re.compile(r"out of memory|ALLOC_FAILED|CUBLAS_STATUS_NOT_INITIALIZED|CUDNN_STATUS_NOT_SUPPORTED|"
                    r"CUDNN_STATUS_INTERNAL_ERROR|cudaErrorMemoryAllocation|[Ff]ailed to allocate")


class Clock:
    """The time budget of the whole command: seconds left (inf without a budget), from t0 (default: now)."""

    def __init__(self, budget_s: float | None, t0: float | None = None):
        self.t0, self.budget = time.time() if t0 is None else t0, budget_s

    def left(self) -> float:
        return math.inf if self.budget is None else self.budget - (time.time() - self.t0)


def _alloc_error(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and bool(_ALLOC.search(str(e))))


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
        steps.one_step(eng, x, y, device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    except RuntimeError as e:
        if not _alloc_error(e):
            raise
        if notes is not None:
            notes[batch] = f"{type(e).__name__}: {first_line(e)}"
        return math.inf
    finally:
        del x, y
        eng.optimizer.zero_grad(set_to_none=True) if hasattr(eng, "optimizer") else None
        _free(device)


def cuda_memory(model: str, size: int, batch: int, device, engine: str) -> dict:
    """One engine's peak memory on CUDA (built alone): peak_mem_mb, extra_mem_mb (above the model and the engine
    before any step); a step that does not fit: a note instead."""
    eng, x, y = steps.build(model, size, engine, batch, device)
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


def bench_model(model: str, size: int, batch: int, n_steps: int, device, clock: Clock,
                engines=BENCH_ENGINES, memory=None) -> list[dict]:
    """dptrain-bench rows (speed.write) of one model, one per engine whatever fails: interleaved step times (until
    the clock runs out); each engine's memory, `memory(engine)` → dict (CUDA default: cuda_memory, one engine at a
    time), checked against the clock before each engine; an engine's error is its row's note."""
    if memory is None and device.type == "cuda":
        def memory(e):
            return cuda_memory(model, size, batch, device, e)

    errors: dict = {}
    times = steps.time_engines(model, size, batch, engines, device, steps=n_steps, errors=errors, left=clock.left)
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
                    row["note"] = f"memory: {type(err).__name__}: {first_line(err)}"
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
    allocation error is that probe's "does not fit"); CPU: one fresh process per probe (bench/memory.py,
    peak RSS with torch's libraries)."""
    if device.type != "cuda":
        def cpu_peak(b):
            m = peak_memory(model, size, b, engine, device.type, steps=1)
            return math.inf if m is None else m["peak_mb"]

        return max_batch_search(cpu_peak, budget_mb, max_probes=4, clock=clock)
    notes: dict = {}
    eng, x, y = steps.build(model, size, engine, 8, device)
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
    """max_batch_search per engine (mixed_ghost vs opacus: the paper's "18× larger batch than Opacus" on VGG19),
    each engine's error or time-budget skip recorded as its own result."""
    out = {}
    for e in engines:
        if clock.left() < 20:
            out[e] = {"skipped": f"time budget: {clock.left():.0f} s left"}
            continue
        t = time.time()
        try:
            res = _max_batch_one(model, size, device, budget_mb, clock, e)
        except Exception as err:  # noqa: BLE001 - this engine's result; the other goes on
            res = {"error": f"{type(err).__name__}: {first_line(err)}"}
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
    """BEiT-large's memory per example of a physical batch, bf16: the slope between two batch sizes (CUDA only)."""
    peaks, notes = {}, {}
    for b in (8, 16):
        if clock is not None and clock.left() < 10:
            peaks[b] = "skipped: time budget"
            continue
        try:
            eng, x, y = steps.build("beit_large", size, "mixed_ghost_bf16", b, device)
        except RuntimeError as e:  # the model itself does not fit: this batch's result
            if not _alloc_error(e):
                raise
            peaks[b], notes[b] = math.inf, f"{type(e).__name__}: {first_line(e)}"
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
