"""The terminal contract: every bad command line is one line `<prog>: error: ...` on stderr, exit 2,
nothing on stdout and nothing on disk; a run directory belongs to one live process."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINY, cli

from dptrain.train.rundir import LOCK, Claim


def _main(prog, argv, monkeypatch, capsys, cwd):
    """`prog <argv>` in this process (Hydra's task included), from `cwd`: (exit code, stdout, stderr)."""
    from dptrain.cli import audit
    from dptrain.cli import train as dptrain_cli

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [prog, *argv])
    code = 0
    try:
        (dptrain_cli.main if prog == "dptrain" else audit.main)()
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


BAD = [  # (override, what the one line says); Hydra alone says 6-25 lines and exits 1
    ("model=nosuchmodel", "unknown model 'nosuchmodel'; valid: beit, beit_base, beit_large, cnn,"),
    ("engine=opacuss", "unknown engine 'opacuss'; valid: ghost, mixed_ghost, nonprivate, opacus, opacus_ghost"),
    ("foo=1", "unknown config key 'foo'"),
    ("+epoch=1", "unknown config key 'epoch'; did you mean 'epochs'?"),
    ("optimizer.lrr=0.1", "unknown config key 'optimizer.lrr'; did you mean 'optimizer.lr'?"),
    ("engine.max_grad_norm=0", "unknown config key 'engine.max_grad_norm'; did you mean 'max_grad_norm'?"),
    ("eps=abc", "eps must be a number, got 'abc'"),
    ("batch_size=1.5", "batch_size must be an integer, got '1.5'"),
    ("eps=[", "cannot parse 'eps=[': no viable alternative at input '['"),
    ("eps=0", "eps must be > 0"),
]


@pytest.mark.parametrize("prog", ["dptrain", "dptrain-audit"])
@pytest.mark.parametrize("override,message", BAD)
def test_a_bad_command_line_is_one_line_exit_2_and_nothing_on_disk(prog, override, message, monkeypatch, capsys,
                                                                    tmp_path):
    code, out, err = _main(prog, [override], monkeypatch, capsys, tmp_path)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: {message}"), err
    assert os.listdir(tmp_path) == []  # no outputs/<name>/<date>/


def test_the_contract_holds_in_a_real_process(tmp_path):
    """The same through the console entry point's process: exit status 2, one stderr line, empty stdout."""
    r = cli("engine=opacuss", cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr.count("\n")) == (2, "", 1), r.stderr
    assert r.stderr.startswith("dptrain: error: unknown engine 'opacuss'")
    assert os.listdir(tmp_path) == []


def test_a_sweep_checks_each_value(monkeypatch, capsys, tmp_path):
    code, out, err = _main("dptrain", ["-m", "eps=1,0"], monkeypatch, capsys, tmp_path)
    assert code == 2 and err == "dptrain: error: eps must be > 0 and finite, got 0.0\n"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("override,message", [
    ("engine.name=fast", "unknown engine 'fast'"),  # checked once torch has loaded (run.check_config)
    ("model.kwargs.nonsense=1", "model 'cnn': CNN.__init__() got an unexpected keyword argument 'nonsense'"),
])
def test_a_refusal_inside_the_run_is_one_line_and_leaves_no_run_directory(override, message, monkeypatch, capsys,
                                                                          tmp_path):
    code, out, err = _main("dptrain", [*TINY, override], monkeypatch, capsys, tmp_path)
    assert (code, out) == (2, "") and err.count("\n") == 1 and err.startswith(f"dptrain: error: {message}"), err
    assert os.listdir(tmp_path) == []  # neither outputs/train/<date>/ nor outputs/


