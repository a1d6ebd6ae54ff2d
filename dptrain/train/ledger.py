"""The privacy ledger: every release derived from the private training examples, its mechanism and its cost, and
the noise of the metric releases.

A run releases, besides the model (every DP-SGD iterate), the DP normalisation statistics (data/datasets.py), the
training metrics (TrainMetrics) and, with dataset.val_fraction > 0, the metrics of a held-out split of the private
training set (release_validation). Each is a Gaussian mechanism; `privacy/eps_spent` is their composition in the run's
accountant, and σ is calibrated with the metric queries composed in (calibrate_metrics), so the target ε holds for the
whole run. n (hence q) is public, as everywhere in DP-SGD accounting; so are the realised batch sizes that
perf/samples_per_s counts (a function of n and the sampler's draws only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dptrain.privacy.accounting import calibrate, epsilon_of, noise_multiplier_for
from dptrain.privacy.streams import KEYS, os_normal

METRIC_MODES = ("dp", "none", "nonprivate")


def loss_clip(num_classes: int, factor: float) -> float:
    """C: the bound an example's loss is clipped to — `factor` times the loss of a uniform prediction."""
    return factor * math.log(max(num_classes, 2))


def joint_sigma(sigma: float, metrics_noise: float | None) -> float:
    """σ of the step's one subsampled Gaussian: the gradient (sensitivity R, noise σR) and the two metric sums
    (sensitivities C and 1, noise σ_m·C and σ_m) on the same batch, each divided by its noise scale: the step is ONE
    subsampled Gaussian mechanism of sensitivity √(1/σ² + 2/σ_m²), exactly — no looser composition of separately
    sampled mechanisms."""
    if metrics_noise is None:
        return sigma
    return (sigma ** -2 + 2 * metrics_noise ** -2) ** -0.5


def evaluations(sample_rate: float, steps: int, eval_every: int) -> tuple[int, ...]:
    """The steps after which epochs.train_epochs evaluates: epoch k ends at min(steps, round(k / q))
    (epochs._epoch_end); it evaluates after every eval_every-th epoch and after the last."""
    out, epoch, end = [], 0, 0
    while end < steps:
        epoch += 1
        end = max(end + 1, min(steps, round(epoch / sample_rate)))
        if end >= steps or (eval_every and epoch % eval_every == 0):
            out.append(end)
    return tuple(out)


@dataclass(frozen=True)
class Plan:
    """The noise multipliers of a private run's releases: σ (the model), σ_m (training metrics, None unless dp) and
    σ_v (validation metrics, None unless dp on a private held-out split)."""

    noise_multiplier: float
    metrics_noise: float | None = None
    val_noise: float | None = None


def calibrate_metrics(*, eps: float | None, sigma: float | None, delta: float, sample_rate: float, steps: int,
                      accountant: str, prior: tuple, train_dp: bool, val_evals: int, fraction: float) -> Plan:
    """σ, σ_m, σ_v so that the whole run composes to `eps`, the metrics costing `fraction` of it each: the model
    (with `prior`) alone spends (1 - f_t - f_v)·eps; with the training metrics (1 - f_v)·eps; with the validation
    metrics eps. With σ given (eps None): the same shares of ε(σ) / (1 - f_t - f_v). The default fraction
    (log.metrics_eps_fraction) is 2%."""
    f_t, f_v = (fraction if train_dp else 0.0), (fraction if val_evals else 0.0)
    prior = [tuple(m) for m in prior]

    def model(s):
        return [*prior, (s, sample_rate, steps)]

    if sigma is None:
        total = eps
        sigma = noise_multiplier_for(eps=eps * (1 - f_t - f_v), delta=delta, sample_rate=sample_rate, steps=steps,
                                     accountant=accountant, prior=tuple(prior))
    else:
        total = epsilon_of(model(sigma), delta=delta, accountant=accountant) / (1 - f_t - f_v)
        if not math.isfinite(total):  # σ too small for any ε: the metric noise in the same proportion to σ
            return Plan(sigma, *(_proportional(sigma, fraction) if f else None for f in (f_t, f_v)))
    metrics_noise, joint = None, sigma
    if f_t:
        joint = calibrate(eps=total * (1 - f_v), delta=delta, accountant=accountant, history=model, high=sigma)
        metrics_noise = math.sqrt(2 / max(joint ** -2 - sigma ** -2, 1e-300))
    val_noise = None
    if f_v:
        val_noise = calibrate(eps=total, delta=delta, accountant=accountant,
                              history=lambda s: [*model(joint), (s, 1.0, 2 * val_evals)])
    return Plan(sigma, metrics_noise, val_noise)


