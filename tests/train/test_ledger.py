"""The privacy ledger (issue 31): every release from the private examples listed with its cost, composed into
privacy/eps_spent; metric releases noised by default; the private hyperparameter search's ε including tuning."""

import json
import math
import re

import numpy as np
import pytest
from conftest import TINY, accountant_eps, cli

from dptrain import keys as key
from dptrain.privacy.accounting import epsilon_of
from dptrain.sweep.tuning import draw_trials, eps_incl_tuning, tnb_gamma, tnb_mean, tuning_rdp
from dptrain.train.budget import Budget, create_budget
from dptrain.train.ledger import TrainMetrics, evaluations, history_of, joint_sigma


def ledger_budget(accountant="rdp"):
    """Normalisation statistics (8, 1, 2), 300 steps at q = 0.01 with training metrics, 3 validation reads."""
    return Budget(sample_rate=0.01, steps=300, eps=None, delta=1e-5, noise_multiplier=1.0, accountant=accountant,
                  sampling="poisson", eps_guaranteed=True, secure=False, prior=((8.0, 1.0, 2),), metrics_noise=7.0,
                  val_noise=30.0, evaluated=(100, 200, 300), loss_clip=2 * math.log(10))


def test_ledger_composes_like_opacus_and_dp_accounting():
    """The same releases composed by Opacus' RDP accountant (history as written here) and by dp_accounting's, where
    the metric sums ride on the model step's Poisson batch as Gaussians inside one PoissonSampledDpEvent —
    dp_accounting merges them into one noise (σ⁻² + 2σ_m⁻²)^(-1/2) itself, an independent check of joint_sigma."""
    from opacus.accountants import RDPAccountant

    b = ledger_budget()
    assert b.eps_spent(300) == pytest.approx(1.6800, abs=1e-4)  # golden: RDP; PRV gives 1.3313
    assert ledger_budget("prv").eps_spent(300) == pytest.approx(1.3313, abs=2e-3)
    acc = RDPAccountant()
    acc.history = [(8.0, 1.0, 2), ((1.0 ** -2 + 2 * 7.0 ** -2) ** -0.5, 0.01, 300), (30.0, 1.0, 6)]
    assert b.eps_spent(300) == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
    dpa = pytest.importorskip("dp_accounting")
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    g = dpa.GaussianDpEvent
    step = dpa.PoissonSampledDpEvent(0.01, dpa.ComposedDpEvent([g(1.0), g(7.0), g(7.0)]))
    event = dpa.ComposedDpEvent([dpa.SelfComposedDpEvent(g(8.0), 2), dpa.SelfComposedDpEvent(step, 300),
                                 dpa.SelfComposedDpEvent(g(30.0), 6)])
    other = rdp.RdpAccountant(orders=[1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))  # Opacus' orders
    other.compose(event)
    assert b.eps_spent(300) == pytest.approx(other.get_epsilon(1e-5), rel=2e-3)  # two RDP implementations


@pytest.mark.slow
def test_ledger_rows_and_their_costs():
    b = ledger_budget("prv")
    rows = {r["release"]: r for r in b.summary(300)[key.LEDGER]}
    assert list(rows) == ["dataset.normalize=dp statistics", "model", "train/loss, train/acc",
                          "test/acc, test/loss (held-out private split)"]
    total = b.eps_spent(300)
    assert rows["model"]["eps_alone"] == pytest.approx(epsilon_of([(1.0, 0.01, 300)], delta=1e-5), rel=1e-9)
    metrics = rows["train/loss, train/acc"]
    assert metrics["joint_noise_multiplier"] == joint_sigma(1.0, 7.0)
    assert metrics["eps_alone"] == pytest.approx(epsilon_of([(7.0 / math.sqrt(2), 0.01, 300)], delta=1e-5), rel=1e-9)
    # leaving the metrics out leaves the model at σ = 1: that difference is their marginal cost
    without = epsilon_of([(8.0, 1.0, 2), (1.0, 0.01, 300), (30.0, 1.0, 6)], delta=1e-5)
    assert metrics["eps_marginal"] == pytest.approx(total - without, rel=1e-9) and metrics["eps_marginal"] > 0
    assert rows["test/acc, test/loss (held-out private split)"]["steps"] == 6
    assert b.summary(150)[key.LEDGER][-1]["steps"] == 2  # one read by step 150
    assert history_of(b.summary(300)) == [list(m) for m in b.history(300)]


