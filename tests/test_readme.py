"""Every command in README.md's code blocks runs as written (issue #15): each `dptrain` / `dptrain-audit` line
(torchrun's too) composes with the real conf/ tree — every job of a sweep, a table's included — and passes the
checks a run makes before its data loads; the lines whose data is here (digits, fake; no pretrained weights, no
checkpoint file, no run to resume) also train, cut to a few steps. `dptrain-bench` / `dptrain-report` lines parse
with their own argument parsers."""

import itertools
import os
import re
import shlex

import pytest
from conftest import CONF

README = os.path.join(os.path.dirname(CONF), "README.md")
TOOLS = ("dptrain", "dptrain-audit", "dptrain-bench", "dptrain-report")


def tiny(overrides: list[str]) -> list[str]:
    """The command cut to one step (steps_for) of a small batch on little data — but every value it sets kept (a
    `batch_size` larger than the data must still fail)."""
    given = {a.split("=")[0].lstrip("+~") for a in overrides}
    cut = {"epochs": "0.01", "batch_size": "16", "physical_batch_size": "16", "dataset.size": "64"}
    return [*overrides, "progress=false", "checkpoint.every_s=0", *(f"{k}={v}" for k, v in cut.items()
                                                                    if k not in given)]


def readme_commands() -> list[tuple[str, list[str], bool]]:
    """(tool, arguments, under torchrun) for every command line of README.md's code blocks: comments cut,
    continuation lines joined, a <placeholder> replaced by a word."""
    out, block, pending = [], False, ""
    with open(README) as f:
        for line in f:
            if line.startswith("```"):
                block, pending = not block, ""
                continue
            if not block:
                continue
            line = pending + re.sub(r"(^|\s)#.*", "", line.rstrip("\n"))
            if line.rstrip().endswith("\\"):
                pending = line.rstrip()[:-1] + " "
                continue
            pending = ""
            words = shlex.split(re.sub(r"<[^<>]*>", "placeholder", line))
            if words and words[0] in TOOLS:
                out.append((words[0], words[1:], False))
            elif "torchrun" in words and words[words.index("torchrun") + 1:].count("-m"):
                rest = words[words.index("torchrun"):]
                i = rest.index("-m")
                assert rest[i + 1] == "dptrain", line
                out.append(("dptrain", rest[i + 2:], True))
    return out


COMMANDS = readme_commands()


def test_the_readme_has_its_commands():
    """The parser finds what is there (a broken parser must not pass the test below by finding nothing)."""
    tools = [t for t, _, _ in COMMANDS]
    assert tools.count("dptrain") >= 25 and {"dptrain-audit", "dptrain-bench", "dptrain-report"} <= set(tools)
    assert ("dptrain", ["model=vit_tiny", "model.kwargs.patch_size=4", "dataset=cifar10", "regime=scratch"],
            False) in COMMANDS
    assert sum(torchrun for _, _, torchrun in COMMANDS) >= 5


