"""The privacy budget fixed before training: q, steps, σ, δ, and the ε it reports."""

import logging

import pytest
from conftest import accountant_eps, deadline

from dptrain import keys as key
from dptrain.errors import UserError
from dptrain.privacy.accounting import epsilon, noise_multiplier_for, steps_for
from dptrain.train.budget import Budget, create_budget


def test_eps_spent_is_the_accountants_and_summary_has_the_privacy_keys():
    b = Budget(sample_rate=0.01, steps=1000, eps=2.0, delta=1e-5, noise_multiplier=1.0, accountant="prv",
               sampling="poisson", eps_guaranteed=True, secure=False)
    assert b.eps_spent(1000) == pytest.approx(1.8384, abs=2e-3)  # the golden ε of test_accounting
    assert b.eps_spent(0) == 0.0
    s = b.summary(500)
    assert tuple(s) == key.PRIVACY and s[key.EPS_SPENT] == pytest.approx(b.eps_spent(500))
    assert (s[key.STEPS], s[key.SAMPLE_RATE], s[key.NOISE_MULTIPLIER]) == (1000, 0.01, 1.0)


def test_non_private_budget_has_only_q_and_steps(compose):
    b = create_budget(compose("engine=nonprivate", "epochs=2", "batch_size=100"), 1000)
    assert (b.sample_rate, b.steps) == (0.1, steps_for(2, 0.1)) == (0.1, 20)
    assert b.eps_spent(20) is None
    assert {k for k, v in b.summary(20).items() if v is not None} == {key.SAMPLE_RATE, key.STEPS}


@pytest.mark.slow
def test_sigma_is_calibrated_to_eps(compose):
    b = create_budget(compose("eps=2", "batch_size=100", "epochs=2", "log.train_metrics=none"), 1000)
    assert (b.delta, b.eps, b.steps, b.sample_rate) == (1e-5, 2.0, 20, 0.1)
    assert (b.accountant, b.sampling, b.eps_guaranteed, b.secure) == ("prv", "poisson", True, False)
    assert b.noise_multiplier == pytest.approx(1.3672, abs=1e-4)  # Opacus' bisection, to 0.5% of ε
    assert 2.0 * (1 - 0.005) <= b.eps_spent(b.steps) <= 2.0
    assert accountant_eps(b.summary(b.steps)) == pytest.approx(b.eps_spent(b.steps), rel=1e-6)


def test_sigma_and_eps_spent_are_the_chosen_accountants_at_the_given_delta(compose):
    b = create_budget(compose("eps=2", "batch_size=100", "epochs=2", "privacy.accountant=rdp", "delta=1e-6",
                              "log.train_metrics=none"), 1000)
    assert (b.accountant, b.delta, b.steps, b.sample_rate) == ("rdp", 1e-6, 20, 0.1)
    assert b.noise_multiplier == noise_multiplier_for(eps=2, delta=1e-6, sample_rate=0.1, steps=20, accountant="rdp")
    spent = epsilon(noise_multiplier=b.noise_multiplier, sample_rate=0.1, steps=20, delta=1e-6, accountant="rdp")
    assert b.eps_spent(20) == spent != epsilon(noise_multiplier=b.noise_multiplier, sample_rate=0.1, steps=20,
                                               delta=1e-6, accountant="prv")


@pytest.mark.slow
def test_given_sigma_shuffle_and_secure_are_recorded(compose, caplog):
    """σ given: no target ε (also where eps is set: it is ignored). Shuffled batches: recorded, not guaranteed, and
    one warning says so (Poisson: none)."""
    assert create_budget(compose("eps=3", "privacy.noise_multiplier=1.5"), 1000).eps is None
    sigma = ("eps=null", "privacy.noise_multiplier=1.5", "batch_size=100")
    with caplog.at_level(logging.WARNING, logger="dptrain"):
        b = create_budget(compose(*sigma), 1000, secure=True)
        assert not caplog.records
        s = create_budget(compose(*sigma, "privacy.sampling=shuffle"), 1000)
    assert (b.eps, b.noise_multiplier, b.sampling, b.eps_guaranteed, b.secure) == (None, 1.5, "poisson", True, True)
    assert (s.eps, s.sampling, s.eps_guaranteed, s.secure) == (None, "shuffle", False, False)
    assert caplog.messages == ["privacy.sampling=shuffle: fixed-size shuffled batches are NOT what the accountant "
                               "assumes; the reported eps is not a guarantee"]