@pytest.mark.slow
def test_default_metrics_cost_two_percent_of_eps(compose):
    """eps=3: the model (with no prior) alone spends 98% of ε, the training metrics the rest; with a private held-out
    split, 96%, 98% with the training metrics, 100% with the validation reads."""
    b = create_budget(compose("eps=3", "batch_size=100", "epochs=3"), 1000)
    model = epsilon_of([(b.noise_multiplier, 0.1, 30)], delta=1e-5, accountant="prv")
    assert 0.98 * 3 * (1 - 0.005) <= model <= 0.98 * 3
    assert 3 * (1 - 0.005) <= b.eps_spent(30) <= 3
    v = create_budget(compose("eps=3", "batch_size=100", "epochs=3", "dataset.val_fraction=0.1", "eval_every=1"),
                      1000)
    assert v.evaluated == (10, 20, 30) and v.val_noise is not None
    steps = [(v.noise_multiplier, 0.1, 30)]
    assert 0.96 * 3 * 0.995 <= epsilon_of(steps, delta=1e-5) <= 0.96 * 3
    assert 3 * (1 - 0.005) <= v.eps_spent(30) <= 3
    none = create_budget(compose("eps=3", "batch_size=100", "epochs=3", "log.train_metrics=nonprivate"), 1000)
    assert none.metrics_noise is None and none.excludes == ("training metrics",)


def test_gdp_refuses_what_it_cannot_compose(compose):
    from dptrain.errors import UserError

    assert create_budget(compose("privacy.accountant=gdp", "batch_size=100"), 1000).noise_multiplier
    with pytest.raises(UserError, match="accountant=gdp composes only one"):
        create_budget(compose("privacy.accountant=gdp", "batch_size=100", "dataset.val_fraction=0.1"), 1000)


@pytest.mark.parametrize("q,steps,every", [(0.178, 84, 1), (0.178, 84, 4), (0.3, 7, 0), (1.0, 3, 2), (0.07, 100, 3)])
def test_evaluations_are_the_loops(q, steps, every):
    """evaluations() against run._train's schedule: epoch k ends at run._epoch_end(k), evaluated if due."""
    from dptrain.train.epochs import _epoch_end

    want, done, epoch = [], 0, 0
    while done < steps:
        epoch += 1
        done += max(1, _epoch_end(epoch, q, steps) - done)
        if done >= steps or (every and epoch % every == 0):
            want.append(done)
    assert evaluations(q, steps, every) == tuple(want)


def test_train_metrics_clip_count_and_noise():
    import torch

    out = torch.tensor([[10.0, -10.0], [-10.0, 10.0], [0.0, 0.0]])  # losses ~0, 20 (clipped to C), log 2
    y = torch.tensor([0, 0, 1])
    m = TrainMetrics(mode="dp", clip=1.0, noise_multiplier=1.0, expected_batch_size=4, noise=None)
    m.add(out, y)
    loss, correct = m.step()
    assert loss == pytest.approx(0.0 + 1.0 + math.log(2), abs=1e-6) and correct == 1.0
    assert m.count(steps=3, seen=7) == 12.0  # steps · L, never the realised count
    exact = TrainMetrics(mode="nonprivate", clip=1.0, noise_multiplier=None, expected_batch_size=4, noise=None)
    exact.add(out, y)
    assert exact.step()[0] == pytest.approx(20.0 + math.log(2), abs=1e-5) and exact.count(3, 7) == 7.0

    class Fixed:
        def draw(self, index, n):
            return torch.full((n,), float(index), dtype=torch.float64)

    noisy = TrainMetrics(mode="dp", clip=2.0, noise_multiplier=3.0, expected_batch_size=4, noise=Fixed())
    noisy.index = 4
    assert noisy.step() == (3.0 * 2.0 * 5, 3.0 * 5)  # an empty step is noised too, keyed by its step number


