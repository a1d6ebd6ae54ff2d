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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_cap_on_peak_rss_gives_kept_memory_back_for_good():
    """keep_freed_memory(max_gb): while the peak RSS is under the cap a freed 200 MB buffer stays resident (kept);
    once the peak passes it, trim_freed_memory warns once and glibc's defaults are back: a freed 1 GB buffer (larger
    than any free chunk of the heap, so mmapped) leaves the process at once, without a trim. Trimming goes on."""
    code = """
import logging, torch
from dptrain.train.allocator import CPU, keep_freed_memory, peak_memory_mb, trim_freed_memory
logging.basicConfig(level=logging.WARNING, format='%(message)s')
def rss():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon')) // 1024
print(keep_freed_memory(max_gb=(peak_memory_mb(CPU) * 2**20 + 400e6) / 1e9))
x = torch.ones(50 * 2**20)  # 200 MB, under the cap (the peak so far + 400 MB): kept after del
before = rss(); del x
print(before - rss() < 50, trim_freed_memory())
x = torch.ones(150 * 2**20); del x  # 600 MB: the peak passes the cap
print(trim_freed_memory())
x = torch.ones(250 * 2**20)  # 1 GB
before = rss(); del x
print(before - rss() > 800, trim_freed_memory(), trim_freed_memory())
"""
    env = dict(os.environ, DPTRAIN_MALLOC="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["True"] * 7, (out.stdout, out.stderr[-2000:])
    assert out.stderr.count("passed keep_freed_memory_max_gb") == 1, out.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_run_past_the_cap_warns_and_finishes(tmp_path):
    """A run with keep_freed_memory=true whose process is already past keep_freed_memory_max_gb (any torch process
    is, at 0.01 GB): after its first step the kept memory is given back, the log says so once, and the run ends."""
    from conftest import TINY, cli

    r = cli(*TINY, "keep_freed_memory=true", "keep_freed_memory_max_gb=0.01", "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    log = (tmp_path / "run" / "cli.log").read_text()
    assert log.count("passed keep_freed_memory_max_gb=0.01") == 1, log[-2000:]
