"""create_streams: the run's random streams from seed and privacy.secure, resolved once (train/seeding.py)."""

import logging

import pytest

from dptrain.config import private
from dptrain.errors import UserError
from dptrain.train.seeding import create_streams


def test_seeded_by_default_and_secure_on_request(compose):
    seeded = create_streams(compose("seed=7"))
    assert (seeded.seed, seeded.secure) == (7, False)
    assert create_streams(compose("privacy.secure=true")).secure


def test_secure_noise_is_a_deprecated_alias_resolved_here(compose, caplog):
    with caplog.at_level(logging.WARNING, logger="dptrain"):
        assert create_streams(compose("privacy.secure_noise=true")).secure
    assert "privacy.secure_noise is deprecated" in caplog.text
    assert not create_streams(compose("privacy.secure_noise=false")).secure


@pytest.mark.parametrize("overrides,message", [
    (["privacy.secure=true", "engine=nonprivate"], "privacy.secure=true needs a private engine"),
    (["privacy.secure_noise=true", "engine=nonprivate"], "privacy.secure=true needs a private engine"),
    (["privacy.secure=true", "privacy.sampling=shuffle"], "privacy.secure=true needs privacy.sampling=poisson"),
    (["seed=-1"], "seed must be a non-negative integer, got -1"),
])
def test_what_secure_cannot_mean_is_refused(compose, overrides, message):
    with pytest.raises(UserError, match=message):
        create_streams(compose(*overrides))


def test_dp_statistics_from_the_os_only_in_one_uninterrupted_process(compose):
    """Each process (torchrun) or resume would draw another estimate from the OS that the budget does not count."""
    cfg = compose("dataset.normalize=dp", "privacy.secure=true")
    assert create_streams(cfg).secure
    with pytest.raises(UserError, match="not under torchrun or resume="):
        create_streams(cfg, restarts=True)
    assert not create_streams(compose("dataset.normalize=dp"), restarts=True).secure  # seeded: redrawn identically


def test_private_is_every_engine_but_nonprivate(compose):
    assert private(compose()) and private(compose("engine=opacus")) and not private(compose("engine=nonprivate"))
