"""The privacy budget of a run — q, steps, σ, δ — validated and fixed before training; training then takes
exactly `steps` steps, so the ε reported is the ε spent."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dptrain import keys as key
from dptrain.config import private
from dptrain.errors import UserError
from dptrain.privacy.accounting import default_delta, epsilon_of, steps_for
from dptrain.train.ledger import calibrate_metrics, entries, evaluations, joint_sigma, loss_clip

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
    # the metric releases (ledger.py): train/loss and train/acc noised in every step at σ_m (None: not released
    # under dp) — the step is then one Gaussian at ledger.joint_sigma; the held-out private split's metrics at σ_v
    # at each step of `evaluated`; C, the loss clip; `excludes`: releases made outside ε (log.*=nonprivate)
    metrics_noise: float | None = None
    val_noise: float | None = None
    evaluated: tuple = ()
    loss_clip: float | None = None
    excludes: tuple = ()

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None

    def history(self, steps: int) -> list[tuple]:
        """The accountant's mechanisms (σ, q, steps) after `steps` training steps, in ledger order."""
        out = [tuple(m) for m in self.prior]
        if steps:
            out.append((joint_sigma(self.noise_multiplier, self.metrics_noise), self.sample_rate, steps))
        evals = sum(1 for s in self.evaluated if s <= steps)
        if self.val_noise is not None and evals:
            out.append((self.val_noise, 1.0, 2 * evals))
        return out

    def eps_spent(self, steps: int) -> float | None:
        """ε after `steps` steps — every release of the ledger composed — by the accountant that calibrated σ;
        None for a non-private run."""
        if not self.private:
            return None
        return epsilon_of(self.history(steps), delta=self.delta, accountant=self.accountant)

    def summary(self, steps_done: int) -> dict:
        """The summary's privacy/... keys, ε spent after `steps_done` steps included."""
        private = self.private
        return {key.EPS: self.eps, key.DELTA: self.delta, key.NOISE_MULTIPLIER: self.noise_multiplier,
                key.ACCOUNTANT: self.accountant, key.SAMPLING: self.sampling, key.EPS_GUARANTEED: self.eps_guaranteed,
                key.SECURE: self.secure, key.SECURE_NOISE: self.secure, key.SAMPLE_RATE: self.sample_rate,
                key.STEPS: self.steps, key.EPS_SPENT: self.eps_spent(steps_done),
                key.PRIOR: [list(m) for m in self.prior] if private else None,
                key.LEDGER: entries(self, steps_done) if private else None,
                key.EPS_EXCLUDES: list(self.excludes) if private else None}


def create_budget(cfg, n: int, *, secure: bool = False, prior: tuple = (), num_classes: int = 10) -> Budget:
    """Fix the budget of a checked config (config.check_config) for a training set of `n` examples, after the
    checks that need n. prior: mechanisms (σ, q, steps) already run on these examples (data.Data.prior); σ is
    calibrated so that training composed with them and with the metric releases (ledger.py; their loss clip from
    num_classes) spends eps."""
    if not 1 <= cfg.batch_size <= n:
        raise UserError(f"batch_size={cfg.batch_size} must be between 1 and the training set size n={n}")
    q = cfg.batch_size / n
    steps = steps_for(cfg.epochs, q)
    if not private(cfg):
        return Budget(sample_rate=q, steps=steps)
    p = cfg.privacy
    delta = cfg.delta if cfg.delta is not None else default_delta(n)
    if not 0 < delta < 1 / n:
        raise UserError(f"delta={delta} must be in (0, 1/n) = (0, {1 / n:.3g}) for n={n} training examples")
    lg, val = cfg.log, cfg.dataset.val_fraction > 0  # val: the evaluation split is held out of the private set
    evaluated = evaluations(q, steps, cfg.eval_every) if val and lg.val_metrics == "dp" else ()
    try:
        plan = calibrate_metrics(eps=cfg.eps if p.noise_multiplier is None else None, sigma=p.noise_multiplier,
                                 delta=delta, sample_rate=q, steps=steps, accountant=p.accountant, prior=tuple(prior),
                                 train_dp=lg.train_metrics == "dp", val_evals=len(evaluated),
                                 fraction=lg.metrics_eps_fraction)
    except ValueError as e:
        raise UserError(f"cannot reach eps={cfg.eps} in {steps} steps at q={q:.4g}: {e}") from None
    if p.sampling == "shuffle":
        log.warning("privacy.sampling=shuffle: fixed-size shuffled batches are NOT what the accountant assumes; "
                    "the reported eps is not a guarantee")
    excludes = tuple(what for what, mode in (("training metrics", lg.train_metrics),
                                             ("validation metrics", lg.val_metrics if val else "none"))
                     if mode == "nonprivate")
    return Budget(sample_rate=q, steps=steps, eps=cfg.eps if p.noise_multiplier is None else None, delta=delta,
                  noise_multiplier=plan.noise_multiplier, accountant=p.accountant, sampling=p.sampling,
                  eps_guaranteed=p.sampling == "poisson", secure=secure, prior=tuple(tuple(m) for m in prior),
                  metrics_noise=plan.metrics_noise, val_noise=plan.val_noise, evaluated=evaluated,
                  loss_clip=loss_clip(num_classes, lg.loss_clip_factor), excludes=excludes)

