"""The privacy budget fixed before training: q, steps, σ, δ, and the ε it reports."""

import pytest
from conftest import accountant_eps

from dptrain import schema as key
from dptrain.budget import Budget, create_budget
from dptrain.errors import UserError
from dptrain.privacy.accounting import steps_for


def test_eps_spent_is_the_accountants_and_summary_has_the_privacy_keys():
    b = Budget(sample_rate=0.01, steps=1000, eps=2.0, delta=1e-5, noise_multiplier=1.0, accountant="prv",
               sampling="poisson", eps_guaranteed=True, secure=False)
    assert b.eps_spent(1000) == pytest.approx(1.8384, abs=2e-3)  # the golden ε of test_accounting
    assert b.eps_spent(0) == 0.0
    s = b.summary(500)
    assert tuple(s) == key.PRIVACY and s[key.EPS_SPENT] == pytest.approx(b.eps_spent(500))
    assert (s[key.STEPS], s[key.SAMPLE_RATE], s[key.NOISE_MULTIPLIER]) == (1000, 0.01, 1.0)


def test_non_private_budget_has_only_q_and_steps(compose):
    b = create_budget(compose("epochs=2", "batch_size=100"), 1000, private=False)
    assert (b.sample_rate, b.steps) == (0.1, steps_for(2, 0.1)) == (0.1, 20)
    assert b.eps_spent(20) is None
    assert {k for k, v in b.summary(20).items() if v is not None} == {key.SAMPLE_RATE, key.STEPS}


def test_sigma_is_calibrated_to_eps(compose):
    b = create_budget(compose("eps=2", "batch_size=100", "epochs=2"), 1000, private=True)
    assert (b.delta, b.eps, b.steps, b.sample_rate) == (1e-5, 2.0, 20, 0.1)
    assert b.noise_multiplier == pytest.approx(1.3672, abs=1e-4)  # Opacus' bisection, to 0.5% of ε
    assert 2.0 * (1 - 0.005) <= b.eps_spent(b.steps) <= 2.0
    assert accountant_eps(b.summary(b.steps)) == pytest.approx(b.eps_spent(b.steps), rel=1e-6)


@pytest.mark.parametrize("override,message", [
    ("privacy.accountant=moments", "unknown accountant 'moments'; valid: prv, rdp, gdp"),
    ("privacy.sampling=fixed", "unknown privacy.sampling 'fixed'; valid: poisson, shuffle"),
    ("privacy.noise_multiplier=-1", "privacy.noise_multiplier must be > 0"),
    ("max_grad_norm=0", "max_grad_norm must be > 0"),
    ("privacy.noise_multiplier=nan", "privacy.noise_multiplier must be > 0 and finite, got nan"),
    ("eps=inf", "eps must be > 0 and finite, got inf"),  # was calibrated to sigma = 10
    ("delta=nan", r"delta must be in \(0, 1\), got nan"),
    ("epochs=nan", "epochs must be > 0 and finite, got nan"),
])
def test_bad_privacy_input_is_one_clear_error(compose, override, message):
    with pytest.raises(UserError, match=message):
        create_budget(compose(override), 1000, private=True)
