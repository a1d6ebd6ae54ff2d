"""dataset.normalize=dp (DP per-channel statistics, composed into the budget), the feature cache, eval_every."""

import json

import pytest
import torch
from conftest import assert_eps_spent
from torch.utils.data import TensorDataset

from dptrain import keys as key
from dptrain.data.datasets import Data, _dp_normalize, create_dataset
from dptrain.errors import UserError
from dptrain.privacy.accounting import epsilon, noise_multiplier_for
from dptrain.train.budget import create_budget


def make_data(x, xt=None):
    y = torch.zeros(len(x), dtype=torch.long)
    xt = x.clone() if xt is None else xt
    return Data(TensorDataset(x, y), TensorDataset(xt, torch.zeros(len(xt), dtype=torch.long)), 2, x.shape[1],
                x.shape[-1], "t")


def test_statistics_are_the_clipped_means_plus_the_stated_noise():
    """With the noise draws replaced by zeros the estimates are exactly the clipped per-channel means; with
    ones, every coordinate moves by exactly noise·clip/n — the Gaussian mechanism's scale for sensitivity clip."""
    torch.manual_seed(0)
    n, C = 50, 3
    x = torch.randn(n, C, 4, 4) * torch.tensor([1.0, 2.0, 0.5]).view(1, C, 1, 1) + torch.tensor([0.3, -1.0, 2.0]).view(
        1, C, 1, 1)
    x[0] *= 100  # one example far outside the clip: its contribution is scaled down to norm `clip`
    noise, clip = 8.0, 5.0
    m_i, s_i = x.double().flatten(2).mean(2), (x.double().flatten(2) ** 2).mean(2)

    def clipped_mean(v):
        return (v * (clip / v.norm(dim=1)).clamp(max=1)[:, None]).sum(0) / n

    assert (m_i[0].norm() > clip) and (s_i[0].norm() > clip)
    for shift in (0.0, 1.0):
        d = _dp_normalize(make_data(x.clone()), noise=noise, clip=clip, normal=lambda k, s=shift: torch.full(
            (k,), s, dtype=torch.float64))
        mean = clipped_mean(m_i) + shift * noise * clip / n
        var = torch.maximum(clipped_mean(s_i) + shift * noise * clip / n - mean ** 2,
                            3 * noise * clip / n * (1 + 2 * mean.abs()))
        want = ((x.double() - mean.view(1, C, 1, 1)) / var.sqrt().view(1, C, 1, 1)).float()
        torch.testing.assert_close(d.train.tensors[0], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d.test.tensors[0], want, rtol=1e-5, atol=1e-5)  # the same map on both splits
        assert d.prior == ((8.0, 1.0, 2),)


def test_standardises_a_large_set_to_mean_zero_variance_one():
    torch.manual_seed(1)
    x = torch.randn(20000, 4, 2, 2) * 0.3 + 0.2
    d = _dp_normalize(make_data(x), noise=8.0, clip=2.0, normal=lambda k: torch.randn(k, dtype=torch.float64))
    z = d.train.tensors[0].transpose(0, 1).flatten(1)
    assert z.mean(1).abs().max() < 0.02 and (z.var(1) - 1).abs().max() < 0.03


@pytest.mark.slow
def test_run_composes_the_statistics_into_the_budget(quick, compose):
    s, run_dir = quick("dataset.normalize=dp", "eps=2")
    assert s[key.PRIOR] == [[8.0, 1.0, 2]]
    assert_eps_spent(s, target=2.0)  # Opacus' accountant over prior + training (conftest.accountant_eps)
    alone = create_budget(compose("dataset=fake", "epochs=1", "batch_size=16", "eps=2"), 64)
    assert s[key.NOISE_MULTIPLIER] > alone.noise_multiplier  # training got less of ε
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert metrics[-1][key.EPS_SPENT] == pytest.approx(s[key.EPS_SPENT])


@pytest.mark.slow
def test_calibration_with_a_prior_spends_eps_within_tolerance():
    prior = ((8.0, 1.0, 2),)
    sigma = noise_multiplier_for(eps=3.0, delta=1e-5, sample_rate=0.16384, steps=366, prior=prior)
    spent = epsilon(noise_multiplier=sigma, sample_rate=0.16384, steps=366, delta=1e-5, prior=prior)
    assert 3.0 * 0.995 < spent <= 3.0
    alone = noise_multiplier_for(eps=3.0, delta=1e-5, sample_rate=0.16384, steps=366)
    assert sigma > alone
    assert epsilon(noise_multiplier=sigma, sample_rate=0.16384, steps=0, delta=1e-5, prior=prior) == pytest.approx(
        epsilon(noise_multiplier=8.0, sample_rate=1.0, steps=2, delta=1e-5))  # before training: the prior's ε
    with pytest.raises(ValueError, match="already spend"):
        noise_multiplier_for(eps=0.1, delta=1e-5, sample_rate=0.1, steps=10, prior=((1.0, 1.0, 2),))