def test_paths_that_must_exist_are_never_created(monkeypatch, capsys, tmp_path):
    code, _, err = _main("dptrain", ["resume=runs/typo"], monkeypatch, capsys, tmp_path)
    assert code == 2 and err == "dptrain: error: resume=runs/typo: not a directory\n"
    code, _, err = _main("dptrain", ["dataset=cifar10", f"dataset.root={tmp_path}/nope"], monkeypatch, capsys,
                         tmp_path)
    assert code == 2 and err.startswith(f"dptrain: error: dataset.root={tmp_path}/nope: directory not found")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_refused_resume_leaves_the_run_as_it_was(monkeypatch, capsys, tmp_path):
    """A finished run, resumed by mistake: refused in one line; no .hydra/resume-*, cli.log unchanged."""
    run = tmp_path / "r"
    assert _main("dptrain", [*TINY, f"hydra.run.dir={run}"], monkeypatch, capsys, tmp_path)[0] == 0
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, out, err = _main("dptrain", [f"resume={run}"], monkeypatch, capsys, tmp_path)
    assert (code, out) == (2, "") and err == f"dptrain: error: resume={run}: that run finished (summary.json); " \
                                             "nothing to resume\n"
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert LOCK not in os.listdir(run)  # the finished run released its lock


@pytest.mark.slow
def test_a_run_directory_belongs_to_one_process(monkeypatch, capsys, tmp_path):
    """Another live process holds the directory (here: a Claim in this process, a separate flock): the second run
    is refused in one line and writes nothing there. Both running would interleave their metrics.jsonl."""
    held = Claim(str(tmp_path / "r"))
    try:
        before = sorted(os.listdir(tmp_path / "r"))
        code, out, err = _main("dptrain", [*TINY, f"hydra.run.dir={tmp_path}/r"], monkeypatch, capsys, tmp_path)
        assert (code, out) == (2, "")
        assert err == (f"dptrain: error: run directory {tmp_path}/r is in use by another dptrain process (pid "
                       f"{os.getpid()}); wait for it to end, or choose another directory (hydra.run.dir=...)\n")
        assert sorted(os.listdir(tmp_path / "r")) == before == [LOCK]
    finally:
        held.release()
    assert os.listdir(tmp_path / "r") == []
    assert _main("dptrain", [*TINY, f"hydra.run.dir={tmp_path}/r"], monkeypatch, capsys, tmp_path)[0] == 0


def test_an_error_is_printed_once_and_logged_in_the_run(monkeypatch, capsys, tmp_path):
    """A refusal after the run began writing (here: a diverged run) stays in its directory's cli.log; the
    terminal gets the line once, on stderr (not also as a log line on stdout)."""
    args = [*TINY, "epochs=2", "optimizer.lr=1e38", "eps=null", "privacy.noise_multiplier=1",
            f"hydra.run.dir={tmp_path}/r"]
    code, out, err = _main("dptrain", args, monkeypatch, capsys, tmp_path)
    assert code == 2 and "diverged" not in out and err.count("\n") == 1
    assert err.startswith("dptrain: error: training diverged in step 3 of 4")
    assert "training diverged" in (tmp_path / "r" / "cli.log").read_text()
    assert (tmp_path / "r" / "failed.json").exists()


@pytest.mark.slow
def test_torchrun_says_it_once_from_rank_0(tmp_path):
    """`torchrun --nproc_per_node=2 -m dptrain eps=0`: one dptrain line, from rank 0, and a non-zero exit
    (torchrun's own ChildFailedError report follows it: the launcher prints that for any failed worker)."""
    root = ROOT  # the repository
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "0",
                        "-m", "dptrain", "eps=0"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and r.stdout == ""
    assert [ln for ln in r.stderr.splitlines() if "dptrain: error" in ln] == [
        "dptrain: error: eps must be > 0 and finite, got 0.0"]
    assert "exitcode: 2" in r.stderr
    assert os.listdir(tmp_path) == []


# nonsense a run must not accept quietly


def test_a_dataset_of_one_class_is_refused(quick, tmp_path):
    """A folder with one class would train and report test acc 1.0000."""
    from helpers.folders import write_folder

    from dptrain.errors import UserError

    write_folder(tmp_path / "imgs", classes=("cat",), per_class=4)
    with pytest.raises(UserError, match=r"dataset 'folder' has 1 class; classification needs at least 2"):
        quick("dataset=folder", f"dataset.root={tmp_path}/imgs", "dataset.image_size=8")
    with pytest.raises(UserError, match=r"dataset.num_classes must be >= 2, got 1"):
        quick("dataset.num_classes=1")


