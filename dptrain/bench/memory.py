"""Peak memory of a bench step, each in a fresh process (CPU: peak RSS, sampled; CUDA: max allocated), and the
largest batch under a memory budget by bisection. This module is what the child processes import: no pandas."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time

import psutil
import torch

from dptrain.bench.steps import build, one_step


def peak_memory(model_name, size, batch, engine, device_name, steps=2, trainable: str = "all") -> dict | None:
    """{"peak_mb": the process's peak memory during `steps` steps in a fresh process (CPU: RSS, libraries
    included; CUDA: max allocated), "extra_mb": that peak minus the memory held before the first step (model,
    data, imports)}. None if it failed (e.g. out of memory)."""
    code = (f"from dptrain.bench.memory import _memory_child; _memory_child({model_name!r}, {size}, {batch}, "
            f"{engine!r}, {device_name!r}, {steps}, {trainable!r})")
    # glibc's dynamic mmap threshold keeps freed blocks in the heap, so RSS would depend on allocation order
    # (measured: the same non-private step's RSS after a step alternated 1.5 and 2.2 GB). A fixed threshold
    # returns every freed tensor to the OS: RSS then follows live memory, like CUDA's max allocated.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800, env=env)
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
        return {"peak_mb": out["peak_mb"], "extra_mb": out["extra_mb"]}
    except (IndexError, ValueError, KeyError):
        return None


class _RSSPeak:
    """Samples the process's resident set size every ms in a thread: the peak of the steps themselves
    (ru_maxrss would also hold the import- and build-time high-water mark)."""

    def __enter__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.base = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _memory_child(model_name, size, batch, engine, device_name, steps, trainable="all"):
    device = torch.device(device_name)
    eng, x, y = build(model_name, size, engine, batch, device, trainable=trainable)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(steps):
            one_step(eng, x, y, device)
        peak = torch.cuda.max_memory_allocated()
        extra = peak - base
    else:
        with _RSSPeak() as m:
            for _ in range(steps):
                one_step(eng, x, y, device)
        peak, extra = m.peak, m.peak - m.base
    print(json.dumps({"peak_mb": peak / 2**20, "extra_mb": extra / 2**20}))


MAX_BATCH_LIMIT = 1024  # --max-batch-limit: the search's upper end; bisection over 1..limit takes log2(limit) probes


def max_batch(model_name, size, engine, device_name, budget_mb, hi=MAX_BATCH_LIMIT) -> int:
    """Largest batch ≤ `hi` whose step's peak memory fits `budget_mb`, by bisection: at most ⌈log2(hi + 1)⌉ probes,
    one stderr line each (each is a fresh process and a step, up to minutes on CPU). `hi` itself means "≥ hi"."""
    lo, best, probe, most = 1, 0, 0, math.ceil(math.log2(hi + 1))
    while lo <= hi:
        mid, probe, t0 = (lo + hi) // 2, probe + 1, time.perf_counter()
        mem = peak_memory(model_name, size, mid, engine, device_name, steps=1)
        fits = mem is not None and mem["peak_mb"] <= budget_mb
        peak = "failed (out of memory?)" if mem is None else f"peak {mem['peak_mb']:.0f} MB"
        print(f"   max batch {engine}: probe {probe} of <= {most}, batch {mid}: {peak}, {'fits' if fits else 'over'} "
              f"{budget_mb:g} MB ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        if fits:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best