def test_secure_mode_draws_the_statistics_noise_from_the_os(monkeypatch):
    from dptrain.privacy.streams import Streams

    calls = []
    monkeypatch.setattr("dptrain.data.datasets.os_normal", lambda k: calls.append(k) or torch.zeros(k,
                                                                                                    dtype=torch.float64))
    create_dataset("fake", size=16, image_size=4, normalize="dp", streams=Streams(0, secure=True))
    assert calls == [3, 3]  # mean and mean-square queries, one draw per channel each
    seeded = [create_dataset("fake", size=16, image_size=4, normalize="dp", streams=Streams(0)).train.tensors[0]
              for _ in range(2)]
    torch.testing.assert_close(*seeded)  # seeded: reproducible from the run's seed


def test_unknown_normalize_and_scatter_norm_are_one_line_errors():
    with pytest.raises(UserError, match="unknown dataset.normalize 'bn'; valid: none, dp"):
        create_dataset("fake", size=8, normalize="bn")
    from dptrain.models.factory import create_model

    with pytest.raises(UserError, match="unknown model.kwargs.norm 'batch'"):
        create_model("scatter_cnn", num_classes=10, in_chans=243, img_size=8, norm="batch")
    m = create_model("scatter_cnn", num_classes=10, in_chans=10, img_size=8, norm="none")  # no group constraint
    assert isinstance(m.norm, torch.nn.Identity) and m(torch.randn(2, 10, 8, 8)).shape == (2, 10)


def test_feature_cache_returns_the_saved_result_for_the_same_bytes_only(tmp_path):
    from dptrain.data.store import NpyRows, cached

    x = torch.randn(5, 3)
    first = cached(str(tmp_path), "f", x, lambda: iter([x[:2] * 2, x[2:] * 2]))
    assert isinstance(first, NpyRows) and torch.equal(first[:], x * 2)  # the stored bytes are the computed ones
    again = cached(str(tmp_path), "f", x.clone(), lambda: pytest.fail("recomputed despite the cache"))
    assert torch.equal(again[:], x * 2)
    other = cached(str(tmp_path), "f", x + 1, lambda: iter([(x + 1) * 2]))  # other bytes: another entry
    assert torch.equal(other[:], (x + 1) * 2)
    assert len(list(tmp_path.glob("f-*.npy"))) == 2 and not list(tmp_path.glob("*.tmp"))
    for path in tmp_path.glob("f-*.npy"):
        path.write_bytes(path.read_bytes()[:-4])  # truncated: recomputed (and rewritten), not trusted
    assert torch.equal(cached(str(tmp_path), "f", x, lambda: iter([x * 3]))[:], x * 3)
    assert torch.equal(cached(str(tmp_path), "f", x, lambda: pytest.fail("not rewritten"))[:], x * 3)
    assert torch.equal(cached(None, "f", x, lambda: iter([x[:1], x[1:]])), x)  # no cache: a tensor in memory


def test_scattering_features_are_cached_under_data_dir(tmp_path):
    a = create_dataset("fake", size=8, image_size=8, features="scattering", data_dir=str(tmp_path))
    assert len(list((tmp_path / "features").glob("scattering-*.npy"))) == 2  # train and test images
    b = create_dataset("fake", size=8, image_size=8, features="scattering", data_dir=str(tmp_path))
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])


@pytest.mark.slow
def test_eval_every_zero_reads_the_test_split_once(quick, monkeypatch):
    import dptrain.train.epochs as run_mod

    calls = []
    real = run_mod.evaluate
    monkeypatch.setattr(run_mod, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    s, run_dir = quick("eval_every=0", "epochs=3")
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert len(calls) == 1 and [r[key.TEST_ACC] is None for r in rows] == [True, True, False]
    assert s[key.TEST_ACC] == rows[-1][key.TEST_ACC]


def test_prior_alone_is_the_analytic_gaussian_mechanism():
    """Two Gaussian queries of noise 8 on the full data (q = 1) are one Gaussian mechanism of noise 8/√2: its exact
    ε at δ (Balle & Wang 2018, Theorem 8), computed here with scipy, bounds the PRV accountant's from below, and
    within its error."""
    import math

    from scipy.optimize import brentq
    from scipy.stats import norm

    s = 8.0 / math.sqrt(2)

    def delta(e):
        return norm.cdf(1 / (2 * s) - e * s) - math.exp(e) * norm.cdf(-1 / (2 * s) - e * s)

    exact = brentq(lambda e: delta(e) - 1e-5, 1e-6, 10)
    ours = epsilon(noise_multiplier=1.0, sample_rate=0.5, steps=0, delta=1e-5, prior=((8.0, 1.0, 2),))
    assert exact <= ours <= exact * 1.02  # 0.634 exact; PRV's upper bound 0.644 (its discretisation error)


def test_secure_statistics_are_refused_where_they_would_be_released_twice(compose, tmp_path):
    from dptrain.train.run import run

    cfg = compose("dataset=fake", "dataset.normalize=dp", "privacy.secure=true", f"resume={tmp_path}")
    with pytest.raises(UserError, match="not under torchrun or resume="):
        run(cfg, str(tmp_path))
