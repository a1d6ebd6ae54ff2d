"""dptrain-audit: the one-run bound (Steinke, Nasr & Jagielski 2023) against the paper's reference code and
a maintained implementation, its validity on a simulated ε-DP mechanism, and real audited runs on digits that
pass with the real engine and fail with a broken one."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import special, stats

from dptrain import audit as A


def naive_p_value(m, r, v, eps, delta):
    """The paper's reference code (`p_value_DP_audit`), line by line."""
    q = 1 / (1 + np.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return min(beta + alpha * delta * 2 * m, 1)


@pytest.mark.parametrize("m, r, v", [(1000, 100, 100), (1000, 500, 491), (100, 60, 40), (50, 10, 0), (20, 20, 13)])
@pytest.mark.parametrize("eps", [0.0, 0.5, 2.0, 6.0])
@pytest.mark.parametrize("delta", [0.0, 1e-5, 1e-2])
def test_p_value_is_the_papers_reference_code(m, r, v, eps, delta):
    assert A.p_value(m, r, v, eps, delta) == pytest.approx(naive_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


# (m, r, v, δ, β, ε̂) from jax_privacy 2.0.0 (Google DeepMind), jax_privacy.auditing._epsilon_one_run(0, m, r, v,
# β, δ): the one-run bound of its CanaryScoreAuditor.epsilon_one_run, computed with its own code (brentq on
# β - p(ε)); our bisection must find the same ε̂.
JAX_PRIVACY = [
    (1000, 100, 100, 1e-05, 0.05, 3.465376),
    (1000, 500, 491, 1e-05, 0.05, 3.431289),
    (1000, 1000, 996, 1e-05, 0.05 / 35, 4.113599),
    (1000, 200, 150, 1e-05, 0.05, 0.819973),
    (100, 100, 100, 1e-05, 0.05, 3.490216),
    (10000, 1000, 900, 1e-06, 0.05, 2.020646),
    (1000, 50, 45, 0.0, 0.05, 1.393604),
    (5000, 2000, 1500, 1e-05, 0.01, 0.975649),
    (1000, 600, 600, 1e-05, 0.05, 5.270400),
    (1000, 100, 60, 1e-05, 0.05, 0.049549),
]


@pytest.mark.parametrize("m, r, v, delta, beta, expected", JAX_PRIVACY)
def test_eps_lower_bound_matches_jax_privacy(m, r, v, delta, beta, expected):
    assert A.eps_lower_bound(m, r, v, delta=delta, beta=beta) == pytest.approx(expected, abs=2e-6)


@pytest.mark.parametrize("r, v", [(100, 100), (100, 90), (1000, 700), (37, 30)])
def test_delta_zero_is_the_clopper_pearson_limit(r, v):
    """δ = 0: ε̂ = logit of the one-sided Clopper–Pearson lower limit of the guesses' precision v/r; with all r
    correct that is q^r = β in closed form."""
    beta = 0.05
    cp = stats.beta.ppf(beta, v, r - v + 1)
    assert A.eps_lower_bound(1000, r, v, delta=0, beta=beta) == pytest.approx(special.logit(cp), abs=1e-6)
    if v == r:
        assert special.expit(A.eps_lower_bound(1000, r, r, delta=0, beta=beta)) ** r == pytest.approx(beta, rel=1e-6)


def test_chance_guessing_gives_zero_and_more_delta_gives_less():
    assert A.eps_lower_bound(1000, 100, 50, delta=1e-5, beta=0.05) == 0.0
    assert (A.eps_lower_bound(1000, 500, 480, delta=1e-3, beta=0.05)
            < A.eps_lower_bound(1000, 500, 480, delta=1e-5, beta=0.05)
            < A.eps_lower_bound(1000, 500, 480, delta=0, beta=0.05))


def test_grid_is_fixed_and_covers_both_sides():
    g = A.guess_grid(1000)
    assert len(g) == 35 and (500, 500) in g and (10, 0) in g and (0, 300) in g and (0, 0) not in g
    assert all(a + b <= 10 for a, b in A.guess_grid(10))


def _randomized_response(m, eps, rng):
    """Scores of an ε-DP mechanism that is exactly as revealing as the bound allows: each canary's score says
    its true bit with probability e^ε/(1+e^ε), independently."""
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < special.expit(eps)
    said = np.where(truthful, included, ~included)
    return said + 0.01 * rng.random(m), included  # jitter: a random order within each side


@pytest.mark.slow
def test_bound_is_valid_on_an_eps_dp_mechanism():
    """The bound must not exceed the true ε of an ε-DP mechanism more often than 1 - confidence."""
    rng = np.random.default_rng(0)
    over = sum(A.one_run_bound(*_randomized_response(400, 1.0, rng), delta=0, confidence=0.8, seed=t).eps > 1.0
               for t in range(40))
    assert over <= 4  # β = 0.2 split over 35 choices: expected ≪ 8; typically 0


def test_perfect_and_random_scores():
    rng = np.random.default_rng(1)
    included = rng.random(1000) < 0.5
    b = A.one_run_bound(included + rng.random(1000) * 0.1, included, delta=1e-5, confidence=0.95)
    assert b.eps > 3.8 and b.correct == b.guesses and b.k_plus > 0 and b.k_minus > 0
    assert b.precision_lower > 0.99
    b = A.one_run_bound(rng.random(1000), included, delta=1e-5, confidence=0.95)
    assert b.eps < 0.5


def test_ties_are_broken_at_random_not_by_index():
    """All scores equal: guesses must not follow the canaries' order (here: the included ones first)."""
    included = np.arange(1000) < 500
    assert A.one_run_bound(np.zeros(1000), included, delta=1e-5, confidence=0.95).eps < 0.5


def test_step_scores_are_the_likelihood_ratio():
    x = np.array([[0.0, 1.0, 3.0], [0.0, 0.0, -1.0]])  # (T=2, M=3)
    q, sigma = 0.1, 2.0
    lr = np.log(1 - q + q * np.exp((2 * x - 1) / (2 * sigma**2))).sum(0)
    assert np.allclose(A.step_scores(x, sample_rate=q, noise_multiplier=sigma), lr)
    assert np.allclose(A.step_scores(x, sample_rate=q, noise_multiplier=0), x.sum(0))


def test_simulated_dp_sgd_canaries_stay_below_the_accounted_eps():
    """The white-box score on what DP-SGD releases in a canary's coordinate — T = 100 steps of Poisson(q = 0.1)
    unit shifts in N(0, σ² = 1), ε = 7.06 by the PRV accountant: the bound sees something (1.75) and stays below
    ε (on the sum of the steps instead of the likelihood ratio: 1.31)."""
    from dptrain.privacy.accounting import epsilon

    q, T, sigma, m = 0.1, 100, 1.0, 1000
    eps = epsilon(noise_multiplier=sigma, sample_rate=q, steps=T, delta=1e-5, accountant="prv")
    rng = np.random.default_rng(0)
    included = rng.random(m) < 0.5
    x = (rng.random((T, m)) < q) * included + sigma * rng.standard_normal((T, m))
    b = A.one_run_bound(A.step_scores(x, sample_rate=q, noise_multiplier=sigma), included, delta=1e-5,
                        confidence=0.95)
    assert 0.5 < b.eps < eps


# ------------------------------------------------------------------------------------ the canaries
def test_dirac_canary_gradient_is_s_e_j_and_real_rows_are_untouched():
    """Through the real engine: a canary row's per-example gradient is s·e_j in the canary block and zero in the
    model; a real row's gradient is the plain model's. The engine's row probe accepts the wrapper."""
    from dptrain.models.factory import create_model
    from dptrain.privacy import PrivacyEngine

    torch.manual_seed(0)
    inner = create_model("cnn", num_classes=10, in_chans=1, img_size=8, channels=[4, 8, 8], hidden=8, act="tanh",
                         norm="none", pool=2)
    net = A.DiracCanaries(inner, 5, scale=10.0, num_classes=10)
    x = torch.randn(4, 1, 8, 8)
    x[1], x[3] = A.TAG + 2, A.TAG + 4  # canaries 2 and 4
    y = torch.tensor([3, 0, 7, 0])
    real = [0, 2]  # rows 0 and 2 are real; only they may reach the model
    ref = torch.autograd.grad(F.cross_entropy(inner(x[real]), y[real], reduction="sum"), list(inner.parameters()))
    engine = PrivacyEngine(net, mode="mixed_ghost", max_grad_norm=1e9)  # R huge: the sum is unclipped
    F.cross_entropy(net(x), y, reduction="sum").backward()
    norms = engine.per_sample_norms
    assert norms[1].item() == pytest.approx(10.0) and norms[3].item() == pytest.approx(10.0)
    assert torch.allclose(net.canary.weight.grad, torch.tensor([[0, 0, 10.0, 0, 10.0]]))
    for p, g in zip(inner.parameters(), ref):
        assert torch.allclose(p.grad, g, atol=1e-5)
    engine.detach()


def test_excluded_canaries_never_reach_a_batch():
    c = A.Canaries("noise", 100, seed=0, scale=10, max_grad_norm=1.0)
    c.n_real = 50
    batches = list(c.sampler([torch.arange(150), torch.tensor([0, 60, 149])]))
    out = set((50 + np.flatnonzero(~c.included)).tolist())
    assert not out & set(torch.cat(batches).tolist())
    assert set((50 + np.flatnonzero(c.included)).tolist()) <= set(batches[0].tolist())


# --------------------------------------------------------------------------- audited runs (digits)
# digits, cut short; the failing runs need enough canaries and steps to prove more than ε = 3 at all: with M
# canaries and 95% confidence the bound stays ≤ 3 for M = 300 even when 120 guesses are all right
FAST = ("progress=false", "epochs=2", "audit.canaries=200")
FAIL = ("progress=false", "epochs=5", "audit.canaries=500")


def _audit(compose_audit, tmp_path, *overrides, settings=FAST):
    return A.audit(compose_audit(*settings, *overrides), str(tmp_path))


@pytest.fixture
def compose_audit():
    from conftest import CONF
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    A.register()

    def make(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return compose("audit", overrides=list(overrides))

    yield make
    GlobalHydra.instance().clear()


@pytest.mark.slow
def test_real_engine_passes_white_box(compose_audit, tmp_path):
    r = _audit(compose_audit, tmp_path, "eps=3")
    assert r[A.PASSED] and r[A.EPS_LOWER_BOUND] <= r[A.EPS] <= 3.0 and r[A.OBSERVED] == "steps"
    on_disk = json.loads((tmp_path / "audit.json").read_text())
    assert tuple(on_disk) == A.AUDIT_KEYS and on_disk[A.CANARIES] == 200 and on_disk[A.DELTA] == 1e-5
    assert on_disk[A.EPS_CLAIMED_BY] == "eps_spent" and on_disk[A.CONFIDENCE] == 0.95


@pytest.mark.slow
def test_nonprivate_engine_fails_white_box(compose_audit, tmp_path):
    """Seen in the final weights alone (observe=final) too."""
    r = _audit(compose_audit, tmp_path, "engine=nonprivate", "audit.observe=final", settings=FAIL)
    assert not r[A.PASSED] and r[A.EPS_LOWER_BOUND] > 3.0 == r[A.EPS]  # the claimed target, eps=3


@pytest.mark.slow
def test_engine_without_noise_fails_white_box(compose_audit, tmp_path, monkeypatch):
    """The real engine with its noise switched off (a bug the accountant cannot see): σ and ε are reported as
    usual, the audit says otherwise."""
    from dptrain.privacy import optimizer

    monkeypatch.setattr(optimizer.DPOptimizer, "_add_noise", lambda self, grads, std: None)
    r = _audit(compose_audit, tmp_path, "eps=3", settings=FAIL)
    assert 2.9 < r[A.EPS] <= 3.0 < r[A.EPS_LOWER_BOUND] and not r[A.PASSED]


@pytest.mark.slow
def test_engine_without_clipping_fails_white_box(compose_audit, tmp_path, monkeypatch):
    """The real engine with every clip factor forced to 1 (noise σR as usual): the canaries' gradients, 10 R,
    go in unclipped."""
    from dptrain.privacy.engine import PrivacyEngine

    clip = PrivacyEngine._clip_factors

    def unclipped(self, records):
        c, done = clip(self, records)
        return (None if c is None else torch.ones_like(c)), done

    monkeypatch.setattr(PrivacyEngine, "_clip_factors", unclipped)
    r = _audit(compose_audit, tmp_path, "eps=3", settings=FAIL)
    assert r[A.EPS_LOWER_BOUND] > 3.0 and not r[A.PASSED]


@pytest.mark.slow
def test_cli_prints_one_line_and_exits_1_when_the_audit_fails(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    out = subprocess.run([sys.executable, "-m", "dptrain.cli.audit", *FAST, "engine=nonprivate", "eps=1"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 1, out.stderr
    line = [x for x in out.stdout.splitlines() if x.startswith("audit (")]
    assert len(line) == 1 and "VIOLATES eps 1.000" in line[0]
    (run_dir,) = (tmp_path / "outputs" / "audit").iterdir()
    assert json.loads((run_dir / "audit.json").read_text())[A.EPS_LOWER_BOUND] > 1.0


@pytest.mark.slow
@pytest.mark.parametrize("engine, passes", [("mixed_ghost", True), ("nonprivate", False)])
def test_black_box_digits_default(compose_audit, tmp_path, engine, passes):
    """The black-box audit at the digits default (15 epochs, 1000 noise canaries)."""
    r = A.audit(compose_audit("progress=false", "audit.canary=noise", f"engine={engine}"), str(tmp_path))
    assert r[A.PASSED] == passes
    if not passes:
        assert r[A.EPS_LOWER_BOUND] > 2.0