@pytest.mark.slow
def test_batch_sizes_1_and_n_and_augmult_with_augmentation_are_accepted(compose):
    for L in (1, 1000):
        b = create_budget(compose(f"batch_size={L}", "epochs=1", "eps=null", "privacy.noise_multiplier=1.0"), 1000)
        assert (b.sample_rate, b.steps) == (L / 1000, 1000 // L)
    b = create_budget(compose("privacy.augmult=2", "dataset.augment=true", "eps=null", "privacy.noise_multiplier=1.0"),
                      1000)
    assert b.noise_multiplier == 1.0


@pytest.mark.parametrize("overrides,message", [
    (["batch_size=1001"], r"^batch_size=1001 must be between 1 and the training set size n=1000$"),
    (["delta=0.001"], r"^delta=0.001 must be in \(0, 1/n\) = \(0, 0.001\) for n=1000 training examples$"),
    (["delta=0.0015"], r"^delta=0.0015 must be in \(0, 1/n\) = \(0, 0.001\) for n=1000 training examples$"),
    (["eps=0.1", "batch_size=100", "epochs=2", "privacy.accountant=rdp"],  # RDP's ε ≥ log(1/δ)/(α_max - 1) ≈ 0.19
     r"^cannot reach eps=0.1 in 20 steps at q=0.1: "),
])
def test_budget_input_errors_are_one_clear_error(compose, overrides, message):
    with pytest.raises(UserError, match=message):
        create_budget(compose(*overrides), 1000)


def test_a_prior_is_composed_into_sigma_eps_spent_and_the_summary(compose):
    """Mechanisms that ran on the training examples before training (dataset.normalize=dp's statistics, handed over
    as lists by data.Data.prior): σ is calibrated so that training composed with them spends eps, eps_spent and the
    summary compose them, also where σ is given; an eps they already spend is one clear error. (RDP at q = 1: fast.)"""
    prior = [[8.0, 1.0, 2]]
    rdp = ("batch_size=1000", "epochs=5", "privacy.accountant=rdp", "log.train_metrics=none")
    with deadline():
        b = create_budget(compose("eps=2", *rdp), 1000, prior=prior)
    assert (b.prior, b.sample_rate, b.steps, b.delta) == (((8.0, 1.0, 2),), 1.0, 5, 1e-5)
    at = {"delta": 1e-5, "sample_rate": 1.0, "steps": 5, "accountant": "rdp"}
    assert b.noise_multiplier == noise_multiplier_for(eps=2, prior=b.prior, **at) > noise_multiplier_for(eps=2, **at)
    assert b.eps_spent(5) == epsilon(noise_multiplier=b.noise_multiplier, prior=b.prior, **at)
    assert 2 * (1 - 0.005) < b.eps_spent(5) <= 2
    assert b.eps_spent(0) == pytest.approx(0.6948, abs=1e-4)  # before the first step: the prior's ε
    s = b.summary(5)
    assert s[key.PRIOR] == prior and accountant_eps(s) == pytest.approx(b.eps_spent(5), rel=1e-6)
    g = create_budget(compose("eps=null", "privacy.noise_multiplier=1.5", *rdp), 1000, prior=prior)
    assert g.eps_spent(5) == epsilon(noise_multiplier=1.5, prior=g.prior, **at) > epsilon(noise_multiplier=1.5, **at)
    assert g.summary(5)[key.PRIOR] == prior
    refused = r"^cannot reach eps=0.5 in 5 steps at q=1: the other releases already spend eps=0\.6948$"
    with deadline(), pytest.raises(UserError, match=refused):
        create_budget(compose("eps=0.5", *rdp), 1000, prior=prior)
