"""A table is one sweep; dptrain-report turns its runs into csv, md and png, tolerating failures."""

import os

import pandas as pd
from conftest import TINY, cli

from dptrain import schema as key
from dptrain.report import report


def test_table_sweep_narrowed_then_report(tmp_path):
    r = cli("table=acc_vs_eps", *TINY, "hydra.sweeper.params.eps='1,8'", "hydra.sweeper.params.model=cnn",
            "hydra.sweeper.params.engine=mixed_ghost", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (tmp_path / "sweep" / "9" / ".hydra").mkdir(parents=True)  # a job that died before its summary
    out = report([str(tmp_path / "sweep")], out=str(tmp_path / "results"))
    assert out["runs"] == 2 and len(out["failed"]) == 1
    df = pd.read_csv(tmp_path / "results" / "acc_vs_eps.csv")
    assert sorted(df.eps) == [1.0, 8.0] and set(df.engine) == {"mixed_ghost"}
    assert {"commit", "machine", "test_acc", "eps_spent"} <= set(df.columns)
    md = (tmp_path / "results" / "acc_vs_eps.md").read_text()
    assert "eps=1.0" in md and "failed or unfinished" in md
    assert (tmp_path / "results" / "acc_vs_eps.png").stat().st_size > 1000


def test_experiments_compose(compose):
    for f in sorted(os.listdir(os.path.join(os.path.dirname(__file__), "..", "conf", "experiment"))):
        cfg = compose(f"experiment={f[:-5]}")
        assert cfg.name == f[:-5]
    cfg = compose("experiment=beit_cifar10_eps1")
    assert cfg.model.pretrained and cfg.eps == 1.0 and cfg.dataset.name == "cifar10"


def test_optuna_search_runs_when_the_extra_is_installed(tmp_path):
    """The optional extra (pip install 'dptrain[optuna]'); skipped where it is not installed."""
    import importlib.util

    import pytest

    try:
        found = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
    except ModuleNotFoundError:  # no hydra_plugins namespace at all
        found = False
    if not found:
        pytest.skip("hydra-optuna-sweeper not installed (optional extra)")
    r = cli("hparams_search=optuna_lr_clip", *TINY, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}/opt",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    best = (tmp_path / "opt" / "optimization_results.yaml").read_text()
    assert "optimizer.lr" in best and "max_grad_norm" in best and "best_value" in best


def write_run(d, **values):
    """A finished run's directory: a summary.json with every schema key (None unless given)."""
    import json

    d.mkdir(parents=True)
    s = dict.fromkeys(key.SUMMARY) | {key.MODEL: "cnn", key.ENGINE: "mixed_ghost", key.TEST_ACC: 0.5,
                                      key.STEP_MS: 10.0, key.PEAK_MEM_MB: 100.0, key.CONFIG: {"eps": 3.0}} | values
    (d / "summary.json").write_text(json.dumps(s))


def test_csv_columns_come_from_the_schema(tmp_path):
    write_run(tmp_path / "runs" / "a", **{key.EPS_SPENT: 2.9, key.SAMPLES_PER_S: 123.0})
    report([str(tmp_path / "runs")], out=str(tmp_path / "results"))
    df = pd.read_csv(tmp_path / "results" / "runs.csv")
    assert list(df.columns[: len(key.COLUMNS)]) == list(key.COLUMNS)
    assert (df.eps_spent[0], df.samples_per_s[0], df.test_acc[0]) == (2.9, 123.0, 0.5)


def test_table_option_names_the_output_also_for_unnamed_runs(tmp_path):
    """--table wins whether or not the runs have a `name` (it was ignored for runs without one)."""
    write_run(tmp_path / "runs" / "a")
    write_run(tmp_path / "runs" / "b", **{key.TEST_ACC: 0.7})
    out = report([str(tmp_path / "runs")], table="mine", out=str(tmp_path / "results"))
    assert out["csv"] == str(tmp_path / "results" / "mine.csv") and out["runs"] == 2
    assert report([str(tmp_path / "runs")], out=str(tmp_path / "results"))["csv"].endswith("runs.csv")
    write_run(tmp_path / "named" / "c", name="sweep")
    assert report([str(tmp_path / "named")], out=str(tmp_path / "results"))["csv"].endswith("sweep.csv")
    assert report([str(tmp_path / "named")], table="mine2", out=str(tmp_path / "results"))["csv"].endswith("mine2.csv")