def _proportional(sigma: float, fraction: float) -> float:
    """σ_m with σ/σ_joint = 1/(1 - fraction): where ε ∝ 1/σ (the usual regime), the metrics then cost `fraction`."""
    return sigma * math.sqrt(2 / ((1 - fraction) ** -2 - 1))


class MetricNoise:
    """The Gaussian noise of the metric releases: `draw(index, n)` → (n,) float64 N(0, 1) draws for release `index`
    (the training step, or the evaluation's epoch) — numpy's PCG64 seeded by SeedSequence(seed, spawn_key=(8, sub,
    index)) (streams.KEYS["metrics"]), so a resumed run draws the steps it has not taken afresh and never reuses a
    released draw (a reused draw would cancel in a difference); from the OS in secure mode (streams.os_normal)."""

    def __init__(self, streams, sub: int):
        self.seed, self.secure, self.key = streams.seed, streams.secure, (KEYS["metrics"], sub)

    def draw(self, index: int, n: int) -> torch.Tensor:
        if self.secure:
            return os_normal(n)
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(*self.key, int(index))))
        return torch.from_numpy(rng.standard_normal(n))


class TrainMetrics:
    """train/loss and train/acc of an epoch, as loop.train_one_epoch computes them. mode dp: in every step, on the
    step's own Poisson batch, two sums over its examples — the cross-entropy clipped to C = log.loss_clip_factor ·
    log(num_classes) (data-independent), and correctness (an example's mean over its augmented rows: in [0, 1]) —
    each plus N(0, (σ_m·C)²), N(0, σ_m²) (noise=None on the ranks other than 0 of a data-parallel run: the noise is
    added once, to rank 0's part); the epoch's value is its noisy sums ÷ steps·L, as DP-SGD divides by L (joint_sigma:
    the step stays one Gaussian). nonprivate: the exact means over the examples seen."""

    def __init__(self, *, mode: str, clip: float, noise_multiplier: float | None, expected_batch_size: int,
                 noise: MetricNoise | None):
        self.mode, self.clip, self.sigma, self.L, self.noise = mode, clip, noise_multiplier, expected_batch_size, noise
        self._loss = self._correct = 0.0
        self.index = 0  # the run's step about to be taken (epochs.py sets it at each epoch start): the noise's key

    def add(self, out: torch.Tensor, y: torch.Tensor) -> None:
        """One physical batch's logits (B·K, classes) for labels (B,): K rows per example (augmult, views)."""
        k = out.shape[0] // max(len(y), 1)
        with torch.no_grad():
            out = out.detach().float()
            yk = y.repeat_interleave(k) if k > 1 else y
            loss = F.cross_entropy(out, yk, reduction="none").view(len(y), k).mean(1)  # (B,)
            right = (out.argmax(1) == yk).double().view(len(y), k).mean(1)  # (B,) in [0, 1]
            if self.mode == "dp":
                loss = loss.clamp(max=self.clip)
            self._loss += loss.double().sum().item()
            self._correct += right.sum().item()

    def step(self) -> tuple[float, float]:
        """The step's (loss sum, correct sum) as released — noised under dp, empty batches included — and reset."""
        loss, correct, self._loss, self._correct = self._loss, self._correct, 0.0, 0.0
        self.index += 1
        if self.mode == "dp" and self.noise is not None:
            z = self.noise.draw(self.index, 2)
            loss, correct = loss + self.sigma * self.clip * z[0].item(), correct + self.sigma * z[1].item()
        return loss, correct

    def count(self, steps: int, seen: int) -> float:
        """The divisor of the epoch's sums: the expected count steps·L under dp (the realised count is not
        released), the examples seen otherwise."""
        return float(steps * self.L) if self.mode == "dp" else float(max(seen, 1))


def release_validation(result: dict, *, mode: str, clip: float, noise_multiplier: float | None,
                       noise: MetricNoise | None, index: int) -> dict:
    """The held-out private split's metrics as released: under dp its clipped loss sum (loop.evaluate's loss_clip)
    and correct count plus N(0, (σ_v·C)²), N(0, σ_v²), ÷ n_val — two full-batch (q = 1) Gaussian mechanisms per
    evaluation, (σ_v, 1, 2·E) in the accountant as the normalisation's are; none: nothing; nonprivate: as computed."""
    if mode == "none":
        return {"acc": None, "loss": None}
    if mode == "nonprivate":
        return {"acc": result["acc"], "loss": result["loss"]}
    n = max(result["n"], 1)
    z = noise.draw(index, 2)
    acc = (result["correct"] + noise_multiplier * z[1].item()) / n
    loss = (result["loss_sum"] + noise_multiplier * clip * z[0].item()) / n
    return {"acc": min(max(acc, 0.0), 1.0), "loss": min(max(loss, 0.0), clip)}  # post-processing: free


