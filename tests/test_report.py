"""A table is one sweep; dptrain-report turns its runs into csv, md and png, tolerating failures."""

import json
import os

import pandas as pd
import pytest
from conftest import TINY, cli

from dptrain import keys as key
from dptrain.report import report

# csv column → the summary.json key it reads, written out here rather than taken from schema.py, so that a column
# that reads the wrong key (test_acc from train/loss) fails whether the slip is in schema.py or in report.py
PUBLISHED = {
    "model": "model", "dataset": "dataset", "engine": "engine", "eps": "privacy/eps", "eps_spent": "privacy/eps_spent",
    "delta": "privacy/delta", "noise_multiplier": "privacy/noise_multiplier", "sample_rate": "privacy/sample_rate",
    "steps": "privacy/steps", "accountant": "privacy/accountant", "sampling": "privacy/sampling",
    "test_acc": "test/acc", "train_loss": "train/loss", "samples_per_s": "perf/samples_per_s",
    "step_ms": "perf/step_ms", "peak_mem_mb": "perf/peak_mem_mb", "wall_s": "wall_s", "commit": "commit",
    "machine": "machine", "checkpoint_eps_spent": "privacy/checkpoint_eps_spent", "train_acc": "train/acc",
    "commit_dirty": "commit_dirty",
}


def assert_rows_match_summaries(df):
    """Every csv cell equals the value in the summary.json of the run directory that row names."""
    def same(cell, want):
        if want is None:
            return pd.isna(cell)
        return cell == pytest.approx(want, rel=1e-12) if isinstance(want, float) else cell == want

    for _, row in df.iterrows():
        s = json.loads(open(os.path.join(row.run_dir, "summary.json")).read())
        for col, k in PUBLISHED.items():
            want = s[k] if not (col == "eps" and s[k] is None) else s["config"]["eps"]  # σ given: the config's
            assert same(row[col], want), (row.run_dir, col, row[col], want)
        for col in ("seed", "batch_size", "epochs"):
            assert same(row[col], s["config"][col]), (row.run_dir, col)
        assert same(row["name"], s["name"])


