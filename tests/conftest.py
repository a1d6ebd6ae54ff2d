import contextlib
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # conftest and tests/helpers/ import as top-level modules
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
CONF = os.path.join(ROOT, "conf")


def _absl_handler_on_the_real_stderr() -> None:
    """dp_accounting imports absl.logging, whose handler keeps the sys.stderr of the moment — pytest's capture file.
    The next logging.config.dictConfig (every in-process Hydra run) closes every handler, and absl's closes that
    stream unless it is the current sys.stderr: pytest's capture was closed under the rest of the session. Its
    stream is pointed at the process's own stderr first, which absl never closes."""
    try:
        import absl.logging
    except ImportError:
        return
    absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__


_absl_handler_on_the_real_stderr()


def _selects_gpu_tests(markexpr: str) -> bool:
    """Whether `-m <markexpr>` can select a test marked gpu (and perhaps slow)."""
    if not markexpr.strip():
        return True
    try:  # pytest's own parser of -m (private: another pytest may lack it; then assume it can)
        from _pytest.mark.expression import Expression

        expr = Expression.compile(markexpr)
    except Exception:  # noqa: BLE001
        return True
    return any(expr.evaluate(lambda name, marks=marks, **_: name in marks) for marks in ({"gpu"}, {"gpu", "slow"}))


def pytest_configure(config):
    """The suite runs on the CPU, on a GPU machine too (#34): when no gpu-marked test is selected (`make test`), CUDA
    is hidden from this process and every subprocess before anything initialises it, so `device: auto` is cpu and
    torchrun's workers pick gloo. A selection with gpu tests: `cpu_unless_gpu` below, per test."""
    if not _selects_gpu_tests(config.getoption("markexpr") or ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(autouse=True)
def cpu_unless_gpu(request, monkeypatch):
    """A test not marked gpu runs on the CPU: `device: auto` resolves to cpu in this process (torch.cuda.is_available
    is False) and in its subprocesses (the CLI, torchrun: CUDA hidden, so gloo)."""
    if request.node.get_closest_marker("gpu") is None:
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture
def compose():
    """Compose the real conf/ tree with overrides, as `dptrain <overrides>` would (helpers/runs.compose)."""
    from helpers.runs import compose as make

    return make


@pytest.fixture
def quick(compose, tmp_path):
    """Run a tiny training in-process and return its summary."""
    from dptrain.train.run import run

    def go(*overrides):
        cfg = compose("progress=false", "dataset=fake", "dataset.size=64", "dataset.image_size=8",
                      "model.kwargs.channels=[4,8]", "model.kwargs.hidden=8", "epochs=1", "batch_size=16",
                      "physical_batch_size=8", *overrides)
        return run(cfg, str(tmp_path / "run")), tmp_path / "run"

    return go


# a run that takes a second: random 8×8 images, a one-stage CNN
TINY = ["progress=false", "dataset=fake", "dataset.size=32", "dataset.image_size=8", "model.kwargs.channels=[4]",
        "model.kwargs.hidden=4", "epochs=1", "batch_size=16"]


def cli(*args, cwd):
    """`dptrain <args>` in a subprocess, as a user runs it."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "dptrain.cli.train", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


def accountant_eps(s: dict, steps: int | None = None) -> float:
    """ε of a summary's (σ, q, δ) after `steps` (default: its privacy/steps), recomputed with Opacus' accountant
    classes directly — not through dptrain's accounting — to check the privacy/eps_spent a run reports. The ledger's
    metric releases compose in: the training metrics' two sums (noise σ_m, sensitivities C and 1, each ÷ its noise)
    ride on the model step's batch, one Gaussian of noise (σ⁻² + 2σ_m⁻²)^(-1/2); a held-out private split's two
    sums per evaluation are two q = 1 Gaussians of noise σ_v."""
    from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

    acc = {"prv": PRVAccountant, "rdp": RDPAccountant, "gdp": GaussianAccountant}[s["privacy/accountant"]]()
    rows = {r["release"]: r for r in s.get("privacy/ledger") or []}
    sigma = s["privacy/noise_multiplier"]
    if "train/loss, train/acc" in rows:
        sigma = (sigma ** -2 + 2 * rows["train/loss, train/acc"]["noise_multiplier"] ** -2) ** -0.5
    val = [(r["noise_multiplier"], 1.0, r["steps"]) for name, r in rows.items() if name.startswith("test/") and
           r["steps"] and steps is None]
    acc.history = [tuple(m) for m in s.get("privacy/prior") or []] + [  # mechanisms before training compose
        (sigma, s["privacy/sample_rate"], s["privacy/steps"] if steps is None else steps)] + val
    with np.errstate(divide="ignore"):  # PRV takes log(1 - q): -inf for the statistics' full-batch (q = 1) query
        return acc.get_epsilon(delta=s["privacy/delta"])


def assert_eps_spent(s: dict, *, target: float | None = None, steps: int | None = None) -> None:
    """privacy/eps_spent is the accountant's ε for the steps taken (under-reporting fails too); a run calibrated
    to `target` spends it to within the calibration's tolerance, 0.5% of ε (accounting.noise_multiplier_for)."""
    assert s["privacy/eps_spent"] == pytest.approx(accountant_eps(s, steps), rel=1e-6)
    if target is not None:
        assert target * (1 - 0.005) <= s["privacy/eps_spent"] <= target


@contextlib.contextmanager
def deadline(seconds=10):
    """A bisection that no longer converges (a σ calibration, under mutation testing) fails the test instead of hanging
    it."""
    def hang(*_):
        raise TimeoutError(f"the calibration did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