def jobs(make, config: str, args: list[str]) -> list[list[str]]:
    """The overrides of every job the command starts: a sweep (`-m`, a table's hydra.sweeper.params) expanded the
    way Hydra's basic sweeper does, the command line's values over the table's."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parse = OverridesParser.create().parse_overrides
    args = [a for a in args if a not in ("-m", "--multirun")]
    swept = {o.key_or_group: list(o.sweep_string_iterator()) for o in parse(args) if o.is_sweep_override()}
    base = [a for a, o in zip(args, parse(args)) if o.key_or_group not in swept]
    params = make(config, base, hydra=True).hydra.sweeper.get("params") or {}
    axes = {o.key_or_group: list(o.sweep_string_iterator()) if o.is_sweep_override() else [str(o.value())]
            for o in parse([f"{k}={v}" for k, v in params.items()])} | swept
    base = [a for a, o in zip(base, parse(base)) if o.key_or_group not in axes]  # a table's axis set on the line
    return [base + [f"{k}={v}" for k, v in zip(axes, values)] for values in itertools.product(*axes.values())]


@pytest.fixture
def make():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dptrain.audit import register

    register()  # train's schema and the audit's

    def go(config: str, overrides: list[str], *, hydra: bool = False):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return compose(config, overrides=overrides, return_hydra_config=hydra)

    yield go
    GlobalHydra.instance().clear()


def runs_here(cfg, *, sweep: bool, torchrun: bool) -> bool:
    """Its data and weights are on this machine, and it is one plain run."""
    return (not sweep and not torchrun and cfg.dataset.name in ("digits", "fake") and not cfg.model.pretrained
            and cfg.model.checkpoint is None and not cfg.resume)


@pytest.mark.parametrize("tool,args,torchrun", [c for c in COMMANDS if c[0] in ("dptrain", "dptrain-audit")],
                         ids=[" ".join([t, *a]) for t, a, _ in COMMANDS if t in ("dptrain", "dptrain-audit")])
def test_readme_training_command_composes_validates_and_runs(make, tmp_path, tool, args, torchrun):
    from dptrain.train.run import check_config, run

    config = "audit" if tool == "dptrain-audit" else "train"
    every = jobs(make, config, args)
    for overrides in every:
        cfg = make(config, overrides)
        check_config(cfg)  # what a run checks before anything loads; resume= is checked against its run dir
    if config == "train" and runs_here(cfg, sweep=len(every) > 1, torchrun=torchrun):
        summary = run(make(config, tiny(every[0])), str(tmp_path / "run"))
        assert summary["privacy/steps"] >= 1 and 0 <= summary["test/acc"] <= 1


@pytest.mark.parametrize("tool,args", [c[:2] for c in COMMANDS if c[0] in ("dptrain-bench", "dptrain-report")],
                         ids=[" ".join([t, *a]) for t, a, _ in COMMANDS if t in ("dptrain-bench", "dptrain-report")])
def test_readme_bench_and_report_commands_parse(tool, args):
    from dptrain.bench.steps import parse_engine
    from dptrain.cli import bench, report
    from dptrain.engines import ENGINES

    parsed = (bench if tool == "dptrain-bench" else report).parser().parse_args(args)  # SystemExit(2) if not
    for label in getattr(parsed, "engines", None) or []:
        assert parse_engine(label)[0] in ENGINES, label


def shrunk_bench(args: list[str], out: str) -> list[str]:
    """A README `dptrain-bench` line cut to seconds: 8×8 inputs, batch 2, one step, no memory processes (their
    subprocess path is test_bench.py's), the max-batch search over 1..4 — every flag it names kept."""
    from dptrain.cli import bench

    given = bench.parser().parse_args(args)
    cut = ["--sizes", "8", "--batches", "2", "--steps", "1", "--no-memory", "--max-batch-limit", "4", "--out", out]
    return [*args, *cut, *([] if given.models else ["--models", "cnn"])]


@pytest.mark.slow
@pytest.mark.parametrize("args", [a for t, a, _ in COMMANDS if t == "dptrain-bench" and "--processes" not in a],
                         ids=[" ".join(a) for t, a, _ in COMMANDS if t == "dptrain-bench" and "--processes" not in a])
def test_readme_bench_command_runs_shrunk(args, tmp_path, monkeypatch, capsys):
    """Each README `dptrain-bench` line runs (issue #30: two of them ran over 10 minutes and wrote nothing);
    `--processes` spawns gloo processes: test_bench.py / test_distributed.py run that path."""
    from dptrain.bench import memory
    from dptrain.cli.bench import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(memory, "peak_memory", lambda *a, **k: {"peak_mb": 10.0 * a[2], "extra_mb": 1.0})
    main(shrunk_bench(args, str(tmp_path / "out")))
    err = capsys.readouterr().err
    if "--profile" in args:
        return
    assert err.startswith("dptrain-bench: ") and (tmp_path / "out" / "bench-cpu.csv").exists()


@pytest.mark.slow
@pytest.mark.parametrize("args", [a for t, a, _ in COMMANDS if t == "dptrain-report"],
                         ids=[" ".join(a) for t, a, _ in COMMANDS if t == "dptrain-report"])
def test_readme_report_command_runs(args, tmp_path, monkeypatch, capsys):
    """Each README `dptrain-report` line, on one tiny finished run under each folder it names (each at its own seed:
    --together refuses runs that drew the same noise); the output lands beside the runs unless the line says --out."""
    from conftest import TINY

    from dptrain.cli import report
    from dptrain.cli.train import main
    from dptrain.report import beside

    monkeypatch.chdir(tmp_path)
    paths = [a for a in report.parser().parse_args(args).paths]
    for i, p in enumerate(paths):
        monkeypatch.setattr("sys.argv", ["dptrain", *TINY, f"seed={i}", f"hydra.run.dir={tmp_path / p / '0'}"])
        main()
    capsys.readouterr()  # the training run's own log lines
    report.main(args)
    out = capsys.readouterr().out.strip().splitlines()
    parsed = report.parser().parse_args(args)
    where = parsed.out or beside(paths)
    # the first line names the outputs; the notes (and --together's composed ε) follow it
    assert out[0].startswith(f"{len(paths)} runs → ") and f"{where}/" in out[0]
    if parsed.together:
        assert any(line.strip().startswith(f"ε of the {len(paths)} runs together: ") for line in out[1:])
