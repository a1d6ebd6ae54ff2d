"""Checkpoint and resume (checkpoint.py): a run killed at any instant — mid-epoch, mid-checkpoint-write — and
resumed ends with the weights (bit for bit), metrics and ε of the same run left alone; resume refuses
overrides that would change the run; dptrain-report lists killed runs as unfinished."""

import json
import os

import pytest
import torch
from helpers.runs import (
    DATA,
    EVERY_STEP,
    RUN,
    Killed,
    assert_same_run,
    compose,
    crash,
    dies_at,
    interrupt,
    status,
)

from dptrain import keys as key
from dptrain.errors import UserError


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread here and in the subprocesses: on a shared 2-core machine, 2 threads made these tiny runs
    ~10× slower (each op waits for a descheduled sibling). Runs compared bit for bit use the same count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_sigkill_mid_epoch_and_mid_write_then_resume_is_bit_identical(tmp_path):
    """A real `dptrain` process, checkpointing after every step, is SIGKILLed after step 6 (inside epoch 2); the
    process resuming it (`dptrain resume=<dir>`) is SIGKILLed inside its 2nd checkpoint write (half a
    checkpoint.pt.tmp on disk); a third resume finishes. Weights, metrics.jsonl, accuracy, steps and ε equal
    those of the same run left alone (which checkpointed only at its epoch ends: checkpoints change nothing)."""
    from dptrain.train.checkpoint import resume_config
    from dptrain.train.run import run

    ref, d = tmp_path / "ref", tmp_path / "run"
    run(compose(*RUN), str(ref))

    crash("step:6", *RUN, EVERY_STEP, f"hydra.run.dir={d}", cwd=tmp_path)
    st = status(d)
    assert not (d / "summary.json").exists() and st[key.STATUS] == "running" and st[key.STEP] == 5
    assert len((d / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 1's line

    crash("write:2", f"resume={d}", "progress=true", cwd=tmp_path)  # checkpoints after steps 6 (whole), 7 (torn)
    assert (d / "checkpoint.pt.tmp").exists() and status(d)[key.STEP] == 6
    assert (d / ".hydra" / "overrides.yaml").read_text().count("privacy.noise_multiplier=1.0")  # the first command
    assert len(list((d / ".hydra").glob("resume-*"))) == 1  # the resume's own Hydra files beside it

    run(resume_config(compose(f"resume={d}"), [f"resume={d}"]), str(d))  # as `dptrain resume=<dir>` does
    assert_same_run(ref, d)
    st = status(d)
    assert st[key.STATUS] == "finished" and [x[key.STEP] for x in st["resumed"]] == [5, 6]
    assert json.loads((d / "summary.json").read_text())[key.RESUMED] == st["resumed"]
    assert not (d / "checkpoint.pt").exists() and not (d / "checkpoint.pt.tmp").exists()


def test_killed_before_the_rename_keeps_the_previous_checkpoint(monkeypatch, tmp_path):
    """Killed after its 4th checkpoint.pt.tmp (epoch 1's end) is complete but before the rename, and before the
    epoch's metrics line: the checkpoint of step 3 is intact, and the resumed run repeats step 4."""
    import dptrain.train.checkpoint

    real, count = os.replace, [0]

    def replace(src, dst):
        if str(dst).endswith("checkpoint.pt"):
            count[0] += 1
            if count[0] == 4:
                raise Killed
        return real(src, dst)

    def kill():
        monkeypatch.setattr(dptrain.train.checkpoint.os, "replace", replace)

    ref, d = killed_and_resumed(monkeypatch, tmp_path, at_step=kill, meanwhile=lambda d: monkeypatch.undo())
    assert_same_run(ref, d)
    assert status(d)["resumed"][0][key.STEP] == 3


def killed_and_resumed(monkeypatch, tmp_path, *overrides, at_step=6, every=EVERY_STEP, base=RUN, meanwhile=None):
    """(uninterrupted run dir, killed-at-step-`at_step`-then-resumed run dir), in-process. at_step: a step, or a
    function that arms another kill; `meanwhile(run dir)` runs between the kill and the resume."""
    from dptrain.train.run import run

    ref, d = tmp_path / "ref", tmp_path / "run"
    run(compose(*base, *overrides), str(ref))
    interrupt(monkeypatch, at_step) if isinstance(at_step, int) else at_step()
    with pytest.raises(Killed):
        run(compose(*base, *overrides, every), str(d))
    assert not (d / "summary.json").exists() and status(d)[key.STATUS] == "running"
    if meanwhile is not None:
        meanwhile(d)
    run(compose(*base, *overrides, every, f"resume={d}"), str(d))
    return ref, d


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ("engine.passes=2",),
    ("engine=opacus",),
    ("engine=opacus_ghost",),
    ("engine=nonprivate",),  # shuffled batches, no noise
    ("engine=ghost", "dataset.augment=true", "privacy.augmult=2", "privacy.ema=0.9", "optimizer=adam",
     "optimizer.schedule=cosine"),
], ids=["two_pass", "opacus", "opacus_ghost", "nonprivate", "augment_ema_adam_cosine"])
def test_every_engine_resumes_bit_identical(monkeypatch, tmp_path, overrides):
    assert_same_run(*killed_and_resumed(monkeypatch, tmp_path, *overrides))


