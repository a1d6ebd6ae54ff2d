"""End to end: real runs on fake and digits, summary.json, metrics.jsonl, bad input, multirun, wandb."""

import json
import os
import sys

import pytest
from conftest import TINY, accountant_eps, assert_eps_spent, cli

from dptrain import keys as key
from dptrain.engines import ENGINES
from dptrain.errors import UserError


def test_summary_keys_are_the_published_ones():
    """Other tools read summary.json, metrics.jsonl and failed.json by these strings: a rename must fail here."""
    assert key.SUMMARY == (
        "test/acc", "train/loss", "train/acc", "privacy/eps", "privacy/delta", "privacy/noise_multiplier",
        "privacy/accountant", "privacy/sampling", "privacy/eps_guaranteed", "privacy/secure", "privacy/secure_noise",
        "privacy/sample_rate", "privacy/steps", "privacy/eps_spent", "privacy/prior", "privacy/ledger",
        "privacy/eps_excludes", "privacy/streams", "privacy/checkpoint", "privacy/checkpoint_eps_spent",
        "perf/samples_per_s", "perf/peak_mem_mb", "perf/step_ms", "engine", "model", "model/init", "model/trainable",
        "model/trainable_params", "dataset", "epochs", "wall_s", "device", "machine", "commit", "commit_dirty",
        "commit_diff_sha256", "name", "resumed", "warnings", "config")
    assert key.METRICS == ("epoch", "step", "train/loss", "train/acc", "test/acc", "test/loss", "privacy/eps_spent")
    assert key.FAILED == (
        "status", "error", "step", "privacy/eps", "privacy/delta", "privacy/noise_multiplier", "privacy/accountant",
        "privacy/sampling", "privacy/eps_guaranteed", "privacy/secure", "privacy/secure_noise", "privacy/sample_rate",
        "privacy/steps", "privacy/eps_spent", "privacy/prior", "privacy/ledger", "privacy/eps_excludes", "engine",
        "model", "dataset", "wall_s", "commit", "commit_dirty", "commit_diff_sha256", "name", "config")


