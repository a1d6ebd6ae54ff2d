"""Private hyperparameter search: random search whose number of trials K is itself random and secret, each trial a
full DP run, only the best released (Papernot & Steinke, "Hyperparameter Tuning with Renyi Differential Privacy",
ICLR 2022; arXiv 2110.03620): K's distributions (draw_trials) and the search's RDP bound (tuning_rdp).

Fail closed: a trial must not reveal K — the trials other than the best are deleted, the sweep's console output
and logs during the trials are discarded, each trial draws its own seed from the OS (no two share noise); the search
space may not contain a key that changes a trial's privacy budget (so every trial has the same RDP curve).
"""

from __future__ import annotations

import math
import os

import numpy as np

from dptrain.errors import UserError

DISTRIBUTIONS = ("truncated_negative_binomial", "poisson")
ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])
# keys whose value changes a trial's budget (σ, q, steps, δ, metric noise, prior): not searchable, see above
BUDGET_KEYS = ("eps", "delta", "epochs", "batch_size", "privacy.", "dataset.", "log.", "eval_every", "engine",
               "engine.", "seed", "resume")


def os_rng() -> np.random.Generator:
    """A numpy generator keyed by 128 bits from the OS: the draw of K, never reproducible from any seed."""
    return np.random.default_rng(int.from_bytes(os.urandom(16), "little"))


def tnb_mean(gamma: float, shape: float) -> float:
    """E[K] of the truncated negative binomial D_{η,γ}: η(1-γ)/(γ(1-γ^η)); η = 0: (1-γ)/(γ·log(1/γ))."""
    if shape == 0:
        return (1 - gamma) / (gamma * math.log(1 / gamma))
    return shape * (1 - gamma) / (gamma * (1 - gamma ** shape))


def tnb_gamma(mean: float, shape: float) -> float:
    """γ of D_{η,γ} with E[K] = mean (η = 1: 1/mean), by bisection — the smaller end (a larger mean: conservative)."""
    if mean < 1:
        raise ValueError(f"the mean number of trials must be >= 1, got {mean}")
    if shape == 1:
        return 1 / mean
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-12 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tnb_mean(mid, shape) > mean else (lo, mid)
    return lo


def draw_trials(distribution: str, mean: float, shape: float, rng: np.random.Generator | None = None) -> int:
    """K from OS entropy (or `rng`, in tests): Poisson(mean), or D_{η,γ} by rejection of NB(η, γ)'s zero."""
    rng = rng or os_rng()
    if distribution == "poisson":
        return int(rng.poisson(mean))
    gamma = tnb_gamma(mean, shape)
    if shape == 0:
        return int(rng.logseries(1 - gamma))  # P[K=k] ∝ (1-γ)^k / k
    while True:
        k = int(rng.negative_binomial(shape, gamma))  # failures before η successes: C(k+η-1, k) γ^η (1-γ)^k
        if k >= 1:
            return k


def rdp_curve(history: list, orders=ORDERS) -> np.ndarray:
    """A run's RDP ε_λ at each order: its mechanisms (σ, q, steps) composed, by Opacus' RDP analysis."""
    from opacus.accountants.analysis.rdp import compute_rdp  # opacus: an optional extra, loaded on use

    with np.errstate(divide="ignore"):
        return sum((compute_rdp(q=q, noise_multiplier=s, steps=t, orders=list(orders)) for s, q, t in history),
                   np.zeros(len(orders)))


def delta_at(orders, rdp, eps: float) -> float:
    """δ of an RDP curve at ε: min over orders of exp((λ-1)(ε_λ - ε + log(1 - 1/λ)) - log λ) (Canonne, Kamath &
    Steinke 2020, Proposition 12), and of the KL bound sqrt(1 - exp(-ε_λ)) near λ = 1."""
    logs = []
    for a, r in zip(orders, rdp):
        kl = 0.5 * math.log1p(-math.exp(-r)) if r > 0 else -math.inf
        logs.append(min(kl, (a - 1) * (r - eps + math.log1p(-1 / a)) - math.log(a)) if a > 1.01 else kl)
    return min(1.0, math.exp(min(logs)))


def tuning_rdp(orders, rdp, *, distribution: str, mean: float, shape: float) -> np.ndarray:
    """ε'_λ of the search from one trial's ε_λ (the trial's whole ledger, ledger.history, whatever accountant it
    used). K ~ D_{η,γ}, P[K=k] ∝ C(k+η-1, k)(1-γ)^k, k ≥ 1 (η = 1 the geometric, η = 0 the logarithmic), Theorem 2:
        ε'_λ = ε_λ + (1+η)·min_λ̂ [(1 - 1/λ̂)·ε_λ̂ + log(1/γ)/λ̂] + log(E[K])/(λ - 1)
    K ~ Poisson(μ) (K = 0 releases nothing), Theorem 6, with ε̂ = log(1 + 1/(λ-1)) and δ̂ the trial's δ at ε̂:
        ε'_λ = ε_λ + μ·δ̂ + log(μ)/(λ - 1)
    (ε, δ) follows by the usual RDP conversion (delta_at)."""
    orders, rdp = np.asarray(orders, dtype=float), np.asarray(rdp, dtype=float)
    out = np.full(len(orders), math.inf)
    if distribution == "poisson":
        for i, lam in enumerate(orders):
            if lam > 1:
                d = delta_at(orders, rdp, math.log1p(1 / (lam - 1)))
                out[i] = rdp[i] + mean * d + math.log(mean) / (lam - 1)
        return out
    gamma = tnb_gamma(mean, shape)
    c = (1 + shape) * np.min((1 - 1 / orders) * rdp + math.log(1 / gamma) / orders)  # over λ̂
    more = orders > 1
    out[more] = rdp[more] + c + math.log(mean) / (orders[more] - 1)
    # RDP is non-decreasing in the order: an order's bound also holds for every smaller one
    return np.minimum.accumulate(out[::-1])[::-1]


def eps_incl_tuning(history: list, *, delta: float, distribution: str, mean: float, shape: float) -> tuple:
    """(ε, order) of the whole search at δ, from one trial's mechanisms."""
    from opacus.accountants.analysis.rdp import get_privacy_spent  # opacus: an optional extra, loaded on use

    rdp = tuning_rdp(ORDERS, rdp_curve(history), distribution=distribution, mean=mean, shape=shape)
    finite = np.isfinite(rdp)
    eps, order = get_privacy_spent(orders=list(np.asarray(ORDERS)[finite]), rdp=rdp[finite], delta=delta)
    return float(eps), float(order)


def check_space(params: dict) -> None:
    """Refuse a searched key that changes a trial's budget (module docstring)."""
    for k in params:
        if k in BUDGET_KEYS or any(p.endswith(".") and k.startswith(p) for p in BUDGET_KEYS):
            raise UserError(f"hparams_search=private cannot search '{k}': it changes each trial's privacy budget, "
                            "which the tuning bound takes as one; fix it on the command line and search the others "
                            "(optimizer.*, max_grad_norm, model.*)")