def test_validation_release_is_noised_and_kept_in_range():
    import torch

    from dptrain.train.ledger import release_validation

    class Fixed:
        def __init__(self, z):
            self.z = z

        def draw(self, index, n):
            return torch.tensor(self.z, dtype=torch.float64)

    exact = {"acc": 0.5, "loss": 1.0, "correct": 50, "loss_sum": 100.0, "n": 100}
    args = {"clip": 4.0, "noise_multiplier": 2.0, "index": 3}
    assert release_validation(exact, mode="dp", noise=Fixed([1.0, -1.0]), **args) == {"acc": 0.48, "loss": 1.08}
    assert release_validation(exact, mode="dp", noise=Fixed([-80.0, 40.0]), **args) == {"acc": 1.0, "loss": 0.0}
    assert release_validation(exact, mode="none", noise=None, **args) == {"acc": None, "loss": None}
    assert release_validation(exact, mode="nonprivate", noise=None, **args) == {"acc": 0.5, "loss": 1.0}


def test_metric_noise_is_fresh_per_step_and_independent_of_the_seeded_streams():
    from dptrain.privacy.streams import Streams
    from dptrain.train.ledger import MetricNoise

    n = MetricNoise(Streams(0), 0)
    a, b = n.draw(1, 2), n.draw(2, 2)
    assert not np.allclose(a, b) and np.allclose(a, n.draw(1, 2))
    assert not np.allclose(a, MetricNoise(Streams(0), 1).draw(1, 2))  # train and validation: different streams


# --- the tuning bound (Papernot & Steinke 2022) -------------------------------------------------------------------

@pytest.mark.parametrize("shape", [0.0, 0.5, 1.0, 2.0])
def test_truncated_negative_binomial_pure_dp_is_the_papers_corollary(shape):
    """Corollary 3: an ε-DP trial (RDP ε at every order; one huge order stands for ∞) gives a (2+η)ε-DP search."""
    eps = 0.7
    out = tuning_rdp([1e10], [eps], distribution="truncated_negative_binomial", mean=1000.0, shape=shape)
    assert out[0] == pytest.approx((2 + shape) * eps, rel=1e-6)


def test_truncated_negative_binomial_mean_and_draws():
    for shape in (0.0, 0.5, 1.0, 3.0):
        gamma = tnb_gamma(10.0, shape)
        assert tnb_mean(gamma, shape) == pytest.approx(10.0, rel=1e-6)
        rng = np.random.default_rng(0)
        k = np.array([draw_trials("truncated_negative_binomial", 10.0, shape, rng) for _ in range(4000)])
        assert k.min() >= 1 and k.mean() == pytest.approx(10.0, rel=0.1)
    assert tnb_gamma(10.0, 1.0) == 0.1  # geometric: γ = 1/E[K]
    rng = np.random.default_rng(1)
    k = [draw_trials("poisson", 3.0, 0.0, rng) for _ in range(2000)]
    assert min(k) == 0 and np.mean(k) == pytest.approx(3.0, rel=0.1)


def theorem2_by_hand(rdp_of, orders, mean, shape):
    """Theorem 2 written out with scipy's root finder for γ and the min over λ̂ as a loop: ε'_λ for each order."""
    from scipy.optimize import brentq

    if shape == 1:
        gamma = 1 / mean
    else:
        gamma = brentq(lambda g: (shape * (1 - g) / (g * (1 - g ** shape)) if shape else
                                  (1 - g) / (g * math.log(1 / g))) - mean, 1e-12, 1 - 1e-12, xtol=1e-15)
    c = min((1 + shape) * ((1 - 1 / lh) * rdp_of[i] + math.log(1 / gamma) / lh) for i, lh in enumerate(orders))
    return [rdp_of[i] + c + math.log(mean) / (lam - 1) for i, lam in enumerate(orders)]


@pytest.mark.parametrize("dist,mean,shape", [("truncated_negative_binomial", 10, 1), ("truncated_negative_binomial",
                                                                                     10, 0),
                                             ("truncated_negative_binomial", 5, 0.5), ("poisson", 10, 0)])