def saved_model_on_test(run_dir, s) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of the run's model.pt on its test split, recomputed here (not by
    dptrain's evaluate). The loss is continuous: at chance accuracy the train and test splits can tie on
    accuracy, not on loss."""
    import torch

    from dptrain.data.datasets import create_dataset
    from dptrain.models.factory import create_model

    c = s[key.CONFIG]
    ds = c["dataset"]
    data = create_dataset(ds["name"], image_size=ds["image_size"], size=ds["size"], num_classes=ds["num_classes"],
                          channels=ds["channels"], seed=c["seed"])
    model = create_model(c["model"]["name"], num_classes=data.num_classes, in_chans=data.in_chans,
                         **c["model"]["kwargs"])
    model.load_state_dict(torch.load(run_dir / "model.pt"))
    x, y = data.test.tensors
    with torch.no_grad():
        out = model.eval()(x)
    return (out.argmax(1) == y).double().mean().item(), torch.nn.functional.cross_entropy(out, y).item()


@pytest.mark.parametrize("engine", list(ENGINES))
def test_every_engine_runs_and_writes_summary(quick, engine):
    s, run_dir = quick(f"engine={engine}")
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert tuple(on_disk) == tuple(s) == key.SUMMARY
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == s[key.EPOCHS] == 1 and all(tuple(line) == key.METRICS for line in lines)
    # the accuracy reported is the saved model's on the test split (16 fake images), not some other number
    acc, loss = saved_model_on_test(run_dir, s)
    assert s[key.TEST_ACC] == lines[-1][key.TEST_ACC] == pytest.approx(acc, abs=1e-12)
    assert lines[-1][key.TEST_LOSS] == pytest.approx(loss, rel=1e-5)
    assert s[key.STEPS] == lines[-1][key.STEP] == 4  # 64 examples, L = 16, one epoch
    if engine == "nonprivate":
        assert s[key.EPS_SPENT] is None and s[key.NOISE_MULTIPLIER] is None
        assert s[key.SAMPLING] is None
    else:
        assert_eps_spent(s, target=3.0, steps=lines[-1][key.STEP])
        assert s[key.SAMPLING] == "poisson"
        assert lines[-1][key.EPS_SPENT] == pytest.approx(s[key.EPS_SPENT])
    from dptrain.cli.train import format_summary

    assert f"with {engine}: test acc" in format_summary(s)
    held_out = {**s, key.CONFIG: {**s[key.CONFIG], "dataset": {**s[key.CONFIG]["dataset"], "val_fraction": 0.1}}}
    assert f"with {engine}: val acc {s[key.TEST_ACC]:.4f}" in format_summary(held_out)  # the test split unread


def test_builtin_and_opacus_give_identical_models(quick):
    """Same Poisson batches, same clipping, same averaging: with (nearly) no noise the two engines must
    train the same model (their noise streams differ)."""
    import torch

    tiny_noise = ("eps=null", "privacy.noise_multiplier=1e-9")
    a, dir_a = quick("engine=mixed_ghost", "name=a", *tiny_noise)
    state_a = torch.load(dir_a / "model.pt")
    b, dir_b = quick("engine=opacus", "name=b", *tiny_noise)
    state_b = torch.load(dir_b / "model.pt")
    for k in state_a:
        assert torch.allclose(state_a[k], state_b[k], atol=1e-5), k


def test_digits_learns(quick, compose, tmp_path):
    from dptrain.train.run import run

    cfg = compose("progress=false")  # the embedded default, as `make demo` runs it
    s = run(cfg, str(tmp_path / "d"))
    assert s[key.DATASET] == "digits" and s[key.TEST_ACC] >= 0.75  # chance: 0.1; 0.833 at seed 0 on CPU
    assert_eps_spent(s, target=3.0)


@pytest.mark.parametrize("override,message", [
    ("eps=0", "eps must be > 0"),
    ("eps=-1", "eps must be > 0"),
    ("delta=0.5", "delta=0.5 must be in"),
    ("batch_size=100000", "batch_size=100000 must be between"),
    ("model.name=resnet_does_not_exist", "unknown model 'resnet_does_not_exist'; conf names: beit, .*cnn"),
    ("dataset.name=imagenet", "unknown dataset 'imagenet'; valid: digits"),
    ("engine.name=fast", "unknown engine 'fast'; valid: mixed_ghost"),
    ("optimizer.name=lamb", "unknown optimizer 'lamb'"),
    ("engine.passes=3", "engine.passes=3: 1, or 2 with a built-in engine"),
])
def test_bad_input_is_one_clear_error(quick, override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        quick(override)


def test_missing_folder(quick, tmp_path):
    with pytest.raises(UserError, match="not found"):
        quick("dataset=folder", f"dataset.root={tmp_path}/nope")


def test_cli_error_exit_code_and_no_summary(tmp_path):
    r = cli(*TINY, "eps=-1", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path)
    assert r.returncode == 2
    assert "dptrain: error: eps must be > 0" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "r" / "summary.json").exists()


def test_cli_unknown_group_option_lists_choices(tmp_path):
    r = cli("model=nope", cwd=tmp_path)
    assert r.returncode != 0 and "resnet18" in r.stderr


@pytest.mark.slow
def test_multirun_four_jobs(tmp_path):
    r = cli("-m", *TINY, "eps=1,8", "engine=opacus,nonprivate", f"hydra.sweep.dir={tmp_path}/m", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    summaries = sorted((tmp_path / "m").glob("*/summary.json"))
    assert len(summaries) == 4
    got = {(json.loads(p.read_text())[key.ENGINE], json.loads(p.read_text())[key.CONFIG]["eps"]) for p in summaries}
    assert got == {("opacus", 1.0), ("opacus", 8.0), ("nonprivate", 1.0), ("nonprivate", 8.0)}


@pytest.mark.slow
def test_wandb_offline(quick):
    s, run_dir = quick("logger=wandb")
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert runs, "wandb wrote no offline run"
    assert any(p.suffix == ".wandb" for p in runs[0].iterdir())


@pytest.mark.slow
def test_augmult_and_ema_run(quick):
    s, _ = quick("privacy.augmult=2", "dataset.augment=true", "privacy.ema=0.9")
    assert s[key.CONFIG]["privacy"]["augmult"] == 2 and s[key.CONFIG]["privacy"]["ema"] == 0.9
    assert_eps_spent(s, target=3.0)  # K augmented copies are one example: the accounting does not change
    with pytest.raises(UserError, match="augmult"):
        quick("privacy.augmult=2")
    with pytest.raises(UserError, match="augmult=2 need a built-in engine"):
        quick("privacy.augmult=2", "dataset.augment=true", "engine=opacus")


def assert_same_model(quick, *overrides):
    """A default run and one with `overrides` (same seed, batches, noise) end with the same weights."""
    import torch

    _, dir_a = quick("name=a")
    state_a = torch.load(dir_a / "model.pt")
    _, dir_b = quick("name=b", *overrides)
    state_b = torch.load(dir_b / "model.pt")
    for k in state_a:
        assert torch.allclose(state_a[k], state_b[k], atol=1e-5), k


@pytest.mark.slow
def test_channels_last_trains_the_same_model(quick):
    """NHWC is a layout, not a different computation."""
    assert_same_model(quick, "model.channels_last=true")


@pytest.mark.slow
def test_two_passes_train_the_same_model(quick):
    """engine.passes=2 changes memory and time, not the computation."""
    assert_same_model(quick, "engine.passes=2")
    with pytest.raises(UserError, match="engine.passes=2: 1, or 2 with a built-in engine"):
        quick("engine=opacus", "engine.passes=2")


def test_ema_averages_every_optimizer_step():
    """The EMA must follow the private iterates step by step (an EMA updated once per epoch with decay
    0.999 would stay at the initial weights)."""
    import torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from dptrain.engines import create_engine
    from dptrain.train.loop import train_one_epoch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    eng = create_engine("mixed_ghost", model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                        max_grad_norm=1.0, expected_batch_size=4)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 2, 2), torch.randint(0, 3, (16,)))
    logical = list(torch.arange(16).split(4))
    w = [model[1].weight.detach().clone()]
    train_one_epoch(eng, data, logical, physical_batch_size=4, device=torch.device("cpu"), ema=ema,
                    on_step=lambda *_: w.append(model[1].weight.detach().clone()))
    expect = w[1]  # the first update copies; then e ← 0.5 e + 0.5 w after each step
    for wt in w[2:]:
        expect = 0.5 * expect + 0.5 * wt
    assert int(ema.n_averaged) == 4
    assert torch.allclose(ema.module[1].weight, expect, atol=1e-6)


@pytest.mark.slow
def test_cosine_schedule_decays_to_zero_over_the_run(quick):
    import torch

    _, d = quick("name=a", "optimizer.lr=0.5", "epochs=3")
    a = torch.load(d / "model.pt")
    _, d = quick("name=b", "optimizer.lr=0.5", "epochs=3", "optimizer.schedule=cosine")
    b = torch.load(d / "model.pt")
    assert any(not torch.allclose(a[k], b[k]) for k in a)  # a different, decaying lr was used
    from dptrain.train.optim import create_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched, lrs = create_schedule("cosine", opt, 10), []
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(UserError, match="optimizer.schedule 'linear'; valid: constant, cosine"):
        quick("optimizer.schedule=linear")


def test_model_input_size_mismatch_is_one_line(compose, tmp_path):
    from dptrain.train.run import run

    cfg = compose("progress=false", "dataset=fake", "dataset.size=32", "dataset.image_size=16", "model=timm",
                  "model.name=convnext_atto", "epochs=1", "batch_size=8")
    with pytest.raises(UserError, match=r"model 'convnext_atto' cannot take the \(3, 16, 16\) images .*image_size"):
        run(cfg, str(tmp_path / "r"))


@pytest.mark.slow
def test_scatter_cnn_trains_on_scattering_features(compose, tmp_path):
    from dptrain.train.run import run

    base = ["progress=false", "dataset=fake", "dataset.size=32", "dataset.image_size=16", "model=scatter_cnn",
            "model.kwargs.width=4", "epochs=1", "batch_size=16"]
    s = run(compose(*base, "dataset.features=scattering"), str(tmp_path / "a"))
    assert s[key.MODEL] == "scatter_cnn" and s[key.DATASET] == "fake-scattering"
    assert_eps_spent(s, target=3.0)
    with pytest.raises(UserError, match="dataset.features=scattering with dataset.augment=true stores two fixed views"):
        run(compose(*base, "dataset.features=scattering", "dataset.augment=true"), str(tmp_path / "b"))
    with pytest.raises(UserError, match="scatter_cnn takes ScatterNet features"):
        run(compose(*base), str(tmp_path / "c"))


@pytest.mark.parametrize("override,message", [
    ("eps=nan", "eps must be > 0 and finite, got nan"),
    ("eps=inf", "eps must be > 0 and finite, got inf"),
    ("delta=nan", "delta must be in (0, 1), got nan"),
    ("privacy.noise_multiplier=nan", "privacy.noise_multiplier must be > 0 and finite, got nan"),  # hung
    ("privacy.noise_multiplier=inf", "privacy.noise_multiplier must be > 0 and finite, got inf"),
    ("max_grad_norm=inf", "max_grad_norm must be > 0 and finite, got inf"),
    ("optimizer.lr=nan", "optimizer.lr must be >= 0 and finite, got nan"),  # trained to NaN weights, exit 0
    ("optimizer.lr=inf", "optimizer.lr must be >= 0 and finite, got inf"),
    ("optimizer.lr=-0.1", "optimizer.lr must be >= 0 and finite, got -0.1"),
    ("optimizer.momentum=1", "optimizer.momentum must be in [0, 1), got 1.0"),
    ("optimizer.weight_decay=nan", "optimizer.weight_decay must be >= 0 and finite, got nan"),
    ("epochs=inf", "epochs must be > 0 and finite, got inf"),
    ("privacy.ema=nan", "privacy.ema must be in (0, 1), got nan"),
    ("engine.gamma=0", "engine.gamma must be > 0 and finite, got 0.0"),
    ("dataset.val_fraction=nan", "dataset.val_fraction must be in [0, 1), got nan"),
    ("physical_batch_size=0", "physical_batch_size must be >= 1, got 0"),
])
def test_bad_numbers_are_refused_before_the_data_loads(quick, monkeypatch, override, message):
    """Non-finite and out-of-range numbers: one line, at start (config.RANGES), before any data is read."""
    def no_data(*a, **k):
        raise AssertionError("the data loaded before the config was validated")

    monkeypatch.setattr("dptrain.train.run.create_dataset", no_data)
    with pytest.raises(UserError) as err:
        quick(override)
    assert str(err.value) == message


class _Stub:
    """An engine whose loss turns nan at optimizer step `nan_loss_at`, or whose step writes inf into the weights
    at step `inf_weight_at` (steps counted from 1)."""

    def __init__(self, *, nan_loss_at=None, inf_weight_at=None):
        import torch

        self.model, self.steps = torch.nn.Linear(3, 2), 0
        self.nan_loss_at, self.inf_weight_at = nan_loss_at, inf_weight_at

    def backward(self, out, y, *, last):
        return float("nan") if self.steps + 1 == self.nan_loss_at else 1.0

    def step(self):
        self.steps += 1
        if self.steps == self.inf_weight_at:
            self.model.bias.data[1] = float("inf")

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


@pytest.mark.parametrize("stub,steps", [(dict(nan_loss_at=3), 3), (dict(inf_weight_at=2), 2)])
def test_divergence_guard_stops_at_the_step(stub, steps):
    """A non-finite loss stops the run inside step k (k counts as spent: its loss was seen, and Opacus steps
    inside backward); non-finite weights stop it right after step k."""
    import torch

    from dptrain.errors import Diverged
    from dptrain.train.loop import train_one_epoch

    engine = _Stub(**stub)
    data = torch.utils.data.TensorDataset(torch.randn(20, 3), torch.zeros(20, dtype=torch.long))
    with pytest.raises(Diverged) as err:
        train_one_epoch(engine, data, list(torch.arange(20).split(4)), physical_batch_size=2,
                        device=torch.device("cpu"))
    assert err.value.steps == steps and engine.steps == (2 if "nan_loss_at" in stub else steps)


def test_the_loop_reads_the_loss_once_per_step(monkeypatch):
    """#34 item 7: the engines return their loss as a device tensor, and the loop reads it (a host sync on CUDA)
    once per logical batch, not once per physical batch: 5 steps of 2 physical batches, 5 reads."""
    import torch

    from dptrain.engines import create_engine
    from dptrain.train.loop import train_one_epoch

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    engine = create_engine("mixed_ghost", model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                           max_grad_norm=1.0, expected_batch_size=4)
    data = torch.utils.data.TensorDataset(torch.randn(20, 3), torch.zeros(20, dtype=torch.long))
    reads, item = [], torch.Tensor.item
    def counted(t):  # who reads: the caller's file
        reads.append(os.path.basename(sys._getframe(1).f_code.co_filename))
        return item(t)

    monkeypatch.setattr(torch.Tensor, "item", counted)
    out = train_one_epoch(engine, data, list(torch.arange(20).split(4)), physical_batch_size=2,
                          device=torch.device("cpu"))
    assert reads.count("loop.py") == 5 and "engines.py" not in reads  # the privacy engine's own reads aside
    assert len(out["step_times"]) == 5 and out["examples"] == 20
    assert isinstance(engine.backward(model(data.tensors[0][:2]), data.tensors[1][:2], last=True), torch.Tensor)


def test_divergence_marks_the_run_failed_with_the_eps_spent(quick, tmp_path):
    """lr = 1e38: the loss overflows in step 3 of 4. The run stops with one line, leaves failed.json with the ε
    of the 3 steps spent (no summary.json, no model.pt), and dptrain-report lists it as failed with that ε."""
    from dptrain.report import collect

    with pytest.raises(UserError) as err:
        quick("optimizer.lr=1e38", "eps=null", "privacy.noise_multiplier=1.0")  # σ given: no 6 s calibration
    run_dir = tmp_path / "run"
    f = json.loads((run_dir / "failed.json").read_text())
    assert tuple(f) == key.FAILED and f[key.STATUS] == "failed" and f[key.STEP] == 3 and f[key.STEPS] == 4
    assert_eps_spent(f, steps=3)
    assert f[key.EPS_SPENT] < accountant_eps(f)  # 3 of the 4 steps
    assert str(err.value) == (f"training diverged in step 3 of 4: non-finite training loss (inf), eps spent "
                              f"{f[key.EPS_SPENT]:.4g} (delta 1e-05); run marked failed in {run_dir}/failed.json "
                              "(no summary.json); lower optimizer.lr")
    assert not (run_dir / "summary.json").exists() and not (run_dir / "model.pt").exists()
    rows, failed = collect([str(tmp_path)])
    assert rows == [] and failed == [f"{run_dir} (failed: training diverged: non-finite training loss (inf); "
                                     f"3 steps, eps spent {f[key.EPS_SPENT]:.4g} at delta 1e-05)"]


@pytest.mark.slow
def test_cli_divergence_is_one_line_and_exit_2(tmp_path):
    sigma = ["eps=null", "privacy.noise_multiplier=1"]
    r = cli(*TINY, *sigma, "epochs=2", "optimizer.lr=1e38", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # one line
    assert r.stderr.startswith("dptrain: error: training diverged in step 3 of 4: non-finite training loss (inf)")
    assert (tmp_path / "r" / "failed.json").exists() and not (tmp_path / "r" / "summary.json").exists()


@pytest.mark.slow
def test_checkpoint_of_a_private_run_records_its_eps(compose, tmp_path, caplog):
    """Continuing from a dptrain run's model.pt: the summary records that run's ε, δ and dataset (the budgets
    compose where the data overlap) and says so; a bare weights file records its path only."""
    import shutil

    from dptrain.train.run import run

    sigma = ["eps=null", "privacy.noise_multiplier=1.0"]  # no calibration: 6 s less per run
    first = run(compose(*TINY, *sigma, "privacy.accountant=rdp"), str(tmp_path / "a"))
    with caplog.at_level("WARNING", logger="dptrain.models"):
        s = run(compose(*TINY, *sigma, f"model.checkpoint={tmp_path}/a/model.pt"), str(tmp_path / "b"))
    ck = s[key.CHECKPOINT]
    assert ck["path"] == f"{tmp_path}/a/model.pt" and ck["summary"] == f"{tmp_path}/a/summary.json"
    assert (ck[key.EPS_SPENT], ck[key.DELTA], ck[key.DATASET], ck[key.ACCOUNTANT]) == (
        first[key.EPS_SPENT], first[key.DELTA], "fake", "rdp")
    assert s[key.CHECKPOINT_EPS_SPENT] == first[key.EPS_SPENT] != s[key.EPS_SPENT]
    assert_eps_spent(s)  # this run's own ε, as before
    assert "the budgets compose" in caplog.text and f"spent eps={first[key.EPS_SPENT]:.4g}" in caplog.text
    from dptrain.cli.train import format_summary

    assert f"its checkpoint's run spent eps {first[key.EPS_SPENT]:.3f}" in format_summary(s)

    (tmp_path / "bare").mkdir()
    shutil.copy(tmp_path / "a" / "model.pt", tmp_path / "bare" / "w.pt")
    s = run(compose(*TINY, *sigma, f"model.checkpoint={tmp_path}/bare/w.pt"), str(tmp_path / "c"))
    assert s[key.CHECKPOINT] == {"path": f"{tmp_path}/bare/w.pt", "summary": None}
    assert s[key.CHECKPOINT_EPS_SPENT] is None


@pytest.mark.parametrize(("overrides", "match"), [
    (("engine.clipping=foo",), "unknown engine.clipping 'foo'; valid: abadi, automatic"),
    (("dataset=folder",), "dataset=folder needs dataset.root="),
])
def test_one_line_errors_for_names_and_a_missing_folder_root(quick, overrides, match):
    with pytest.raises(UserError, match=match):
        quick(*overrides)


@pytest.mark.parametrize("checkpointed", [True, False])
def test_ctrl_c_is_one_line_with_the_resume_command(tmp_path, monkeypatch, capsys, checkpointed):
    """KeyboardInterrupt anywhere in a run: exit 130 and one line — the resume command when a checkpoint exists."""
    import sys

    from dptrain.cli import train as cli

    def interrupt(cfg, run_dir, **_):
        os.makedirs(run_dir, exist_ok=True)
        if checkpointed:
            open(os.path.join(run_dir, "checkpoint.pt"), "wb").close()
        raise KeyboardInterrupt

    monkeypatch.setattr("dptrain.train.run.run", interrupt)
    monkeypatch.setattr(sys, "argv", ["dptrain", *TINY, f"hydra.run.dir={tmp_path}/r"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 130 and "\n" not in err and "Traceback" not in err
    assert err == (f"dptrain: interrupted; continue the run with: dptrain resume={tmp_path}/r (its last checkpoint)"
                   if checkpointed else f"dptrain: interrupted before the first checkpoint; nothing to resume in "
                   f"{tmp_path}/r")


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="resets the RSS high-water mark (Linux)")
def test_peak_memory_is_each_runs_own(compose, tmp_path, monkeypatch):
    """A multirun sweep runs its jobs in one process: a job after a bigger one reports its own peak, not the
    process's lifetime peak (else every later engine would report the earlier one's)."""
    import torch

    from dptrain.train import run as R

    load = R._data

    def big(cfg, streams):  # 512 MB touched, then freed, inside the first run
        x = torch.ones(2**27)
        del x
        return load(cfg, streams)

    cfg = compose(*TINY)
    monkeypatch.setattr(R, "_data", big)
    first = R.run(cfg, str(tmp_path / "a"))[key.PEAK_MEM_MB]
    monkeypatch.setattr(R, "_data", load)
    second = R.run(cfg, str(tmp_path / "b"))[key.PEAK_MEM_MB]
    assert first > second + 400 and second > 50


def test_summary_epochs_are_the_epochs_requested(quick):
    """Epoch k ends at step round(k / q), as the budget's steps = round(epochs / q): 3 epochs at q = 12/64 are
    16 steps in 3 epochs of 5, 6 and 5 steps (with round(n / L) = 5 steps each they were 4 epochs, the last of one
    step), and summary.json says 3; on the digits default (q = 256/1437) 15 epochs, not 14."""
    from dptrain.privacy.accounting import steps_for
    from dptrain.train.epochs import _epoch_end, _epochs_done

    s, run_dir = quick("batch_size=12", "epochs=3")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r[key.EPOCH], r[key.STEP]) for r in lines] == [(1, 5), (2, 11), (3, 16)]
    assert s[key.STEPS] == 16 and s[key.EPOCHS] == s[key.CONFIG]["epochs"] == 3.0
    q = 256 / 1437
    steps = steps_for(15, q)
    ends = [_epoch_end(k, q, steps) for k in range(1, 16)]
    assert steps == ends[-1] == 84 and _epochs_done(15, 84, q) == 15.0
    assert {b - a for a, b in zip([0, *ends], ends)} == {5, 6}
    assert _epochs_done(1, 3, 12 / 64) == 0.6  # epochs=0.5: 3 of the first epoch's 5 steps


@pytest.mark.parametrize("engine", ["mixed_ghost", "nonprivate"])
def test_progress_bar_shows_eps_from_the_start_and_stays(quick, monkeypatch, engine):
    """The bar shows ε spent from the first step — recomputed within the epoch, not only at its start, and not
    None —, none for a non-private run, and is kept on screen at the end."""
    made, postfixes = [], []

    class Bar:
        disable, n = False, 0  # shown (a terminal)

        def __init__(self, **kw):
            made.append(kw)

        def update(self, n):
            self.n += n

        def set_postfix(self, **kw):
            postfixes.append(kw)

        def close(self):
            pass

    monkeypatch.setattr("dptrain.train.epochs.tqdm", Bar)
    s, _ = quick(f"engine={engine}", "batch_size=12", "epochs=2")
    assert made[0]["leave"] is True
    if engine == "nonprivate":
        assert not [p for p in postfixes if "eps" in p]
    else:
        assert 0 < float(postfixes[0]["eps"]) < s[key.EPS_SPENT] and postfixes[-1]["eps"] == f"{s[key.EPS_SPENT]:.3g}"
        assert all(p["eps"] != "None" for p in postfixes)


@pytest.mark.slow
def test_cli_summary_names_the_run_directory_and_the_wandb_sync(tmp_path):
    r = cli(*TINY, "logger=wandb", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    out = r.stdout.splitlines()
    assert f"  files: {tmp_path}/r (summary.json, metrics.jsonl, model.pt)" in out
    assert out[-1] == f"wandb: offline run; upload it with: wandb sync {runs[0]}"