@pytest.mark.slow
def test_table_sweep_narrowed_then_report(tmp_path):
    r = cli("table=acc_vs_eps", *TINY, "hydra.sweeper.params.eps='1,8'", "hydra.sweeper.params.model=cnn",
            "hydra.sweeper.params.engine=mixed_ghost", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (tmp_path / "sweep" / "9" / ".hydra").mkdir(parents=True)  # a job that died before its summary
    (tmp_path / "sweep" / "8").mkdir()  # a job the divergence guard stopped
    (tmp_path / "sweep" / "8" / "failed.json").write_text(json.dumps(
        {key.STATUS: "failed", key.ERROR: "training diverged: non-finite training loss (nan)", key.STEP: 7,
         key.EPS_SPENT: 0.5, key.DELTA: 1e-5}))
    out = report([str(tmp_path / "sweep")], out=str(tmp_path / "results"))
    assert out["runs"] == 2 and sorted(out["failed"]) == [
        f"{tmp_path}/sweep/8 (failed: training diverged: non-finite training loss (nan); 7 steps, eps spent 0.5 at "
        "delta 1e-05)", f"{tmp_path}/sweep/9 (no summary.json: failed or unfinished)"]
    df = pd.read_csv(tmp_path / "results" / "acc_vs_eps.csv")
    assert sorted(df.eps) == [1.0, 8.0] and set(df.engine) == {"mixed_ghost"}
    assert list(df.columns[: len(PUBLISHED)]) == list(PUBLISHED)
    assert_rows_match_summaries(df)
    md = (tmp_path / "results" / "acc_vs_eps.md").read_text()
    assert "eps=1.0" in md and "failed or unfinished" in md and "7 steps, eps spent 0.5" in md
    pivot = md.split("## test accuracy")[1].split("##")[0].strip().splitlines()[2:]  # one seed per cell
    header, *rows = [[c.strip() for c in line.split("|")[1:-1]] for line in pivot if not line.startswith("|:")]
    cells = {(r[0], r[1]): dict(zip(header, r)) for r in rows}
    for _, row in df.iterrows():
        assert float(cells[(row.model, row.engine)][f"eps={row.eps}"]) == pytest.approx(row.test_acc, abs=5e-5)
    assert (tmp_path / "results" / "acc_vs_eps.png").stat().st_size > 1000


def test_experiments_compose(compose):
    for f in sorted(os.listdir(os.path.join(os.path.dirname(__file__), "..", "conf", "experiment"))):
        cfg = compose(f"experiment={f[:-5]}")
        assert cfg.name == f[:-5]
    cfg = compose("experiment=beit_cifar10_eps1")
    assert cfg.model.pretrained and cfg.eps == 1.0 and cfg.dataset.name == "cifar10"


@pytest.mark.slow
def test_optuna_search_runs_when_the_extra_is_installed(tmp_path):
    """The optional extra (pip install 'dptrain[optuna]', also in the dev extras, so `make test` runs it)."""
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
    d.mkdir(parents=True)
    s = dict.fromkeys(key.SUMMARY) | {key.MODEL: "cnn", key.ENGINE: "mixed_ghost", key.TEST_ACC: 0.5,
                                      key.STEP_MS: 10.0, key.PEAK_MEM_MB: 100.0, key.CONFIG: {"eps": 3.0}} | values
    (d / "summary.json").write_text(json.dumps(s))


def test_csv_columns_come_from_the_schema(tmp_path):
    """Every reported key holds a different value, so a column reading another key's value fails."""
    assert key.COLUMNS == PUBLISHED
    distinct = {k: 0.001 * (i + 1) for i, k in enumerate(PUBLISHED.values())} | {
        key.MODEL: "cnn", key.DATASET: "fake", key.ENGINE: "ghost", key.ACCOUNTANT: "rdp", key.SAMPLING: "poisson",
        key.COMMIT: "abc123", key.MACHINE: "x86", key.STEPS: 17, key.COMMIT_DIRTY: True}
    write_run(tmp_path / "runs" / "a", **distinct, config={"eps": 3.0, "seed": 4, "batch_size": 32, "epochs": 2.0})
    write_run(tmp_path / "runs" / "b", **{**distinct, key.EPS: None, key.TEST_ACC: 0.75},
              config={"eps": 8.0, "seed": 5, "batch_size": 64, "epochs": 1.0})  # σ given: eps from the config
    report([str(tmp_path / "runs")], out=str(tmp_path / "results"))
    df = pd.read_csv(tmp_path / "results" / "runs.csv")
    assert list(df.columns[: len(PUBLISHED)]) == list(PUBLISHED)
    assert len(df) == 2
    assert_rows_match_summaries(df)


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



def test_plot_has_plain_eps_ticks_and_memory_from_zero(tmp_path, monkeypatch):
    """The ε axis is labelled 1, 2, 3, 8 (not 10⁰, 2×10⁰, ...: log scale with minor labels) and the memory axis
    starts at 0 (not at the smallest peak, 1270 MB, which made a 1% difference look large)."""
    from matplotlib.figure import Figure

    from dptrain.report import plot_runs

    figs = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figs.append(self))
    df = pd.DataFrame([{"model": "cnn", "engine": e, "eps": eps, "test_acc": 0.5, "step_ms": 10.0,
                        "peak_mem_mb": 1270.0 + 10 * i} for i, e in enumerate(["mixed_ghost", "opacus"])
                       for eps in (1.0, 2.0, 3.0, 8.0)])
    plot_runs(df, str(tmp_path / "p.png"))
    fig = figs[0]
    fig.canvas.draw()
    acc, _, memory = fig.axes
    assert list(acc.get_xticks()) == [1.0, 2.0, 3.0, 8.0]
    assert [t.get_text() for t in acc.get_xticklabels()] == ["1", "2", "3", "8"]
    assert not [t.get_text() for t in acc.xaxis.get_minorticklabels() if t.get_text()]
    assert memory.get_ylim()[0] == 0 and memory.get_ylim()[1] >= 1280


