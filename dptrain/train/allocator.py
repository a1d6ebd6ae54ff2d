"""Opt-in (`keep_freed_memory=true`): keep large CPU buffers in the process instead of returning them to the OS.

glibc serves allocations above a (dynamic, ≤ 32 MB) threshold with mmap and unmaps them on free, so each
training step re-faults its activation buffers page by page: at batch 512 on 32×32 CIFAR the small CNN
spends ~40% of its step in the kernel (measured: 1.49 s → 0.93 s per forward+backward with the thresholds
below, 2-core CPU, torch 2.14). Raising the mmap and trim thresholds makes freed buffers reusable. The cost is
memory: freed buffers are never returned and the heap fragments — the 25-epoch CIFAR run's peak RSS was 7.7 GB
with it (3.6 GB without, 6 epochs), and a benchmark process that builds many models one after another was
killed for memory. Hence off by default; worth it for one long large-batch CPU run.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_done = False


def keep_freed_memory() -> bool:
    """Set glibc's thresholds once per process (Linux only; DPTRAIN_MALLOC=0 forbids it). True if applied."""
    global _done
    if _done or not sys.platform.startswith("linux") or os.environ.get("DPTRAIN_MALLOC") == "0":
        return _done
    try:
        libc = ctypes.CDLL("libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
    except (OSError, AttributeError):  # musl, or no libc.so.6: keep the defaults
        _done = False
    return _done


def trim_freed_memory() -> bool:
    """Give the freed heap pages back to the OS now (glibc malloc_trim: free pages inside the heap too, not only at
    its top), when keep_freed_memory is on. Under it a run's steps of varying size (Poisson batches: the last physical
    batch of each step differs) fragment the kept heap, which grows with the steps: the ε = 3 ScatterNet flips recipe
    went from 4.2 GB after 6 steps to 7.6 GB after 67 untrimmed, and still to 6.5 GB within 50 steps trimmed once per
    epoch. Called after every optimizer step it bounds the heap to about one step's buffers, at the cost of
    re-faulting them once per step instead of once per physical batch. True if trimmed."""
    if not _done:
        return False
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # returns whether it released anything: either is fine
    except (OSError, AttributeError):
        return False
    return True
