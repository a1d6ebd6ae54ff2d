"""Runs the checkpoint, distributed and GPU tests share: a tiny run's overrides, a run killed at a known step (in
process or as a SIGKILLed subprocess) and the comparison of two run directories bit for bit."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import CONF
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import dptrain.train.loop
from dptrain import keys as key
from dptrain.config import register

CRASH = str(Path(__file__).with_name("crash.py"))  # the `dptrain` command, SIGKILLed at a known point


# 64 fake 8×8 images, L = 16: two epochs of 4 steps, on the CPU (where bit-identity is promised). σ given and the
# gdp accountant: no 6 s calibration, and an ε in 2 ms for each of the per-step checkpoints below (rdp: 0.5 s).
DATA = ["progress=false", "device=cpu", "dataset=fake", "dataset.size=64", "dataset.image_size=8", "epochs=2",
        "batch_size=16", "physical_batch_size=8", "eps=null", "privacy.noise_multiplier=1.0", "privacy.accountant=gdp"]


RUN = [*DATA, "model.kwargs.channels=[4]", "model.kwargs.hidden=4"]


EVERY_STEP = "checkpoint.every_s=1e-9"  # a checkpoint after every step (the time since the last write is > 0)


def crash(kill, *args, cwd):
    """`dptrain <args>` as a subprocess that SIGKILLs itself at `kill` (helpers/crash.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    r = subprocess.run([sys.executable, CRASH, kill, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == -9, (kill, r.returncode, r.stderr[-2000:])  # killed, not finished or failed


def assert_same_run(a: Path, b: Path) -> None:
    """The two run directories hold bit-identical weights, identical metrics.jsonl and summaries that agree on
    everything but time, memory and the resume record."""
    wa, wb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    differ = {k for k in key.SUMMARY if sa[k] != sb[k]}
    assert differ <= {key.SAMPLES_PER_S, key.PEAK_MEM_MB, key.STEP_MS, key.WALL_S, key.RESUMED, key.CONFIG}, differ
    assert sa[key.TEST_ACC] == sb[key.TEST_ACC] and sa[key.EPS_SPENT] == sb[key.EPS_SPENT]
    assert sa[key.STEPS] == sb[key.STEPS] and sa[key.EPOCHS] == sb[key.EPOCHS]


def status(d: Path) -> dict:
    return json.loads((d / "status.json").read_text())


def compose(*overrides, return_hydra_config=False):
    """The real conf/ tree composed with overrides, as `dptrain <overrides>` would."""
    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return hydra_compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)
    finally:
        GlobalHydra.instance().clear()


class Killed(BaseException):
    """In-process stand-in for SIGKILL: not an Exception, so nothing in dptrain handles it."""


@contextlib.contextmanager
def dies_at(step: int):
    """Inside: a run dies (Killed) once its `step`-th step is taken, before anything after it is saved or logged;
    dptrain.train.loop is restored on the way out. Callers without pytest's monkeypatch (a module fixture, a worker)."""
    real, count = dptrain.train.loop.all_finite, [0]

    def all_finite(tensors):
        count[0] += 1
        if count[0] == step:
            raise Killed
        return real(tensors)

    dptrain.train.loop.all_finite = all_finite
    try:
        yield
    finally:
        dptrain.train.loop.all_finite = real


def interrupt(monkeypatch, at_step: int) -> None:
    """The next run dies once its `at_step`-th step is taken, before anything after it is saved or logged."""
    real, count = dptrain.train.loop.all_finite, [0]

    def all_finite(tensors):
        count[0] += 1
        if count[0] == at_step:
            monkeypatch.setattr(dptrain.train.loop, "all_finite", real)
            raise Killed
        return real(tensors)

    monkeypatch.setattr(dptrain.train.loop, "all_finite", all_finite)