def entries(budget, steps: int) -> list[dict]:
    """summary.json's privacy/ledger after `steps` training steps: one row per release — what it is, its mechanism,
    its parameters, `eps_alone` (its ε alone at the run's δ) and `eps_marginal` (ε of all rows minus ε of all rows
    but this one: what leaving it out would save). privacy/eps_spent composes all rows (Budget.history)."""
    b, q = budget, budget.sample_rate
    C = b.loss_clip
    rows = [{"release": "dataset.normalize=dp statistics", "what": "per-channel mean and mean square of the "
             "training examples", "mechanism": "Gaussian (q = 1), add/remove", "noise_multiplier": m[0],
             "sample_rate": m[1], "steps": m[2], "history": [list(m)]} for m in b.prior]
    model = {"release": "model", "what": "every DP-SGD iterate (model.pt, checkpoints)", "mechanism":
             "Poisson-subsampled Gaussian, clipped gradient sum", "noise_multiplier": b.noise_multiplier,
             "sample_rate": q, "steps": steps, "history": [[b.noise_multiplier, q, steps]] if steps else []}
    rows.append(model)
    if b.metrics_noise is not None:
        rows.append({"release": "train/loss, train/acc", "what": f"each step: clipped loss sum (C = {C:.4g}) and "
                     "correct count of its batch, noised, ÷ steps·L per epoch", "mechanism": "Poisson-subsampled "
                     "Gaussian on the model step's batch (one mechanism with it: privacy/ledger's model row then "
                     "runs at the joint noise)", "noise_multiplier": b.metrics_noise, "loss_clip": C,
                     "sample_rate": q, "steps": steps, "joint_noise_multiplier": joint_sigma(b.noise_multiplier,
                                                                                              b.metrics_noise),
                     "history": [[b.metrics_noise / math.sqrt(2), q, steps]] if steps else []})
    evals = sum(1 for s in b.evaluated if s <= steps)
    if b.val_noise is not None:
        rows.append({"release": "test/acc, test/loss (held-out private split)", "what": f"at {evals} evaluations: "
                     f"clipped loss sum (C = {C:.4g}) and correct count of the split, noised, ÷ n_val",
                     "mechanism": "Gaussian (q = 1), two queries per evaluation", "noise_multiplier": b.val_noise,
                     "loss_clip": C, "sample_rate": 1.0, "steps": 2 * evals,
                     "history": [[b.val_noise, 1.0, 2 * evals]] if evals else []})
    return _costs(b, steps, rows)


def _costs(b, steps: int, rows: list[dict]) -> list[dict]:
    """Each row's eps_alone and eps_marginal (ε of all rows minus ε of the others, composed as the accountant
    composes them: the model and training-metrics rows as one mechanism at joint_sigma when both are there)."""
    total = b.eps_spent(steps)
    for i, row in enumerate(rows):
        row["eps_alone"] = _eps(row["history"], b)
        row["eps_marginal"] = None if total is None else total - _eps(_compose(rows[:i] + rows[i + 1:], b), b)
    for row in rows:
        del row["history"]
    return rows


def _compose(rows: list[dict], b) -> list[list]:
    names = {r["release"] for r in rows}
    if {"model", "train/loss, train/acc"} <= names:  # one batch, one Gaussian (module docstring)
        rows = [r if r["release"] != "model" else {**r, "history": [
            [joint_sigma(b.noise_multiplier, b.metrics_noise), b.sample_rate, r["steps"]]] if r["history"] else []}
            for r in rows if r["release"] != "train/loss, train/acc"]
    return [m for r in rows for m in r["history"]]


def _eps(history: list, b) -> float | None:
    try:
        return epsilon_of(history, delta=b.delta, accountant=b.accountant)
    except ValueError:  # accountant=gdp composes one mechanism only
        return None


def history_of(summary: dict) -> list[list]:
    """The accountant's mechanisms of a finished run, from its summary.json (privacy/prior and privacy/ledger), as
    Budget.history composes them: the model and training-metrics rows as one Gaussian at joint_sigma."""
    rows = {r["release"]: r for r in summary.get("privacy/ledger") or []}
    model, metrics = rows.get("model"), rows.get("train/loss, train/acc")
    out = [list(m) for m in summary.get("privacy/prior") or []]
    if model and model["steps"]:
        sigma = joint_sigma(model["noise_multiplier"], metrics["noise_multiplier"] if metrics else None)
        out.append([sigma, model["sample_rate"], model["steps"]])
    out += [[r["noise_multiplier"], 1.0, r["steps"]] for name, r in rows.items() if name.startswith("test/")
            and r["steps"]]
    return out