def test_tuning_bound_by_hand_and_against_dp_accounting(dist, mean, shape):
    """DP-SGD at σ = 1.1, q = 0.01, 1000 steps (ε = 1.71 at δ = 1e-5 by RDP): the search's ε by our code, by the
    theorem written out here (TNB), and by dp_accounting's RepeatAndSelectDpEvent (its own implementation)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from dptrain.sweep.tuning import ORDERS

    history = [(1.1, 0.01, 1000)]
    eps, _ = eps_incl_tuning(history, delta=1e-5, distribution=dist, mean=mean, shape=shape)
    if dist != "poisson":
        rdp = compute_rdp(q=0.01, noise_multiplier=1.1, steps=1000, orders=list(ORDERS))
        by_hand = np.minimum.accumulate(np.array(theorem2_by_hand(rdp, ORDERS, mean, shape))[::-1])[::-1]
        assert eps == pytest.approx(get_privacy_spent(orders=list(ORDERS), rdp=by_hand, delta=1e-5)[0], rel=1e-6)
    dpa = pytest.importorskip("dp_accounting")
    from dp_accounting.rdp import rdp_privacy_accountant as rdp_acc

    one = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.1)), 1000)
    acc = rdp_acc.RdpAccountant(orders=list(ORDERS))
    from dp_accounting.dp_event import RepeatAndSelectDpEvent

    acc.compose(RepeatAndSelectDpEvent(one, float(mean), math.inf if dist == "poisson" else float(shape)))
    assert eps == pytest.approx(acc.get_epsilon(1e-5), rel=1e-3)
    assert eps > 1.7  # tuning costs something


# --- end to end: nothing from private data leaves a run outside its ledger ------------------------------------------

# keys a run writes that no private example influences: the budget, the config, timings, where it ran. (perf/* and
# the ledger use n, public as in all DP-SGD accounting; samples/s counts the sampler's batches, a function of n.)
PUBLIC = {key.EPOCH, key.STEP, key.EPOCHS, key.WALL_S, key.DEVICE, key.MACHINE, key.COMMIT, key.COMMIT_DIRTY,
          key.COMMIT_DIFF, key.NAME, key.RESUMED, key.CONFIG, key.ENGINE, key.MODEL, key.INIT,
          key.TRAINABLE, key.TRAINABLE_PARAMS, key.DATASET, key.STREAMS,
          key.CHECKPOINT, key.CHECKPOINT_EPS_SPENT, *key.PRIVACY, key.SAMPLES_PER_S, key.PEAK_MEM_MB, key.STEP_MS}
# a released key → the ledger row that pays for it (None: the public test split, dataset.val_fraction = 0)
# (warnings: read off the released training loss only — post-processing of that row)
RELEASED = {key.TRAIN_LOSS: "train/loss, train/acc", key.TRAIN_ACC: "train/loss, train/acc",
            key.WARNINGS: "train/loss, train/acc"}
# or, released exactly (log.*=nonprivate), named in privacy/eps_excludes
EXCLUDED = {key.TRAIN_LOSS: "training metrics", key.TRAIN_ACC: "training metrics", key.WARNINGS: "training metrics",
            key.TEST_ACC: "validation metrics",
            key.TEST_LOSS: "validation metrics"}
REPORT_PUBLIC = {"seed", "batch_size", "epochs", "eps", "name", "run_dir", "eps_excludes", "tuning", "eps_incl_tuning"}


def check_outputs(run_dir, s, *, val):
    """Every key of summary.json, metrics.jsonl and wandb's summary is public, paid for by a ledger row, or named in
    privacy/eps_excludes."""
    ledger = {r["release"] for r in s[key.LEDGER]} | set(s[key.EPS_EXCLUDES])
    test_row = "test/acc, test/loss (held-out private split)" if val else None
    released = RELEASED | {key.TEST_ACC: test_row, key.TEST_LOSS: test_row}
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for k in set(s) | {k for line in lines for k in line}:
        assert k in PUBLIC or (k in released and (released[k] is None or released[k] in ledger)) or (
            EXCLUDED.get(k) in ledger), k
    # wandb's offline run (binary protobuf records): every metric-like key in it, history and summary alike
    for f in run_dir.glob("wandb/offline-run-*/*.wandb"):
        found = {m.decode() for m in re.findall(rb"(?:train|test|perf|privacy)/[a-z_]+", f.read_bytes())}
        assert {key.TRAIN_LOSS, key.EPS_SPENT} <= found  # the scan sees the run's metrics
        for k in found:
            assert k in PUBLIC or (k in released and (released[k] is None or released[k] in ledger)), k


@pytest.mark.slow
def test_runs_and_a_plain_sweep_release_nothing_outside_the_ledger(tmp_path):
    """dptrain on digits (tiny, 1 epoch) with the default logger and with wandb, and a plain `-m` sweep over lr on
    a held-out private split: every output key is public or in the ledger, the training metrics are noised, and the
    report says the sweep's choice is not accounted."""
    from dptrain.report import report

    tiny = ["progress=false", "epochs=1", "device=cpu", "model.kwargs.channels=[4]", "model.kwargs.hidden=8"]
    for i, extra in enumerate(([], ["logger=wandb"], ["log.train_metrics=nonprivate"])):
        r = cli(*tiny, *extra, "privacy.noise_multiplier=1.5", "eps=null", f"hydra.run.dir={tmp_path}/r{i}",
                cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        s = json.loads((tmp_path / f"r{i}" / "summary.json").read_text())
        check_outputs(tmp_path / f"r{i}", s, val=False)
        assert s[key.EPS_SPENT] == pytest.approx(accountant_eps(s), rel=1e-6)
    exact = json.loads((tmp_path / "r2" / "summary.json").read_text())
    noisy = json.loads((tmp_path / "r0" / "summary.json").read_text())
    assert exact[key.EPS_EXCLUDES] == ["training metrics"] and noisy[key.EPS_EXCLUDES] == []
    assert "eps excludes training metrics" in cli(*tiny, "log.train_metrics=nonprivate", f"hydra.run.dir={tmp_path}/x",
                                                  cwd=tmp_path).stdout
    # same σ and seed: the same training; only the released metrics differ, by noise of the ledger's scale
    assert noisy[key.TRAIN_LOSS] != exact[key.TRAIN_LOSS]
    r = cli("-m", *tiny, "optimizer.lr=0.1,0.2", "dataset.val_fraction=0.2", f"hydra.sweep.dir={tmp_path}/m",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    for d in (tmp_path / "m").glob("[0-9]"):
        check_outputs(d, json.loads((d / "summary.json").read_text()), val=True)
    out = report([str(tmp_path / "m")], out=str(tmp_path / "results"))
    import pandas as pd

    df = pd.read_csv(out["csv"])
    assert set(df.tuning) == {"tuning cost not accounted"} and df.eps_incl_tuning.isna().all()
    assert "tuning cost not accounted" in (tmp_path / "results" / "train.md").read_text()
    assert set(df.columns) - set(key.COLUMNS) <= REPORT_PUBLIC


@pytest.mark.slow
def test_private_search_keeps_one_run_and_reports_eps_incl_tuning(tmp_path):
    from dptrain.report import report

    r = cli("-m", "hparams_search=private", *TINY, "hydra.sweeper.mean=2", f"hydra.sweep.dir={tmp_path}/s",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    t = json.loads((tmp_path / "s" / "tuning.json").read_text())
    runs = [p.parent for p in (tmp_path / "s").rglob("summary.json")]
    assert runs == ([tmp_path / "s" / "selected"] if t["selected"] else [])
    assert r.stdout.strip().splitlines()[-1].startswith("private search: ")  # the trials' own lines are gone
    if t["selected"]:
        s = json.loads((tmp_path / "s" / "selected" / "summary.json").read_text())
        assert t["eps"] == s[key.EPS_SPENT] < t["eps_incl_tuning"]
        assert t["eps_incl_tuning"] == pytest.approx(eps_incl_tuning(history_of(s), delta=s[key.DELTA],
                                                                     distribution=t["distribution"], mean=2,
                                                                     shape=1)[0])
        df = __import__("pandas").read_csv(report([str(tmp_path / "s")], out=str(tmp_path / "res"))["csv"])
        assert df.eps_incl_tuning.tolist() == [pytest.approx(t["eps_incl_tuning"])]
        assert "num: 0" in (tmp_path / "s" / "selected" / ".hydra" / "hydra.yaml").read_text()


@pytest.mark.slow
def test_private_search_refuses_a_budget_key(tmp_path):
    r = cli("-m", "hparams_search=private", *TINY, "+hydra.sweeper.params.batch_size='choice(8,16)'",
            f"hydra.sweep.dir={tmp_path}/s", cwd=tmp_path)
    assert r.returncode == 2 and "cannot search 'batch_size'" in r.stderr
