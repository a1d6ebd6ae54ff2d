"""dptrain-bench: engines interleaved in one process, memory in a fresh one, tables with ratios."""

import pandas as pd
import pytest
import torch

from dptrain.bench import memory, steps
from dptrain.bench import speed as bench
from dptrain.cli.bench import main


def test_time_engines_and_tables(tmp_path):
    engines = ["nonprivate", "mixed_ghost", "mixed_ghost_2pass"]
    times = steps.time_engines("cnn", 8, 4, engines, torch.device("cpu"), steps=2, warmup=1)
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


@pytest.mark.slow
def test_peak_memory_in_a_fresh_process():
    mem = memory.peak_memory("cnn", 8, 4, "mixed_ghost_2pass", "cpu", steps=1)
    assert mem is not None and mem["peak_mb"] > mem["extra_mb"] >= 0


def test_without_out_the_committed_results_are_left_alone(tmp_path, monkeypatch):
    """`dptrain-bench` without --out writes a new folder under outputs/; results/bench-cpu.* (committed) only
    changes when --out names it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "bench-cpu.csv").write_text("committed\n")
    argv = ["--models", "cnn", "--sizes", "8", "--batches", "2", "--engines", "nonprivate", "--steps", "1",
            "--no-memory", "--device", "cpu"]
    main(argv)
    assert (tmp_path / "results" / "bench-cpu.csv").read_text() == "committed\n"
    written = list((tmp_path / "outputs" / "bench").glob("*/bench-cpu.csv"))
    assert len(written) == 1 and list(pd.read_csv(written[0]).engine) == ["nonprivate"]
    main([*argv, "--out", "results"])  # a folder, as dptrain-report's --out
    assert list(pd.read_csv(tmp_path / "results" / "bench-cpu.csv").engine) == ["nonprivate"]


def test_max_batch_prints_each_probe(monkeypatch, capsys):
    """--memory-budget bisects with one fresh process per probe (minutes on CPU): each probe prints a line."""
    probes = []

    def fake_peak(model_name, size, batch, engine, device_name, steps=2):
        probes.append(batch)
        return {"peak_mb": 10.0 * batch, "extra_mb": 0.0}

    monkeypatch.setattr(memory, "peak_memory", fake_peak)
    assert memory.max_batch("cnn", 8, "mixed_ghost", "cpu", 1000) == 100
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(probes) <= 11  # bounded: 1..MAX_BATCH_LIMIT (1024) in <= log2(1025) probes
    assert lines[0] == "   max batch mixed_ghost: probe 1 of <= 11, batch 512: peak 5120 MB, over 1000 MB (0 s)"
    assert all(f"batch {b}: " in line for b, line in zip(probes, lines))


def test_rows_are_written_as_they_finish_after_a_plan_and_with_an_estimate(tmp_path, monkeypatch, capsys):
    """The plan first (with the max-batch search's bound), then each config's rows written as they finish, with an
    estimate of the rest; a bench stopped before its first row leaves no folder."""
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(bench, "time_engines", lambda m, s, b, engines, *a, **k: {e: 0.01 for e in engines})
    monkeypatch.setattr(bench, "max_batch", lambda *a, hi, **k: hi // 2)
    real_write = bench.write
    monkeypatch.setattr(bench, "write", lambda rows, out, **k: (calls.append(len(rows)), real_write(rows, out, **k)))
    main(["--models", "cnn", "vgg11", "--engines", "nonprivate", "mixed_ghost", "--no-memory",
                "--memory-budget", "100", "--max-batch-limit", "64", "--device", "cpu", "--out", "here"])
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("dptrain-bench: 2 model config(s) x 2 engine(s): 10 interleaved steps each, then the max batch "
                      "under 100 MB: bisection over 1..64, <= 7 fresh processes per engine (28 at most); each row is "
                      "written as it finishes, with an estimate of the rest")
    assert calls == [2, 4]
    assert [ln.split(" in ")[0] for ln in err if "config(s) in" in ln] == ["   1/2 config(s)", "   2/2 config(s)"]
    assert "; the rest: about" in [ln for ln in err if "1/2" in ln][0]
    assert list(pd.read_csv(tmp_path / "here" / "bench-cpu.csv").max_batch) == [32] * 4

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "time_engines", stop)
    with pytest.raises(KeyboardInterrupt):
        main(["--models", "cnn", "--device", "cpu"])
    assert not (tmp_path / "outputs").exists()
