"""dptrain-bench: engines interleaved in one process, memory in a fresh one, tables with ratios."""

import pandas as pd
import pytest
import torch

from dptrain import bench


def test_time_engines_and_tables(tmp_path):
    engines = ["nonprivate", "mixed_ghost", "mixed_ghost_2pass"]
    times = bench.time_engines("cnn", 8, 4, engines, torch.device("cpu"), steps=2, warmup=1)
    assert set(times) == set(engines) and all(t > 0 for t in times.values())
    rows = [{"model": "cnn", "size": 8, "batch": 4, "engine": e, "step_ms": 1000 * times[e], "peak_mem_mb": None,
             "extra_mem_mb": None, "max_batch": None} for e in engines]
    out = str(tmp_path / "bench-cpu")
    bench.write(rows, out, device="cpu", argv=["dptrain-bench", "--models", "cnn"])
    df = pd.read_csv(out + ".csv")
    assert list(df.engine) == engines
    assert df.time_vs_nonprivate.iloc[0] == 1.0
    assert df.time_vs_nonprivate.iloc[1] == pytest.approx(times["mixed_ghost"] / times["nonprivate"])
    md = (tmp_path / "bench-cpu.md").read_text()
    assert "command: `dptrain-bench --models cnn`" in md and "mixed_ghost_2pass" in md
    assert (tmp_path / "bench-cpu.png").stat().st_size > 0


def test_peak_memory_in_a_fresh_process():
    mem = bench.peak_memory("cnn", 8, 4, "mixed_ghost_2pass", "cpu", steps=1)
    assert mem is not None and mem["peak_mb"] > mem["extra_mb"] >= 0
