"""σ ↔ ε with Opacus' accountants: prv (default), rdp, gdp. No hand-written accountant: another one is an entry in
ACCOUNTANTS, a class with Opacus' `IAccountant` interface (`history` of (σ, q, steps), `get_epsilon(delta)`).

Steps: a run of `epochs` epochs at sample rate q = L/n takes round(epochs / q) steps (at least one);
training takes exactly that many, so the ε reported is the ε spent.
"""

from __future__ import annotations

import math
import warnings

from opacus.accountants import GaussianAccountant, IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

# name (privacy.accountant) → an Opacus IAccountant class
ACCOUNTANTS: dict[str, type[IAccountant]] = {"prv": PRVAccountant, "rdp": RDPAccountant, "gdp": GaussianAccountant}


def steps_for(epochs: float, sample_rate: float) -> int:
    return max(1, round(epochs / sample_rate))


def _accountant(name: str) -> IAccountant:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant '{name}'; valid: {', '.join(ACCOUNTANTS)}")
    return ACCOUNTANTS[name]()


def epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv",
            prior: tuple = ()) -> float:
    """ε spent by `steps` Poisson-subsampled Gaussian steps (σ, q) at δ, composed with `prior`: mechanisms
    (σ, q, steps) that ran on the same examples before training (e.g. DP normalisation statistics, data.py)."""
    _check_finite(noise_multiplier=noise_multiplier, sample_rate=sample_rate, delta=delta)
    history = [tuple(m) for m in prior] + ([(noise_multiplier, sample_rate, steps)] if steps else [])
    return epsilon_of(history, delta=delta, accountant=accountant)


def epsilon_of(history: list, *, delta: float, accountant: str = "prv") -> float:
    """ε of the composition of `history`: mechanisms (σ, q, steps), each `steps` Poisson-subsampled Gaussians of
    noise multiplier σ at rate q (q = 1: a plain Gaussian mechanism), on the same examples (the privacy ledger)."""
    history = [tuple(m) for m in history if m[2]]
    if not history:
        return 0.0
    if min(m[0] for m in history) <= 0:
        return math.inf
    if accountant == "gdp" and len({m[:2] for m in history}) > 1:
        # Opacus' GaussianAccountant reads only its last (σ, q): the others would be dropped silently
        raise ValueError("accountant=gdp composes only one (noise, sample rate); this run has "
                         f"{len(history)} mechanisms (privacy/ledger): use accountant=prv or accountant=rdp")
    acc = _accountant(accountant)
    acc.history = history
    with warnings.catch_warnings():  # opacus' "largest alpha" / "GDP is experimental" notes
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy overflow inside PRV for tiny σ; log(1 - q) at q = 1
        try:
            return float(acc.get_epsilon(delta=delta))
        except (ValueError, OverflowError, MemoryError):  # σ so small that the accountant's grid explodes
            return math.inf


def noise_multiplier_for(*, eps: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv",
                         prior: tuple = ()) -> float:
    """The smallest σ (to 0.5% of ε) whose ε after `steps`, composed with `prior`, is ≤ eps: Opacus' bisection,
    or, with a prior (which Opacus' calibration does not take) or an accountant Opacus does not know by name, the
    same bisection over the composed ε."""
    _check_finite(eps=eps, delta=delta, sample_rate=sample_rate)
    acc = _accountant(accountant)  # validates the name
    if prior or acc.mechanism() != accountant:
        return _calibrate(eps=eps, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant,
                          prior=prior)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant, epsilon_tolerance=0.005 * eps))


def _calibrate(*, eps, delta, sample_rate, steps, accountant, prior, tolerance=0.005) -> float:
    return calibrate(eps=eps, delta=delta, accountant=accountant, tolerance=tolerance,
                     history=lambda sigma: [*(tuple(m) for m in prior), (sigma, sample_rate, steps)])


def calibrate(*, eps, delta, accountant, history, tolerance=0.005, high=10.0) -> float:
    """Bisection on σ: the composition of history(σ) — a list of mechanisms (σ', q, steps), one of them σ's —
    spends ε(σ), which falls as σ grows; stop once eps·(1 - tolerance) < ε(σ) ≤ eps."""
    def spent(sigma):
        return epsilon_of(history(sigma), delta=delta, accountant=accountant)

    _check_finite(eps=eps)  # eps = inf would halve σ towards 0 forever
    floor = epsilon_of([m for m in history(math.inf) if m[0] != math.inf], delta=delta, accountant=accountant)
    if floor >= eps:
        raise ValueError(f"the other releases already spend eps={floor:.4g}")
    low = 0.0
    while spent(high) > eps:
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError("no noise multiplier below 1e6 reaches it")
    while True:
        mid = (low + high) / 2
        e = spent(mid)
        if e <= eps:
            high = mid
            if e > eps * (1 - tolerance):
                return high
        else:
            low = mid
        if high - low < 1e-6 * high:
            return high


def _check_finite(**values: float) -> None:
    """Opacus' accountants loop forever on a nan σ and calibrate eps=inf to an arbitrary σ: refuse both."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"non-finite accountant input: {bad}")


def default_delta(n: int) -> float:
    """1e-5 where that is below 1/n (CIFAR's 50,000), else 1/(10 n)."""
    return 1e-5 if 1e-5 < 1.0 / n else 0.1 / n
