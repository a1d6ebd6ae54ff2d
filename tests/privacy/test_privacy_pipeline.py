"""End to end: what a real (tiny) private run DOES, observed from outside its own counters (issue #21).

Two seams, neither of them a dptrain counter:
  * batches — every physical batch the training loop feeds the model: `dptrain.train.loop.batches` is wrapped and
    records (indices, x, y) of each batch that `train_one_epoch` asks for;
  * updates — every step of the torch optimizer underneath any engine (the built-in DPOptimizer and Opacus
    both end in torch.optim.SGD.step): a global step pre-hook records each parameter's .grad, i.e. the
    gradient after clipping, noise and ÷ L, whatever engine made it.

With optimizer.lr=0 the weights never move, so model.pt is θ₀ and each step's noise is observable exactly:

    N_t = L · g_t − Σ_{i ∈ B_t} min(1, R/‖∇ℓ_i(θ₀)‖) · ∇ℓ_i(θ₀)        (dptrain/testing.py, float64)

where B_t is the set of examples fed since the previous update. Then, per engine:
  * steps    — optimizer updates = round(epochs·n/L) = the steps summary.json reports, empty batches included
               (the run is sized so that some logical batches are empty: q = 0.02, L = 2);
  * noise    — every N_t has per-coordinate variance σ²R² (χ² bound) and mean 0 — also on empty steps;
  * fresh    — N_t and N_s are uncorrelated for t ≠ s (the same vector twice has correlation 1);
  * sampling — the examples fed, Σ|B_t|, are Binomial(n·T, q) with the accounted q = L/n;
  * ε        — Opacus' PRVAccountant stepped once per observed update, with the (σ, q) the noise and the
               batches were checked against, gives the reported privacy/eps_spent.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import pytest
import torch
from helpers.runs import compose
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dptrain.testing import reference_grads

N, L, EPOCHS, R, SIGMA = 100, 2, 2, 1.0, 1.0  # q = 0.02, T = 100 steps, P(empty logical batch) = 0.98**100 ≈ 0.13
# (σ given rather than calibrated from ε: the calibration's bisection took 6 s of each 2-core run)
BASE = ["progress=false", "dataset=fake", f"dataset.size={N}", "dataset.image_size=8", "model.kwargs.channels=[8]",
        "model.kwargs.hidden=8", f"epochs={EPOCHS}", f"batch_size={L}", "physical_batch_size=3", "optimizer.lr=0",
        f"max_grad_norm={R}", "eps=null", f"privacy.noise_multiplier={SIGMA}", "privacy.accountant=prv", "device=cpu"]
ENGINES = {
    "builtin_1pass": ["engine=mixed_ghost", "engine.passes=1"],
    "builtin_2pass": ["engine=mixed_ghost", "engine.passes=2"],
    "opacus": ["engine=opacus"],
    "opacus_ghost": ["engine=opacus_ghost"],
    "builtin_secure": ["engine=mixed_ghost", "privacy.secure=true"],
}
Z = 6.0  # standard deviations allowed by every statistical check (false alarm ≲ 1e-6 per check)


@dataclass
class Observed:
    summary: dict
    n: int  # training examples the loop drew from
    batches: list[torch.Tensor]  # per optimizer update: the example indices fed since the previous one
    noise: torch.Tensor  # (T, d) float64: N_t / (σR)




def observe(overrides, run_dir) -> Observed:
    import dptrain.train.loop
    from dptrain.models.factory import create_model
    from dptrain.train.run import run

    cfg = compose(*BASE, *overrides)
    events, train_sets = [], []
    real_batches = dptrain.train.loop.batches

    def batches(ds, index_batches, **kw):
        if sys._getframe(1).f_code.co_name != "train_one_epoch":  # evaluate()'s batches are not training
            return real_batches(ds, index_batches, **kw)
        train_sets.append(ds)
        index_batches = list(index_batches)

        def gen():
            for idx, (x, y) in zip(index_batches, real_batches(ds, index_batches, **kw), strict=True):
                events.append(("batch", idx.clone(), x.clone(), y.clone()))
                yield x, y

        return gen()

    def on_step(opt, args, kwargs):
        if type(opt) is torch.optim.SGD:  # the torch optimizer under every engine, not a DP wrapper
            events.append(("step", [None if p.grad is None else p.grad.detach().double().clone()
                                    for g in opt.param_groups for p in g["params"]]))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dptrain.train.loop, "batches", batches)
        handle = register_optimizer_step_pre_hook(on_step)
        try:
            summary = run(cfg, str(run_dir))
        finally:
            handle.remove()

    # θ₀: lr = 0, so the saved model is the one every per-example gradient was taken at
    assert len({id(d) for d in train_sets}) == 1, "the loop drew from more than one training set"
    train = train_sets[0]
    x0 = train[0][0]
    model = create_model(cfg.model.name, num_classes=cfg.dataset.num_classes, in_chans=x0.shape[0],
                         img_size=x0.shape[-1], **cfg.model.kwargs)
    model.load_state_dict(torch.load(run_dir / "model.pt"))
    model = model.double()
    params = [p for p in model.parameters() if p.requires_grad]

    sigma = summary["privacy/noise_multiplier"]
    assert sigma == SIGMA
    fed, steps, noise = [], [], []
    for ev in events:
        if ev[0] == "batch":
            fed.append(ev[1:])
            continue
        grads = ev[1]
        assert len(grads) == len(params) and all(gi is None or gi.shape == p.shape for p, gi in zip(params, grads))
        g = torch.cat([torch.zeros(p.numel(), dtype=torch.float64) if gi is None else gi.flatten()
                       for p, gi in zip(params, grads)])
        idx = torch.cat([f[0] for f in fed]) if fed else torch.zeros(0, dtype=torch.long)
        if fed:
            x, y = torch.cat([f[1] for f in fed]).double(), torch.cat([f[2] for f in fed])
            clipped, _ = reference_grads(model, [(x, y)], max_grad_norm=R)
            s = torch.cat([c.flatten() for c in clipped])
        else:
            s = torch.zeros_like(g)
        steps.append(idx)
        noise.append((L * g - s) / (sigma * R))
        fed = []
    assert not fed, "examples were fed after the last update"
    return Observed(summary, len(train), steps, torch.stack(noise) if noise else torch.zeros(0, 0))


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """One observed run per engine, shared by the checks below."""
    cache, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one intra-op thread is 2× faster on a shared 2-core machine

    def get(name):
        if name not in cache:
            cache[name] = observe(ENGINES[name], tmp_path_factory.mktemp(name) / "run")
        return cache[name]

    yield get
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_one_noisy_update_per_accounted_step_including_empty_batches(observed, engine):
    o = observed(engine)
    T = round(EPOCHS * N / L)  # steps = epochs / q, computed here rather than read from the run
    assert len(o.batches) == T == o.summary["privacy/steps"]
    empty = sum(len(b) == 0 for b in o.batches)
    assert empty > 0, "no empty logical batch: the run is too large to test noise-only steps"


@pytest.mark.parametrize("engine", list(ENGINES))
def test_every_update_carries_noise_of_std_sigma_R_over_L(observed, engine):
    o = observed(engine)
    T, d = o.noise.shape
    var = o.noise.pow(2).mean(1)  # per step: (1/d)·Σ (N_t/σR)², χ²_d/d under the claim: mean 1, sd √(2/d)
    tol = Z * math.sqrt(2 / d)
    bad = [(t, round(v, 3), len(o.batches[t])) for t, v in enumerate(var.tolist()) if abs(v - 1) > tol]
    assert not bad, f"steps whose noise std is not σR/L (step, var/(σR)², batch size): {bad[:10]}"
    assert abs(var.mean().item() - 1) < Z * math.sqrt(2 / (d * T))
    assert abs(o.noise.mean().item()) < Z / math.sqrt(d * T)
    empty = [t for t, b in enumerate(o.batches) if len(b) == 0]  # noise-only steps (their count: test above)
    if empty:
        assert abs(var[empty].mean().item() - 1) < Z * math.sqrt(2 / (d * len(empty)))


@pytest.mark.parametrize("engine", list(ENGINES))
def test_noise_is_fresh_at_every_step(observed, engine):
    o = observed(engine)
    T, d = o.noise.shape
    corr = (o.noise @ o.noise.T) / d  # off-diagonal entries ~ N(0, 1/d) for independent draws
    off = corr - torch.diag(torch.diagonal(corr))
    worst = off.abs().max().item()
    assert worst < Z / math.sqrt(d), f"noise of two steps correlates by {worst:.3f}"


@pytest.mark.parametrize("engine", list(ENGINES))
def test_batches_are_poisson_at_the_accounted_rate(observed, engine):
    o = observed(engine)
    q = L / o.n
    assert o.summary["privacy/sample_rate"] == pytest.approx(q, rel=1e-12)
    assert o.summary["privacy/sampling"] == "poisson"
    for b in o.batches:
        assert len(set(b.tolist())) == len(b) and all(0 <= i < o.n for i in b.tolist())
    T, fed = len(o.batches), sum(len(b) for b in o.batches)
    mean, sd = o.n * T * q, math.sqrt(o.n * T * q * (1 - q))
    assert abs(fed - mean) < Z * sd, f"{fed} examples fed in {T} steps; Poisson at q={q} gives {mean:.0f} ± {sd:.0f}"


@pytest.mark.parametrize("engine", list(ENGINES))
def test_reported_epsilon_is_the_accountant_of_what_was_observed(observed, engine):
    from opacus.accountants import PRVAccountant

    o = observed(engine)
    s = o.summary
    assert s["privacy/accountant"] == "prv" and s["privacy/delta"] == 1e-5  # the default, < 1/n = 0.01
    sigma = s["privacy/noise_multiplier"]
    metrics = {r["release"]: r for r in s["privacy/ledger"]}.get("train/loss, train/acc")
    if metrics is not None:  # the ledger's training metrics: two more sums on each step's batch (one joint Gaussian)
        sigma = (sigma**-2 + 2 * metrics["noise_multiplier"] ** -2) ** -0.5
    acc = PRVAccountant()
    for _ in o.batches:  # one accountant step per observed update, at the σ and q checked above
        acc.step(noise_multiplier=sigma, sample_rate=L / o.n)
    eps = acc.get_epsilon(delta=s["privacy/delta"])
    assert s["privacy/eps_spent"] == pytest.approx(eps, rel=1e-6)


def test_secure_run_is_not_the_seeded_one(observed):
    """privacy.secure=true: same seed as the seeded run, yet other batches and other noise; summary.json says
    that the sampler and the noise came from OS entropy."""
    seeded, secure = observed("builtin_1pass"), observed("builtin_secure")
    assert secure.summary["privacy/secure"] is True and seeded.summary["privacy/secure"] is False
    streams = secure.summary["privacy/streams"]
    assert streams["sampler"] == streams["noise"] == "os.urandom"
    assert [b.tolist() for b in secure.batches] != [b.tolist() for b in seeded.batches]
    assert (secure.noise[0] - seeded.noise[0]).abs().max().item() > 0.1
