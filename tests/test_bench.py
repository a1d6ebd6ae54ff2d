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


def test_without_out_the_committed_results_are_left_alone(tmp_path, monkeypatch):
    """`dptrain-bench` without --out writes a new folder under outputs/; results/bench-cpu.* (committed) only
    changes when --out names it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "bench-cpu.csv").write_text("committed\n")
    argv = ["--models", "cnn", "--sizes", "8", "--batches", "2", "--engines", "nonprivate", "--steps", "1",
            "--no-memory", "--device", "cpu"]
    bench.main(argv)
    assert (tmp_path / "results" / "bench-cpu.csv").read_text() == "committed\n"
    written = list((tmp_path / "outputs" / "bench").glob("*/bench-cpu.csv"))
    assert len(written) == 1 and list(pd.read_csv(written[0]).engine) == ["nonprivate"]
    bench.main([*argv, "--out", "results/bench-cpu"])
    assert list(pd.read_csv(tmp_path / "results" / "bench-cpu.csv").engine) == ["nonprivate"]


def test_max_batch_prints_each_probe(monkeypatch, capsys):
    """--memory-budget bisects with one fresh process per probe (minutes on CPU): each probe prints a line."""
    probes = []

    def fake_peak(model_name, size, batch, engine, device_name, steps=2):
        probes.append(batch)
        return {"peak_mb": 10.0 * batch, "extra_mb": 0.0}

    monkeypatch.setattr(bench, "peak_memory", fake_peak)
    assert bench.max_batch("cnn", 8, "mixed_ghost", "cpu", 1000) == 100
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(probes) == 12
    assert lines[0] == "   max batch mixed_ghost: probe 1, batch 2048: peak 20480 MB, over 1000 MB (0 s)"
    assert all(f"batch {b}: " in line for b, line in zip(probes, lines))