@pytest.mark.slow
def test_a_loss_that_runs_away_is_a_warning_in_the_log_summary_and_terminal(quick, caplog):
    """optimizer.lr=1e6: the loss stays finite (no divergence error) but is 10^5 × ln C. Without the warning the
    run "finishes successfully" without a word."""
    import logging

    from dptrain import keys as key
    from dptrain.cli.train import format_summary

    for metrics in ("dp", "nonprivate"):  # the released loss: clipped per example and noised (dp), or not
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dptrain"):
            s, _ = quick("optimizer.lr=1e6", "epochs=2", f"log.train_metrics={metrics}", f"name={metrics}")
        [w] = s[key.WARNINGS]
        assert w.startswith("train loss ") and "that of a uniform guess" in w and "(ln 10 = 2.30): training is " \
            "diverging; lower optimizer.lr (now 1e+06)" in w, w
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [w]
        assert format_summary(s).endswith(f"\n  WARNING: {w}")
    assert quick("name=calm")[0][key.WARNINGS] == []


def test_a_checkpoint_partly_skipped_is_a_warning_naming_the_tensors_and_their_share(tmp_path, caplog):
    """Tensors of another shape are skipped with a WARNING, not an INFO line."""
    import logging

    import torch

    from dptrain.models.factory import create_model, load_checkpoint

    kw = {"channels": [4], "hidden": 4}
    torch.save(create_model("cnn", num_classes=10, in_chans=3, img_size=8, **kw).state_dict(), tmp_path / "w.pt")
    model = create_model("cnn", num_classes=3, in_chans=3, img_size=8, **kw)
    head = [k for k, v in model.state_dict().items() if k.startswith("head")]
    share = sum(model.state_dict()[k].numel() for k in head[-2:]) / sum(v.numel() for v in
                                                                       model.state_dict().values())
    with caplog.at_level(logging.INFO, logger="dptrain"):
        load_checkpoint(model, str(tmp_path / "w.pt"))
    [w] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert w == (f"checkpoint {tmp_path}/w.pt: 2 tensor(s) of a different shape NOT loaded, {100 * share:.1f}% of "
                 f"the model's values, trained from scratch: {', '.join(head[-2:])}")


# the help page


def test_help_is_a_page_with_every_headline_knob_its_range_and_five_examples_that_compose(monkeypatch, capsys,
                                                                                          tmp_path):
    """Ours, not Hydra's raw config dump (which has no meaning, range or example)."""
    import shlex

    from dptrain import config
    from dptrain.cli import help as dhelp
    from dptrain.cli import terminal
    from dptrain.cli.train import CONF_DIR

    code, out, err = _main("dptrain", ["--help"], monkeypatch, capsys, tmp_path)
    assert code == 0 and err == "" and os.listdir(tmp_path) == []
    lines = out.splitlines()
    for knob, rng in config.RANGES.items():
        if "." not in knob:  # a headline knob: its line has its default, a meaning and its range
            [line] = [ln for ln in lines if ln.startswith(f"  {knob}=")]
            assert line.endswith(f"range {rng}") and len(line.split()) > 3, line
    assert "  max_grad_norm=1.0             per-example clipping bound R  range (0, inf)" in lines
    examples = [ln for ln in lines if ln.startswith("  dptrain")]
    assert len(examples) == len(dhelp.EXAMPLES) == 5
    for cmd, _ in dhelp.EXAMPLES:
        args = shlex.split(cmd)[1:]
        overrides, multirun = terminal.overrides_of(args)
        assert terminal.compose(CONF_DIR, "train", overrides, multirun=multirun), cmd


def test_help_for_a_group_lists_its_options_and_keys(monkeypatch, capsys, tmp_path):
    code, out, _ = _main("dptrain", ["--help", "engine"], monkeypatch, capsys, tmp_path)
    assert code == 0
    for option in ("mixed_ghost", "opacus", "nonprivate"):
        assert any(ln.startswith(f"  {option} ") for ln in out.splitlines()), option
    assert "  engine.gamma=0.01             automatic clipping's stability constant  range (0, inf)" in out
    code, _, err = _main("dptrain", ["--help", "engin"], monkeypatch, capsys, tmp_path)
    assert code == 2 and err.startswith("dptrain: error: unknown help topic 'engin'; valid: model, dataset, engine")


