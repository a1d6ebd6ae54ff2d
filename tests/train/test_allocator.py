"""allocator.py: keep_freed_memory's settings, and trim_freed_memory that bounds the kept heap between epochs."""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_trim_gives_back_freed_heap_only_under_keep_freed_memory():
    """In a fresh process (the settings are process-wide): no trim before keep_freed_memory; after it, freed
    fragments of the heap stay resident until trim_freed_memory gives them back."""
    code = """
import ctypes, torch
from dptrain.train.allocator import keep_freed_memory, trim_freed_memory
def rss():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon')) // 1024
print(trim_freed_memory(), keep_freed_memory())
keep = [torch.ones(2**20) for _ in range(200)]  # 200 x 4 MB on the heap, then every other one freed
del keep[::2]
before = rss()
print(trim_freed_memory(), before - rss() > 300)
"""
    env = dict(os.environ, DPTRAIN_MALLOC="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["False", "True", "True", "True"], out.stderr[-2000:]
