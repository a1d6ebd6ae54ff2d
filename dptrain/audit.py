"""An empirical lower bound on ε from ONE real training run (Steinke, Nasr & Jagielski, "Privacy auditing with one
(1) training run", NeurIPS 2023): dptrain-audit's work (cli/audit.py).

M canaries, each included with probability 1/2 (the secret bits S) → one training run through the normal runner and
engine (run.run with `hooks`, the only seam) → a score per canary → guesses "in" for the k+ highest scores and "out"
for the k- lowest → from v correct of r = k+ + k- guesses, the largest ε for which (ε, δ)-DP is rejected at
confidence 1 - β (the paper's `p_value_DP_audit` / `get_eps_audit`: `p_value`, `eps_lower_bound`). (k+, k-) is
picked after seeing the scores from a fixed grid, so β is split over the grid (Bonferroni) and the bound stays a
bound. Canaries: dirac (white-box, gradient space: DiracCanaries) and noise (black-box images): CANARY_KINDS.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from scipy import special, stats
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import ConcatDataset, TensorDataset

from dptrain import keys as key
from dptrain.config import TrainConfig
from dptrain.config import register as register_train
from dptrain.errors import UserError, check_name
from dptrain.privacy.accounting import default_delta
from dptrain.train.run import run

# audit.json's keys (a published format, like keys.py's: add keys, never rename one)
EPS_LOWER_BOUND = "audit/eps_lower_bound"
EPS = "audit/eps"  # the ε the run claims: privacy/eps_spent, or the target `eps` for engine=nonprivate
EPS_CLAIMED_BY = "audit/eps_claimed_by"  # "eps_spent" | "target (engine=nonprivate spends no budget)"
DELTA = "audit/delta"
CANARIES = "audit/canaries"  # M
CONFIDENCE = "audit/confidence"  # 1 - β
METHOD = "audit/method"
CANARY = "audit/canary"  # the canary kind
OBSERVED = "audit/observe"  # dirac: steps (every noisy gradient) or final (the final weights); black-box: final
INCLUDED = "audit/included"  # how many of the M were in the training set
K_PLUS, K_MINUS = "audit/k_plus", "audit/k_minus"  # the chosen guesses: top k+ "in", bottom k- "out"
GUESSES, CORRECT = "audit/guesses", "audit/correct"  # r = k+ + k-, v
PRECISION_LOWER = "audit/precision_lower"  # Clopper–Pearson lower limit of v/r at level β/|grid|
GRID = "audit/grid"  # |grid|: the Bonferroni factor
PASSED = "audit/passed"  # eps_lower_bound <= eps
AUDIT_KEYS = (EPS_LOWER_BOUND, EPS, EPS_CLAIMED_BY, DELTA, CANARIES, CONFIDENCE, METHOD, CANARY, OBSERVED, INCLUDED,
              K_PLUS, K_MINUS, GUESSES, CORRECT, PRECISION_LOWER, GRID, PASSED)
METHOD_NAME = "steinke-nasr-jagielski-2023 one-run, Bonferroni over (k+, k-)"

# The canaries' random bits (inclusion, images, tie-breaks) come from SeedSequence(seed, spawn_key=(AUDIT_KEY,)):
# a key far above privacy/streams.py's small KEYS, so it never coincides with a training stream.
AUDIT_KEY = 0x61756469  # "audi"


# ------------------------------------------------------------------------------------------ the bound
def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses correct] under the hypothesis that the run is (ε, δ)-DP, for m canaries each
    included with probability 1/2 (Steinke et al. 2023; their `p_value_DP_audit`): an ε-DP run's guesses are
    no better than randomized response of accuracy q = e^ε/(1+e^ε), so β = P[Binom(r, q) >= v]; δ adds
    2m·δ·max_i P[v-i <= Binom(r, q) < v] / i."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = special.expit(eps)
    beta = stats.binom.sf(v - 1, r, q)
    if delta == 0 or v == 0:
        return float(min(beta, 1.0))
    i = np.arange(1, v + 1)
    alpha = np.max(np.cumsum(stats.binom.pmf(v - i, r, q)) / i)
    return float(min(beta + alpha * delta * 2 * m, 1.0))


def eps_lower_bound(m: int, r: int, v: int, *, delta: float, beta: float, iters: int = 60) -> float:
    """The largest ε (to 2^-iters of the bracket) whose (ε, δ)-DP claim p_value rejects at level β; 0 when even
    ε = 0 is not rejected. The paper's `get_eps_audit`: grow the bracket by 1 until ε_max is not rejected, bisect."""
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi + 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