def test_report_goes_beside_the_runs_unless_out_names_a_folder(tmp_path, monkeypatch):
    """The report goes beside the runs; the tracked results/ only when --out names it."""
    from dptrain.cli.report import main

    for i in range(2):
        write_run(tmp_path / "sweep" / str(i), **{key.MODEL: "cnn", key.ENGINE: "ghost", key.EPS: 1.0 + i,
                                                   key.DATASET: "digits", key.DELTA: 1e-5},
                  config={"eps": 1.0 + i, "seed": 0, "batch_size": 32, "epochs": 3.0})
    monkeypatch.chdir(tmp_path)
    main(["sweep"])
    assert sorted(p.name for p in (tmp_path / "sweep").glob("runs.*")) == ["runs.csv", "runs.md", "runs.png"]
    assert not (tmp_path / "results").exists()
    main(["sweep", "--out", "results"])
    assert (tmp_path / "results" / "runs.csv").exists()
    assert "## test accuracy (one run per cell)" in (tmp_path / "sweep" / "runs.md").read_text()  # one seed


def test_plot_axes_are_honest_and_titled(tmp_path, monkeypatch):
    """Accuracy from 0 to 1 (0.1000-0.1028 filled the panel), a title naming the dataset, δ and epochs, engines as
    points without a joining line, and the bench's memory ratios on a linear axis from 0."""
    from matplotlib.figure import Figure

    from dptrain.bench.speed import plot_bench
    from dptrain.report import plot_runs

    figs = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figs.append(self))
    df = pd.DataFrame([{"model": "cnn", "engine": e, "eps": eps, "test_acc": 0.1 + 0.001 * eps, "step_ms": 10.0,
                        "peak_mem_mb": 1270.0, "dataset": "digits", "delta": 1e-5, "epochs": 15.0}
                       for e in ("mixed_ghost", "opacus") for eps in (1.0, 3.0)])
    plot_runs(df, str(tmp_path / "p.png"))
    acc, _, memory = figs[0].axes
    assert acc.get_ylim() == (0, 1)
    assert figs[0]._suptitle.get_text() == "digits; δ = 1e-05; 15 epochs; 4 run(s)"
    assert [line.get_linestyle() for line in memory.get_lines()] == ["None"]
    bench = pd.DataFrame([{"model": "cnn", "size": 32, "batch": 32, "engine": e, "time_vs_nonprivate": t,
                           "peak_vs_nonprivate": m, "extra_vs_nonprivate": m} for e, t, m in
                          (("nonprivate", 1.0, 1.0), ("mixed_ghost", 1.5, 1.017))])
    plot_bench(bench, str(tmp_path / "b.png"))
    time_ax, peak_ax, extra_ax = figs[1].axes
    assert time_ax.get_yscale() == "log" and peak_ax.get_yscale() == extra_ax.get_yscale() == "linear"
    assert peak_ax.get_ylim()[0] == 0 and extra_ax.get_ylim()[0] == 0


def test_nothing_to_report_is_one_line_and_exit_2(tmp_path, capsys):
    from dptrain.cli.report import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"dptrain-report: error: no summary.json under {tmp_path}/empty\n"


def ledger_run(d, *, seed, sigma=1.0, q=0.01, steps=100, delta=1e-5, dataset="digits", secure=False, **values):
    """A private run at `seed` whose ledger is one DP-SGD mechanism (σ, q, steps) after the DP normalisation's two
    queries (privacy/prior), as a run's summary.json writes them."""
    from dptrain.privacy.accounting import epsilon_of

    ledger = [{"release": "dataset.normalize=dp statistics", "noise_multiplier": 8.0, "sample_rate": 1.0, "steps": 2},
              {"release": "model", "noise_multiplier": sigma, "sample_rate": q, "steps": steps}]
    spent = epsilon_of([(8.0, 1.0, 2), (sigma, q, steps)], delta=delta)
    write_run(d, **{key.DATASET: dataset, key.DELTA: delta, key.ACCOUNTANT: "prv", key.EPS_SPENT: spent,
                    key.PRIOR: [[8.0, 1.0, 2]], key.LEDGER: ledger, key.SECURE: secure,
                    key.CONFIG: {"eps": 3.0, "seed": seed}} | values)
    return spent