def test_resume_from_an_epoch_end_checkpoint(monkeypatch, tmp_path):
    """Only epoch-end checkpoints (the default every_s): killed in epoch 2, the run repeats its steps 5 and 6.
    metrics.jsonl is rewritten from the checkpoint's lines: a torn line left by the kill is gone, no line twice."""
    def tear(d):
        with open(d / "metrics.jsonl", "a") as f:
            f.write('{"epoch": 2, "st')

    ref, d = killed_and_resumed(monkeypatch, tmp_path, at_step=7, every="checkpoint.every_s=300", meanwhile=tear)
    assert_same_run(ref, d)
    assert status(d)["resumed"][0][key.STEP] == 4


def test_dropout_is_resumed(monkeypatch, tmp_path):
    """torch's global generator (dropout, drop-path) is part of the checkpoint: a timm ViT with both (trained
    without privacy: the built-in engine refuses dropout inside a layer its fallback replays)."""
    vit = ("engine=nonprivate", "model=timm", "model.name=test_vit", "+model.kwargs.patch_size=4",
           "+model.kwargs.drop_rate=0.2", "+model.kwargs.drop_path_rate=0.2", "+model.kwargs.proj_drop_rate=0.2")
    ref, d = killed_and_resumed(monkeypatch, tmp_path, *vit, at_step=3, base=DATA)
    assert_same_run(ref, d)