def test_help_lists_every_group_of_the_config_and_of_conf(monkeypatch, capsys, tmp_path):
    """The groups come from TrainConfig's dataclass fields and conf/'s folders (not a hand list that drifts): each
    has its line in the overview and its own page; no group shows up as a headline knob (`log={}`); an option's
    summary is its file's first comment, not Hydra's `@package` line."""
    import dataclasses

    from dptrain import config
    from dptrain.cli.train import CONF_DIR

    nested = [f.name for f in dataclasses.fields(config.TrainConfig)
              if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory())]
    folders = [d for d in os.listdir(CONF_DIR) if os.path.isdir(os.path.join(CONF_DIR, d)) and d != "hydra"]
    _, out, _ = _main("dptrain", ["--help"], monkeypatch, capsys, tmp_path)
    listed = out.split("groups (")[1].split("examples:")[0]
    for g in {*nested, *folders}:
        assert f"\n  {g} " in listed, g
        assert f"  {g}=" not in out.split("groups (")[0], g
        code, page, _ = _main("dptrain", ["--help", g], monkeypatch, capsys, tmp_path)
        assert code == 0 and page.startswith(f"dptrain {g}=<option>") and "@package" not in page, g
    assert {"log", "regime", "hparams_search"} <= {*nested, *folders}


# progress a person reads


@pytest.mark.slow
def test_the_rule_table_and_checkpoint_lines_are_debug_when_nothing_is_on_the_fallback(quick, caplog):
    """The 9-line rule table and the per-epoch checkpoint lines are DEBUG, not INFO."""
    import logging

    with caplog.at_level(logging.INFO, logger="dptrain"):
        quick("epochs=2", "checkpoint.every_s=0.0001")
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not [m for m in info if "rules chosen" in m or "checkpoint at step" in m or "fallback share" in m], info
    assert len(info) <= 3, info


def test_the_bar_eps_is_recomputed_within_an_epoch_at_a_bounded_cost():
    """The bar's ε follows the steps within an epoch, not only the epoch start's."""
    import time

    from dptrain.train.epochs import LiveEps

    class Budget:
        private, calls = True, []

        def eps_spent(self, steps):
            self.calls.append(steps)
            time.sleep(0.01)
            return steps / 10

    b = Budget()
    live = LiveEps(b, 0.0, on=True)
    t = time.perf_counter()
    assert live.at(3) == 0.3 and live.at(4) == 0.3  # the second call within 50x the first's cost: cached
    assert live.next_at - t >= 50 * 0.01
    time.sleep(live.next_at - time.perf_counter() + 0.01)
    assert live.at(7) == 0.7 and b.calls == [3, 7]
    off = LiveEps(b, 0.0, on=False)  # no bar (progress=false, a log file): no accountant call
    assert off.at(9) == 0.0 and b.calls == [3, 7]


def test_log_lines_go_above_the_bar_on_a_terminal(monkeypatch):
    from omegaconf import OmegaConf
    from tqdm.contrib.logging import logging_redirect_tqdm

    from dptrain.train.distributed import SINGLE
    from dptrain.train.epochs import bar_logging

    cfg = OmegaConf.create({"progress": True})
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert type(bar_logging(cfg, SINGLE)) is type(logging_redirect_tqdm())
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert type(bar_logging(cfg, SINGLE)) is not type(logging_redirect_tqdm())


def test_a_run_is_named_for_what_ran():
    """Not only `vit_tiny_patch16_224` for a ViT run at patch 4 on 32x32 images."""
    from dptrain.config import model_name

    vit = {"name": "vit_tiny_patch16_224", "kwargs": {"patch_size": 4}, "img_size": None}
    assert model_name(vit, 32) == "vit_tiny_patch16_224 (patch_size=4) at 32x32"
    assert model_name({"name": "cnn", "kwargs": {"hidden": 128}}) == "cnn"