def test_together_composes_every_runs_ledger(tmp_path, capsys):
    """A search by hand (validation runs, then the chosen run) spent the composition of all their mechanisms: two
    copies of a run compose to that run with twice the queries, well under twice its ε."""
    from dptrain.cli.report import main
    from dptrain.privacy.accounting import epsilon_of

    one = ledger_run(tmp_path / "runs" / "val", seed=1, dataset="digits-val")  # a held-out split of the same set
    ledger_run(tmp_path / "runs" / "chosen", seed=2)
    r = report([str(tmp_path / "runs")], out=str(tmp_path / "results"), together=True)
    twice = epsilon_of([(8.0, 1.0, 4), (1.0, 0.01, 200)], delta=1e-5)
    assert r["together"]["eps"] == pytest.approx(twice, rel=1e-6) and r["together"]["sum"] == pytest.approx(2 * one)
    assert one < twice < 1.6 * one
    md = (tmp_path / "results" / "runs.md").read_text()
    assert f"ε of the 2 runs together: {twice:.4g} at δ 1e-05" in md
    assert f"the sum of their ε, {2 * one:.4g}, at δ 2e-05" in md
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "results")])  # without --together: no such line
    assert "runs together" not in capsys.readouterr().out
    assert "runs together" not in (tmp_path / "results" / "runs.md").read_text()


@pytest.mark.parametrize("case, message", [
    ("nonprivate", "non-private run(s) among them"), ("delta", "these runs have delta 1e-05, 1e-06"),
    ("dataset", "these runs have dataset cifar10, digits"), ("no ledger", "has no privacy/ledger"),
    ("failed", "1 failed or unfinished run(s) spent ε too"),
    ("same seed", "both ran at seed 0 without privacy.secure, so they drew the same noise"),
    ("one secure", "both ran at seed 0 without privacy.secure")])
def test_together_refuses_what_it_cannot_compose(tmp_path, capsys, case, message):
    """Fail closed: a run whose ε is infinite, another δ or data set, a summary without its ledger, a failed run's
    spent ε, two runs whose noise is the same draw (one seed, not secure) — one line, exit 2, no number."""
    from dptrain.cli.report import main

    ledger_run(tmp_path / "runs" / "a", seed=0)
    other = tmp_path / "runs" / "b"
    if case == "nonprivate":
        write_run(other, **{key.DATASET: "digits", key.DELTA: 1e-5})
    elif case == "delta":
        ledger_run(other, seed=1, delta=1e-6)
    elif case == "dataset":
        ledger_run(other, seed=1, dataset="cifar10")
    elif case == "no ledger":
        ledger_run(other, seed=1, **{key.LEDGER: None})
    elif case == "same seed":
        ledger_run(other, seed=0, steps=50)  # another setting, the same noise: the difference is noise-free
    elif case == "one secure":  # b's noise is the OS's, but a third run shares a's seed and a's noise
        ledger_run(other, seed=0, secure=True)
        ledger_run(tmp_path / "runs" / "c", seed=0, q=0.02)
    else:
        other.mkdir(parents=True)
        (other / "failed.json").write_text(json.dumps({key.STATUS: "failed", key.ERROR: "diverged", key.STEP: 3,
                                                       key.EPS_SPENT: 0.2, key.DELTA: 1e-5}))
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "runs"), "--together", "--out", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_together_composes_secure_runs_at_one_seed(tmp_path):
    """privacy.secure draws every noise from OS entropy, not from the seed: runs at one seed compose."""
    from dptrain.privacy.accounting import epsilon_of

    for name in ("a", "b"):
        ledger_run(tmp_path / "runs" / name, seed=0, secure=True)
    r = report([str(tmp_path / "runs")], out=str(tmp_path / "results"), together=True)
    assert r["together"]["eps"] == pytest.approx(epsilon_of([(8.0, 1.0, 4), (1.0, 0.01, 200)], delta=1e-5), rel=1e-6)
