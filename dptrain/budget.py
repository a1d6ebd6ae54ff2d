"""The privacy budget of a run — q, steps, σ, δ — validated and fixed before training; training then takes
exactly `steps` steps, so the ε reported is the ε spent."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import schema as key
from .config import validate
from .errors import UserError, check_name
from .privacy.accounting import ACCOUNTANTS, default_delta, epsilon, noise_multiplier_for, steps_for

log = logging.getLogger("dptrain")
SAMPLING = ("poisson", "shuffle")


@dataclass(frozen=True)
class Budget:
    """A non-private run has only `sample_rate` and `steps`; the rest stays None."""

    sample_rate: float  # q = L / n
    steps: int
    eps: float | None = None  # the target; None when σ was given
    delta: float | None = None
    noise_multiplier: float | None = None  # σ
    accountant: str | None = None
    sampling: str | None = None  # poisson, shuffle
    eps_guaranteed: bool | None = None  # only Poisson sampling is what the accountant assumes
    secure: bool | None = None  # sampling and noise from OS entropy (streams.py)
    # mechanisms that ran on the training examples before training, as (σ, q, steps) — dataset.normalize=dp's
    # statistics (data.py) — composed into every ε below and into σ's calibration
    prior: tuple = ()

    def eps_spent(self, steps: int) -> float | None:
        """ε after `steps` steps, by the accountant that calibrated σ; None for a non-private run."""
        if self.noise_multiplier is None:
            return None
        return epsilon(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=steps,
                       delta=self.delta, accountant=self.accountant, prior=self.prior)

    def summary(self, steps_done: int) -> dict:
        """The summary's privacy/... keys, ε spent after `steps_done` steps included."""
        return {key.EPS: self.eps, key.DELTA: self.delta, key.NOISE_MULTIPLIER: self.noise_multiplier,
                key.ACCOUNTANT: self.accountant, key.SAMPLING: self.sampling, key.EPS_GUARANTEED: self.eps_guaranteed,
                key.SECURE: self.secure, key.SECURE_NOISE: self.secure, key.SAMPLE_RATE: self.sample_rate,
                key.STEPS: self.steps, key.EPS_SPENT: self.eps_spent(steps_done),
                key.PRIOR: [list(m) for m in self.prior] if self.noise_multiplier is not None else None}


def create_budget(cfg, n: int, *, private: bool, secure: bool = False, prior: tuple = ()) -> Budget:
    """Validate the training inputs (cfg: a TrainConfig) for a training set of `n` examples and fix the budget.
    prior: mechanisms (σ, q, steps) already run on these examples (data.Data.prior); σ is calibrated so that
    training composed with them spends eps."""
    validate(cfg)  # every number finite and in range (config.RANGES); run.py checks them before the data loads too
    _check_training_inputs(cfg, n)
    q = cfg.batch_size / n
    steps = steps_for(cfg.epochs, q)
    if not private:
        return Budget(sample_rate=q, steps=steps)
    p = cfg.privacy
    check_name("accountant", p.accountant, ACCOUNTANTS)
    check_name("privacy.sampling", p.sampling, SAMPLING)
    delta = cfg.delta if cfg.delta is not None else default_delta(n)
    if not 0 < delta < 1 / n:
        raise UserError(f"delta={delta} must be in (0, 1/n) = (0, {1 / n:.3g}) for n={n} training examples")
    sigma = p.noise_multiplier
    if sigma is None:
        if cfg.eps is None:
            raise UserError("eps must be > 0 (got None), or give privacy.noise_multiplier")
        try:
            sigma = noise_multiplier_for(eps=cfg.eps, delta=delta, sample_rate=q, steps=steps, accountant=p.accountant,
                                         prior=tuple(prior))
        except ValueError as e:
            raise UserError(f"cannot reach eps={cfg.eps} in {steps} steps at q={q:.4g}: {e}") from None
    if p.sampling == "shuffle":
        log.warning("privacy.sampling=shuffle: fixed-size shuffled batches are NOT what the accountant assumes; "
                    "the reported eps is not a guarantee")
    return Budget(sample_rate=q, steps=steps, eps=cfg.eps if p.noise_multiplier is None else None, delta=delta,
                  noise_multiplier=sigma, accountant=p.accountant, sampling=p.sampling,
                  eps_guaranteed=p.sampling == "poisson", secure=secure, prior=tuple(tuple(m) for m in prior))


def _check_training_inputs(cfg, n: int) -> None:
    L = cfg.batch_size
    if not 1 <= L <= n:
        raise UserError(f"batch_size={L} must be between 1 and the training set size n={n}")
    if cfg.privacy.augmult > 1 and not cfg.dataset.augment:
        raise UserError(f"privacy.augmult={cfg.privacy.augmult} needs dataset.augment=true (identical copies add "
                        "nothing)")