def test_secure_mode_resumes_with_fresh_entropy(monkeypatch, tmp_path):
    """privacy.secure: sampler and noise from the OS cannot be replayed; the resumed run draws fresh ones and
    takes exactly the remaining steps, and ε counts every step once."""
    from conftest import accountant_eps

    _, d = killed_and_resumed(monkeypatch, tmp_path, "privacy.secure=true")
    s = json.loads((d / "summary.json").read_text())
    assert s[key.STEPS] == 8 and s[key.SECURE] is True and s[key.RESUMED][0][key.STEP] == 5
    assert s[key.EPS_SPENT] == pytest.approx(accountant_eps(s, 8), rel=1e-9)
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [x[key.STEP] for x in lines] == [4, 8]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A run killed (in-process) after step 3, with a checkpoint at step 2; status.json "running"."""
    from dptrain.train.run import run

    d = tmp_path_factory.mktemp("killed") / "run"
    with dies_at(3), pytest.raises(Killed):
        run(compose(*RUN, EVERY_STEP), str(d))
    return d


@pytest.mark.parametrize("override,message", [
    ("eps=8", "refusing eps=8: a resumed run keeps its saved config (eps=None, not 8.0)"),
    ("batch_size=8", "refusing batch_size=8"), ("seed=1", "refusing seed=1"), ("epochs=3", "refusing epochs=3"),
    ("engine=opacus", "refusing engine=opacus"), ("model=resnet18", "refusing model=resnet18"),
    ("dataset=digits", "refusing dataset=digits"), ("dataset=fake", "(dataset.image_size=8, not 16)"),
    ("delta=1e-6", "refusing delta=1e-6"),
    ("privacy.noise_multiplier=2", "refusing privacy.noise_multiplier=2"),
    ("experiment=cifar10_cnn_eps3", "refusing experiment=cifar10_cnn_eps3: a resumed run keeps its saved config "
                                    "(experiment is not one of its keys)"),
])
def test_resume_refuses_overrides_that_change_the_run(killed, override, message):
    from dptrain.train.checkpoint import resume_config

    cfg = compose(f"resume={killed}", override)  # as `dptrain resume=<dir> <override>` composes it
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        resume_config(cfg, [f"resume={killed}", override])
    assert "\n" not in str(err.value) and "allowed: progress, logger" in str(err.value)


def test_resume_takes_the_saved_config_and_harmless_overrides(killed):
    """`resume=<dir>` alone runs the saved config (not the defaults); harmless overrides apply; an override
    equal to the saved value is no change."""
    from dptrain.train.checkpoint import resume_config

    given = ["progress=true", "logger=wandb", "checkpoint.every_s=60", "batch_size=16", "dataset.name=fake"]
    cfg = resume_config(compose(f"resume={killed}", *given), [f"resume={killed}", *given])
    assert (cfg.dataset.name, cfg.dataset.size, cfg.epochs, cfg.privacy.noise_multiplier) == ("fake", 64, 2, 1.0)
    assert cfg.progress is True and cfg.logger.name == "wandb" and cfg.checkpoint.every_s == 60
    assert cfg.resume == str(killed)


def test_in_process_resume_with_another_config_is_refused(killed, tmp_path):
    from dptrain.train.run import run

    with pytest.raises(UserError, match="max_grad_norm=2.0 differs from the run's saved max_grad_norm=1.0"):
        run(compose(*RUN, EVERY_STEP, "max_grad_norm=2", f"resume={killed}"), str(killed))


def test_resume_refuses_finished_failed_and_checkpointless_runs(tmp_path):
    from dptrain.train.checkpoint import load
    from dptrain.train.run import run

    d = tmp_path / "done"
    run(compose(*RUN, "epochs=0.25"), str(d))
    assert status(d)[key.STATUS] == "finished" and not (d / "checkpoint.pt").exists()
    with pytest.raises(UserError, match="that run finished"):
        load(compose(*RUN, f"resume={d}"))
    (d / "summary.json").rename(d / "failed.json")
    with pytest.raises(UserError, match="that run failed"):
        load(compose(*RUN, f"resume={d}"))
    (d / "failed.json").unlink()
    with pytest.raises(UserError, match="no checkpoint.pt there"):
        load(compose(*RUN, f"resume={d}"))
    with pytest.raises(UserError, match="not a directory"):
        load(compose(*RUN, f"resume={tmp_path}/nope"))


def test_every_s_0_writes_no_checkpoint(tmp_path, monkeypatch):
    from dptrain.train.run import run

    interrupt(monkeypatch, 6)
    d = tmp_path / "r"
    with pytest.raises(Killed):
        run(compose(*RUN, "checkpoint.every_s=0"), str(d))
    assert not (d / "checkpoint.pt").exists()
    assert status(d) | {"pid": 0, "updated": 0, "host": 0, key.COMMIT: 0} == {
        key.STATUS: "running", key.STEP: 0, key.STEPS: 8, key.EPS_SPENT: None, "checkpoint": None, "resumed": [],
        key.COMMIT: 0, "host": 0, "pid": 0, "updated": 0}
    from dptrain.report import collect

    assert collect([str(tmp_path)])[1] == [f"{d} (unfinished: running, or killed before its first checkpoint "
                                           "(start it again))"]


def test_the_checkpoint_holds_the_run_state(killed):
    state = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert set(state) >= {"model", "optimizer", "scheduler", "ema", "engine", "rng", "position", "budget",
                          "accountant", "config", "commit", "resumed"}
    pos = state["position"]
    assert (pos["epoch"], pos["done"], pos["rows"], len(pos["totals"]["step_times"])) == (0, 0, [], 2)
    assert pos["totals"]["examples"] > 0  # epoch 1's running sums after its steps 1 and 2
    assert list(state["accountant"]["history"]) == [(1.0, 0.25, 2)]
    assert len(state["engine"]["noise"]["cpu"]) == 8  # one generator per noise chunk
    assert state["rng"]["sampler"]["drawn"] == 4  # epoch 1's batches, drawn up front
    assert state["config"]["privacy"]["noise_multiplier"] == 1.0


def test_a_checkpoint_resumes_on_the_device_type_that_wrote_it(killed, tmp_path):
    """The noise, dropout and Opacus generators are device generators (a CPU Mersenne Twister, a CUDA
    Philox counter): a checkpoint written on cuda and resumed with device=auto on a CPU (or the reverse) would draw
    fresh streams. Refused in one line, from the checkpoint's `device`, or (an older checkpoint) from its noise
    generators' device; the noise optimizer refuses another device's generator states too."""
    import shutil

    from dptrain.privacy import DPOptimizer
    from dptrain.train.run import run

    state = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert state["device"] == "cpu"
    d = tmp_path / "moved"
    shutil.copytree(killed, d)
    state["device"], state["engine"]["noise"] = "cuda", {"cuda:0": state["engine"]["noise"]["cpu"]}
    for kept in (True, False):  # written on a GPU by this dptrain; by one that did not record the device
        if not kept:
            del state["device"]
        torch.save(state, d / "checkpoint.pt")
        with pytest.raises(UserError, match="its checkpoint was written on cuda, this run is on cpu") as err:
            run(compose(*RUN, EVERY_STEP, f"resume={d}"), str(d))
        assert "\n" not in str(err.value) and "on a machine with CUDA" in str(err.value)
    opt = DPOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1), noise_multiplier=1.0,
                      max_grad_norm=1.0, expected_batch_size=4)
    with pytest.raises(ValueError, match="saved on cuda:0, but the parameters are on cpu"):
        opt.set_generator_states({"cuda:0": state["engine"]["noise"]["cuda:0"]})


@pytest.mark.parametrize("done,drawn", [(4, 4), (4, 8)])  # an epoch-end checkpoint; one inside the next epoch
def test_a_sampler_that_redraws_other_batches_is_caught(tmp_path, done, drawn):
    """The resumed sampler is redrawn to the checkpoint's position; its generator must then stand where the
    checkpoint saw it (a tripwire for code or data that changed between the two)."""
    from dptrain.privacy.sampling import PoissonSampler
    from dptrain.train.budget import Budget
    from dptrain.train.checkpoint import Checkpointer
    from dptrain.train.loop import Position

    def sampler(seed):
        return PoissonSampler(64, sample_rate=0.25, steps=12, seed=seed)

    ref = sampler(0)
    it = iter(ref)
    want = [next(it) for _ in range(drawn)]
    for seed in (0, 1):
        s = sampler(seed)
        saver = Checkpointer(str(tmp_path), every_s=0, config={}, commit=None, budget=Budget(0.25, 12), model=None,
                             optimizer=None, scheduler=None, ema=None, engine=None, sampler=s, augment=None,
                             t_start=0.0)
        saver.position, saver._check = Position(done=done), (drawn, ref.generator.get_state())
        batches = saver.batches(s)
        if seed == 0:  # the same batches as before the kill
            got = [next(batches) for _ in range(drawn - done + 1)]
            assert all(torch.equal(a, b) for a, b in zip(got, want[done:])) and saver._check is None
        else:
            with pytest.raises(RuntimeError, match="the sampler does not redraw the batches"):
                for _ in range(drawn - done + 1):
                    next(batches)


def test_report_lists_a_killed_run_as_unfinished(killed):
    from dptrain.report import collect

    rows, failed = collect([str(killed.parent)])
    assert rows == [] and failed == [
        f"{killed} (unfinished: running, or killed; checkpoint at step 2 of 8, eps spent "
        f"{status(killed)[key.EPS_SPENT]:.4g}; continue with: dptrain resume={killed})"]


def test_a_sampler_that_cannot_redraw_its_batches_is_not_resumed(tmp_path):
    """A sampler without the BatchSampler's `generator` (a wrapper, such as dptrain-audit's canary filter) would
    start its batches over: a resumed run would repeat Poisson masks already used. Refused in one line; under
    torchrun Sharded has no generator either."""
    from dptrain.train.budget import Budget
    from dptrain.train.checkpoint import Checkpointer
    from dptrain.train.distributed import Dist, Sharded

    class Wrapped:
        n = 8

        def __iter__(self):
            yield from [torch.arange(4)] * 2

        def __len__(self):
            return 2

    assert not hasattr(Sharded(Wrapped(), Dist(rank=0, world_size=2)), "generator")
    saver = Checkpointer(str(tmp_path), every_s=0, config={}, commit=None, budget=Budget(0.25, 2), model=None,
                         optimizer=None, scheduler=None, ema=None, engine=None, sampler=Wrapped(), augment=None,
                         t_start=0.0)
    with pytest.raises(UserError, match="sampler .Wrapped. cannot redraw the batches drawn before its checkpoint") as e:
        saver.start({})
    assert "\n" not in str(e.value)
