"""Opt-in (`keep_freed_memory=true`): keep large CPU buffers in the process instead of returning them to the OS.

glibc serves allocations above a (dynamic, ≤ 32 MB) threshold with mmap and unmaps them on free, so each
training step re-faults its activation buffers page by page: at batch 512 on 32×32 CIFAR the small CNN
spends ~40% of its step in the kernel (measured: 1.49 s → 0.93 s per forward+backward with the thresholds
below, 2-core CPU, torch 2.14). Raising the mmap and trim thresholds makes freed buffers reusable. The cost is
memory: freed buffers are never returned and the heap fragments — the 25-epoch CIFAR run's peak RSS was 7.7 GB
with it (3.6 GB without, 6 epochs), and a benchmark process that builds many models one after another was
killed for memory. Hence off by default; worth it for one long large-batch CPU run. Even trimmed after every step
(trim_freed_memory) the kept heap creeps up over hundreds of steps (the ε = 1 ScatterNet flips recipe: 6.1 GB after
165 steps, 7.0 GB after ~290): `keep_freed_memory_max_gb` caps it — once the process's peak RSS passes the cap,
glibc's defaults come back for the rest of the run (slower steps, bounded memory). The step that crosses the cap
can overshoot it: the ε = 8 flips recipe under a 7 GB cap peaked at 7.65 GB in the step that crossed it (6.98 GB
just before), then never higher, its steps ~10% slower after. Hence the default cap of 6 GB, for the 8 GB the
CIFAR-10 recipes promise.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

import torch

from dptrain.train.outputs import peak_memory_mb

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
# glibc's own bounds when left alone: the mmap threshold adapts up to 32 MB (64-bit), the trim threshold is twice it
DEFAULT_MMAP, DEFAULT_TRIM = 32 << 20, 64 << 20
_done = False
_released = False  # keep_freed_memory undone past its cap (release_freed_memory)
_max_bytes: float | None = None  # keep_freed_memory's cap on the process's peak RSS
log = logging.getLogger("dptrain")
CPU = torch.device("cpu")


def keep_freed_memory(max_gb: float | None = None) -> bool:
    """Set glibc's thresholds once per process (Linux only; DPTRAIN_MALLOC=0 forbids it). True if applied.
    max_gb: the peak RSS (GB) past which trim_freed_memory gives the kept buffers back for good; None: no cap."""
    global _done, _max_bytes
    _max_bytes = None if max_gb is None else max_gb * 1e9
    if _done or not sys.platform.startswith("linux") or os.environ.get("DPTRAIN_MALLOC") == "0":
        return _done
    try:
        libc = ctypes.CDLL("libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
    except (OSError, AttributeError):  # musl, or no libc.so.6: keep the defaults
        _done = False
    return _done


def release_freed_memory() -> bool:
    """Undo keep_freed_memory's thresholds for the rest of the process: glibc's defaults (large buffers mmapped and
    unmapped again), the freed heap given back now. The heap's free chunks are still reused first, so
    trim_freed_memory goes on giving them back after every step. True if it was on."""
    global _released
    if not _done or _released:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
    _released = True
    return True


def trim_freed_memory() -> bool:
    """Give the freed heap pages back to the OS now (glibc malloc_trim: free pages inside the heap too, not only at
    its top), when keep_freed_memory is on. Under it a run's steps of varying size (Poisson batches: the last physical
    batch of each step differs) fragment the kept heap, which grows with the steps: the ε = 3 ScatterNet flips recipe
    went from 4.2 GB after 6 steps to 7.6 GB after 67 untrimmed, and still to 6.5 GB within 50 steps trimmed once per
    epoch. Called after every optimizer step it bounds the heap to about one step's buffers, at the cost of
    re-faulting them once per step instead of once per physical batch. Past keep_freed_memory's cap on the peak RSS,
    releases the kept memory for good (release_freed_memory). True if trimmed."""
    if not _done:
        return False
    # this run's peak RSS (the summary's perf/peak_mem_mb: VmHWM since the run's start), MiB → bytes
    peak = peak_memory_mb(CPU) * 2**20 if _max_bytes is not None and not _released else None
    if peak is not None and peak > _max_bytes and release_freed_memory():
        log.warning(f"peak RSS {peak / 1e9:.2f} GB passed keep_freed_memory_max_gb={_max_bytes / 1e9:g}: freed "
                    "buffers go back to the OS from now on (bounded memory, slower CPU steps)")
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # returns whether it released anything: either is fine
    except (OSError, AttributeError):
        return False
    return True