# Guesses per side, as a fraction of M. Few on purpose: β is split over the grid, and with δ > 0 the bound
# pays for a smaller β dearly (the 2mδ term) — m=1000, δ=1e-5, 996/1000 correct: ε̂ 4.11 with these 35 pairs,
# 3.82 with 63 (7 fractions), 3.38 with 99.
FRACTIONS = (0.01, 0.03, 0.1, 0.3, 0.5)


def guess_grid(m: int) -> list[tuple[int, int]]:
    """The (k+, k-) pairs the auditor may choose from, fixed before the scores are seen: per side 0 or a
    fraction of M in FRACTIONS; not both 0."""
    ks = sorted({0} | {max(1, round(m * f)) for f in FRACTIONS})
    return [(a, b) for a in ks for b in ks if 0 < a + b <= m]


@dataclass(frozen=True)
class Bound:
    eps: float  # the lower bound ε̂
    k_plus: int
    k_minus: int
    guesses: int  # r
    correct: int  # v
    precision_lower: float  # Clopper–Pearson lower limit of v/r at level β/|grid|
    grid: int


def one_run_bound(scores, included, *, delta: float, confidence: float, seed: int = 0) -> Bound:
    """ε̂ from canary scores (higher = "more likely included") and the true inclusion bits, at `confidence`.
    Ties are broken by a random order (seeded): a guess may use the scores and independent coins only."""
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    m = len(scores)
    if m < 2 or included.shape != (m,):
        raise ValueError(f"need at least 2 canaries and one inclusion bit each, got {m} and {included.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    perm = np.random.default_rng(seed).permutation(m)
    order = perm[np.argsort(-scores[perm], kind="stable")]  # descending score, random among ties
    hits_top = np.concatenate([[0], np.cumsum(included[order])])  # correct "in" guesses among the top k
    hits_bottom = np.concatenate([[0], np.cumsum(~included[order[::-1]])])  # correct "out" among the bottom k
    grid = guess_grid(m)
    beta = (1 - confidence) / len(grid)
    best = None
    for kp, km in grid:
        r, v = kp + km, int(hits_top[kp] + hits_bottom[km])
        eps = eps_lower_bound(m, r, v, delta=delta, beta=beta)
        p_lo = float(stats.beta.ppf(beta, v, r - v + 1)) if v > 0 else 0.0
        if best is None or (eps, p_lo) > best[:2]:  # equal ε̂ (e.g. all 0): the best-supported precision
            best = (eps, p_lo, kp, km, r, v)
    eps, p_lo, kp, km, r, v = best
    return Bound(eps=eps, k_plus=kp, k_minus=km, guesses=r, correct=v, precision_lower=p_lo, grid=len(grid))


# --------------------------------------------------------------------------------------- canaries
TAG = 1.0e4  # a dirac canary's input is the constant image TAG + j: far outside any normalised data


class DiracCanaries(nn.Module):
    """The user's model plus M scalar canary parameters (`canary.weight[0, j]`, zero at the start).

    A row whose input is the constant image TAG + j is canary j: the model's own logits are masked to 0 for it
    (so its gradient in the model's parameters is exactly 0) and its logits are d·(o_j - o_j.detach()) with
    o_j = w_j and d = s·(e_1 - e_0): their value is 0 (uniform softmax, so the loss never saturates) and the
    cross-entropy's gradient for label 0 is dL/dw_j = d·(softmax - e_0) = s at every step. The engine sees an
    ordinary Linear layer whose per-example gradient for canary j is s·e_j. Real rows are masked out of the
    canary block in the same way (their gradient there is exactly 0).

    Real: sampling, clipping bound, noise, averaging, optimizer, accounting — the engine's own code paths.
    Constructed: the canary's gradient (no real example's is a Dirac direction), so this audits the mechanism
    around the gradients, not the engine's per-example norms of real examples: the black-box audit's job (and the
    exactness tests')."""

    def __init__(self, model: nn.Module, m: int, *, scale: float, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise UserError("audit.canary=dirac needs at least 2 classes")
        self.model, self.m, self.scale, self.num_classes = model, m, float(scale), num_classes
        self.canary = nn.Linear(m, 1, bias=False)
        nn.init.zeros_(self.canary.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tag = x[:, 0, x.shape[2] // 2, x.shape[3] // 2]  # (B,): the centre survives crops (pad 4) and flips
        is_canary = tag > TAG / 2
        ids = (tag - TAG).round().clamp(0, self.m - 1).long()
        # real rows feed their own pixel (a value that moves with the example, as the engine's row probe
        # expects of a layer input); their canary output is masked below
        u = torch.where(is_canary[:, None], F.one_hot(ids, self.m).to(x.dtype), tag[:, None].expand(-1, self.m))
        o = self.canary(u)  # (B, 1)
        o = (o - o.detach()) * is_canary[:, None].to(x.dtype)
        d = torch.zeros(self.num_classes, dtype=x.dtype, device=x.device)
        d[0], d[1] = -self.scale, self.scale
        x_in = torch.where(is_canary.view(-1, *([1] * (x.dim() - 1))), torch.zeros_like(x), x)
        logits = self.model(x_in) * (~is_canary)[:, None].to(x.dtype)  # (B, K)
        return logits + o * d


class _Without:
    """A sampler whose logical batches never contain the excluded canaries' slots."""

    def __init__(self, sampler, keep: torch.Tensor):
        self.sampler, self.keep = sampler, keep
        # the filter is a fixed function of the wrapped sampler's draws: its generator replays them on resume
        self.n, self.generator = getattr(sampler, "n", None), getattr(sampler, "generator", None)

    def __iter__(self):
        for idx in self.sampler:
            yield idx[self.keep[idx]]

    def __len__(self):
        return len(self.sampler)


class Canaries:
    """The run's hooks (run.run(..., hooks=)): M canary slots appended to the training set, the model wrapped
    (dirac), excluded slots dropped from every batch; then `scores()` of the trained model.

    Every canary has a slot whether or not it is included: q = L/n, the steps and σ are fixed before S matters, and
    an excluded canary's slot is dropped from each Poisson batch (`sampler`) — exactly "absent", since Poisson
    sampling decides each example alone. So the run is the mechanism the accountant's ε is about, applied to (real
    data ∪ included canaries)."""

    def __init__(self, kind: str, m: int, *, seed: int, scale: float, max_grad_norm: float, observe: str = "final"):
        check_name("audit.canary", kind, CANARY_KINDS)
        check_name("audit.observe", observe, OBSERVE)
        if m < 2:
            raise UserError(f"audit.canaries must be >= 2, got {m}")
        if kind == "dirac" and not scale > 1:
            raise UserError(f"audit.scale must be > 1 (the canary's gradient norm in units of R), got {scale}")
        self.kind, self.m, self.scale, self.max_grad_norm, self.observe = kind, m, scale, max_grad_norm, observe
        self.steps: list[torch.Tensor] = []  # observe=steps: the canary block's gradient at every optimizer step
        self.rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(AUDIT_KEY,)))
        self.included = self.rng.random(m) < 0.5  # the secret bits S
        self.tie_seed = int(self.rng.integers(2**31))
        self.net: nn.Module | None = None
        self.n_real = 0

    # hooks, in the order run() calls them
    def data(self, data):
        self.n_real, self.num_classes = len(data.train), data.num_classes
        x0 = data.train[0][0]
        if x0.dim() != 3:
            raise UserError(f"audit needs (C, H, W) images, got an example of shape {tuple(x0.shape)}")
        self.x, self.y = CANARY_KINDS[self.kind](self, data)
        if isinstance(data.train, TensorDataset):
            xs, ys = data.train.tensors
            if self.kind == "dirac" and xs.abs().max() > TAG / 4:
                raise UserError(f"audit.canary=dirac tags canaries with input values near {TAG:g}; this data set "
                                "has values that large")
            data.train = TensorDataset(torch.cat([xs, self.x.to(xs.dtype)]), torch.cat([ys, self.y.to(ys.dtype)]))
        else:
            data.train = ConcatDataset([data.train, TensorDataset(self.x, self.y)])
        return data

    def model(self, model: nn.Module) -> nn.Module:
        if self.kind == "dirac":
            device = next(model.parameters()).device
            model = DiracCanaries(model, self.m, scale=self.scale * self.max_grad_norm,
                                  num_classes=self.num_classes).to(device)
        self.net = model
        return model

    def sampler(self, sampler):
        keep = torch.ones(self.n_real + self.m, dtype=torch.bool)
        keep[self.n_real:] = torch.from_numpy(self.included)
        return _Without(sampler, keep)

    def watch(self):
        """observe=steps: a hook on every torch optimizer's step that keeps the canary block's gradient — the
        noisy average, after DPOptimizer / Opacus / NonPrivate made it — as the step sees it. Returns the handle
        (remove() it after the run), or None when there is nothing to watch."""
        if self.kind != "dirac" or self.observe != "steps":
            return None

        def keep(optimizer, args, kwargs):
            w = self.net.canary.weight if self.net is not None else None
            # torch's own optimizers only: Opacus' DPOptimizer is one too, and calls its inner one after the noise
            if w is None or not type(optimizer).__module__.startswith("torch.optim"):
                return
            if any(p is w for g in optimizer.param_groups for p in g["params"]):
                g = w.grad
                self.steps.append(torch.zeros(self.m) if g is None else g[0].detach().float().cpu().clone())

        return register_optimizer_step_pre_hook(keep)

    @torch.no_grad()
    def scores(self, *, sample_rate: float = 0.0, noise_multiplier: float = 0.0, batch_size: int = 1) -> np.ndarray:
        """Per canary: higher = more likely included. dirac: the log-likelihood ratio over the steps (observe=steps;
        needs the run's q, σ and L) or -w_j (final: an included canary pushes w_j down); black-box: the trained
        model's log-probability of the canary's label."""
        if self.kind == "dirac" and self.observe == "steps":
            if not self.steps:
                raise UserError("audit.observe=steps saw no optimizer step of the canary parameters")
            x = torch.stack(self.steps).double().numpy() * batch_size / self.max_grad_norm  # (T, M), units of R
            return step_scores(x, sample_rate=sample_rate, noise_multiplier=noise_multiplier)
        if self.kind == "dirac":
            return -self.net.canary.weight[0].detach().double().cpu().numpy()
        was = self.net.training
        self.net.eval()
        device = next(self.net.parameters()).device
        out = []
        for xb, yb in zip(torch.split(self.x, 512), torch.split(self.y, 512)):
            logp = F.log_softmax(self.net(xb.to(device)).double(), dim=1)
            out.append(logp.gather(1, yb.to(device).view(-1, 1)).squeeze(1).cpu())
        self.net.train(was)
        return torch.cat(out).numpy()


def step_scores(x: np.ndarray, *, sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """x: (T, M) per-step gradient coordinates in units of R, the gradient pointing down (+1 for an included,
    sampled, clipped canary). Σ_t log(1 - q + q·exp((2x - 1)/(2σ²))) per canary; Σ_t x_t when σ = 0."""
    if noise_multiplier <= 0:
        return x.sum(0)
    q, s2 = sample_rate, noise_multiplier**2
    return np.logaddexp(np.log1p(-q), np.log(q) + (2 * x - 1) / (2 * s2)).sum(0)


OBSERVE = ("steps", "final")


def _dirac(c: Canaries, data):
    shape = tuple(data.train[0][0].shape)
    x = (TAG + torch.arange(c.m, dtype=torch.float32)).view(-1, 1, 1, 1).expand(c.m, *shape).clone()
    return x, torch.zeros(c.m, dtype=torch.long)


def _noise(c: Canaries, data):
    """Images of i.i.d. N(0, 1) pixels (out of distribution: the data are normalised), uniformly random labels."""
    x = torch.from_numpy(c.rng.standard_normal((c.m, *data.train[0][0].shape), dtype=np.float32))
    return x, torch.from_numpy(c.rng.integers(data.num_classes, size=c.m)).long()


# name → (Canaries, Data) → (x, y) of the M canaries
CANARY_KINDS = {"dirac": _dirac, "noise": _noise}


# ---------------------------------------------------------------------------------------- the run
@dataclass
class AuditConfig:
    canaries: int = 1000  # M
    canary: str = "dirac"  # dirac (white-box, gradient space), noise (black-box, out-of-distribution images)
    confidence: float = 0.95  # 1 - β
    scale: float = 10.0  # dirac: the canary's gradient norm, in units of R (clipped to R by the engine)
    observe: str = "steps"  # dirac: steps (every step's noisy gradient, DP-SGD's threat model), final (weights only)


@dataclass
class AuditRunConfig(TrainConfig):
    audit: AuditConfig = field(default_factory=AuditConfig)
    name: str = "audit"


def register() -> None:
    """The training schema and the audit's (`audit_schema`, conf/audit.yaml's base) in Hydra's ConfigStore."""
    register_train()
    ConfigStore.instance().store(name="audit_schema", node=AuditRunConfig)


def audit(cfg, run_dir: str) -> dict:
    """One training run with canaries (run.run) → scores → the bound → audit.json in run_dir."""
    a = cfg.audit
    if not 0 < a.confidence < 1:
        raise UserError(f"audit.confidence must be in (0, 1), got {a.confidence}")
    canaries = Canaries(a.canary, a.canaries, seed=cfg.seed, scale=a.scale, max_grad_norm=cfg.max_grad_norm,
                        observe=a.observe)
    handle = canaries.watch()
    try:
        summary = run(cfg, run_dir, hooks=canaries)
    finally:
        if handle is not None:
            handle.remove()
    if summary[key.EPS_SPENT] is not None:
        eps, by = summary[key.EPS_SPENT], "eps_spent"
    else:
        eps, by = cfg.eps, "target (engine=nonprivate spends no budget)"
    n = canaries.n_real + canaries.m
    delta = summary[key.DELTA] if summary[key.DELTA] is not None else (cfg.delta or default_delta(n))
    scores = canaries.scores(sample_rate=summary[key.SAMPLE_RATE], noise_multiplier=summary[key.NOISE_MULTIPLIER] or 0,
                             batch_size=cfg.batch_size)
    np.savetxt(os.path.join(run_dir, "canaries.csv"), np.column_stack([canaries.included, scores]),
               delimiter=",", header="included,score", comments="", fmt=["%d", "%.9g"])
    b = one_run_bound(scores, canaries.included, delta=delta, confidence=a.confidence, seed=canaries.tie_seed)
    result = {EPS_LOWER_BOUND: b.eps, EPS: eps, EPS_CLAIMED_BY: by, DELTA: delta, CANARIES: a.canaries,
              CONFIDENCE: a.confidence, METHOD: METHOD_NAME, CANARY: a.canary,
              OBSERVED: a.observe if a.canary == "dirac" else "final", INCLUDED: int(canaries.included.sum()),
              K_PLUS: b.k_plus, K_MINUS: b.k_minus, GUESSES: b.guesses,
              CORRECT: b.correct, PRECISION_LOWER: b.precision_lower, GRID: b.grid,
              PASSED: bool(eps is None or b.eps <= eps)}
    with open(os.path.join(run_dir, "audit.json"), "w") as f:
        json.dump(result, f, indent=2)
    result["summary"] = summary
    return result


def format_line(r: dict) -> str:
    verdict = "consistent with" if r[PASSED] else "VIOLATES"
    eps = "none" if r[EPS] is None else f"{r[EPS]:.3f}"
    return (f"audit ({r[CANARY]}, {r[OBSERVED]}, {r[CANARIES]} canaries, {100 * r[CONFIDENCE]:g}% confidence): "
            f"eps lower bound "
            f"{r[EPS_LOWER_BOUND]:.3f} {verdict} eps {eps} (delta {r[DELTA]:.3g}); {r[CORRECT]}/{r[GUESSES]} guesses "
            f"correct (top {r[K_PLUS]} in, bottom {r[K_MINUS]} out)")
