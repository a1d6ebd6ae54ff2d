"""Privacy accounting matches what happens: Poisson sampling, σ from ε, exact step counts, noise."""

import json
import math
import warnings

import pytest
import torch
from conftest import assert_eps_spent, deadline
from opacus.accountants import PRVAccountant

from dptrain import keys as key
from dptrain.privacy import DPOptimizer
from dptrain.privacy.accounting import _calibrate, default_delta, epsilon, noise_multiplier_for, steps_for
from dptrain.privacy.optimizer import CHUNKS, SCRATCH
from dptrain.privacy.sampling import PoissonSampler, ShuffleSampler, physical
from dptrain.privacy.streams import Streams


@pytest.mark.parametrize("accountant,golden", [("prv", 1.8384), ("rdp", 2.1014), ("gdp", 1.6177)])
def test_golden_epsilon(accountant, golden):
    eps = epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-5, accountant=accountant)
    assert eps == pytest.approx(golden, abs=2e-3)


def test_gdp_calibration_under_reports_against_prv():
    """The pitfall: a GDP-calibrated 'ε = 1' spends ≈ 1.27 under PRV (q = 0.02, δ = 1e-5, 150 steps)."""
    sigma = noise_multiplier_for(eps=1, delta=1e-5, sample_rate=0.02, steps=150, accountant="gdp")
    assert epsilon(noise_multiplier=sigma, sample_rate=0.02, steps=150, delta=1e-5) > 1.2


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("eps", [1.0, 3.0, 8.0])
def test_sigma_search_round_trip(eps, accountant):
    q, steps = 0.05, steps_for(3, 0.05)
    sigma = noise_multiplier_for(eps=eps, delta=1e-5, sample_rate=q, steps=steps, accountant=accountant)
    spent = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5, accountant=accountant)
    assert eps * (1 - 0.005) <= spent <= eps  # the bisection's tolerance: 0.5% of ε, never above


def test_accountant_refuses_non_finite_inputs():
    """Opacus' PRV accountant looped forever on σ = nan (issue #14: a run hung after its first epoch), and
    eps = inf was calibrated to σ = 10."""
    import signal

    def hang(*_):
        raise TimeoutError("the accountant hangs on a nan sigma")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    try:
        with pytest.raises(ValueError, match="non-finite accountant input"):
            epsilon(noise_multiplier=float("nan"), sample_rate=0.1, steps=10, delta=1e-5)
        with pytest.raises(ValueError, match="non-finite accountant input"):
            noise_multiplier_for(eps=float("inf"), delta=1e-5, sample_rate=0.1, steps=10)
        for bad in ({"sample_rate": float("nan")}, {"delta": float("nan")}):
            kw = {"sample_rate": 0.1, "delta": 1e-5} | bad
            with pytest.raises(ValueError, match="non-finite accountant input"):
                epsilon(noise_multiplier=1.0, steps=10, **kw)
            with pytest.raises(ValueError, match="non-finite accountant input"):
                noise_multiplier_for(eps=1.0, steps=10, **kw)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_epsilon_without_noise_or_steps_and_unknown_accountants():
    """σ = 0: no guarantee (ε = ∞); no step: nothing spent; the accountant's name is checked, prv the default."""
    for accountant in ("prv", "rdp", "gdp"):  # (GDP's own formula divides by σ)
        assert epsilon(noise_multiplier=0.0, sample_rate=0.1, steps=10, delta=1e-5, accountant=accountant) == math.inf
    assert epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5) == 0.0
    for call in (lambda: epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1e-5, accountant="moments"),
                 lambda: noise_multiplier_for(eps=1.0, delta=1e-5, sample_rate=0.1, steps=10, accountant="moments")):
        with pytest.raises(ValueError, match=r"^unknown accountant 'moments'; valid: prv, rdp, gdp$"):
            call()
    # the default accountant is PRV: σ for ε = 2 after 20 steps at q = 0.1 (test_budget's golden σ)
    assert noise_multiplier_for(eps=2.0, delta=1e-5, sample_rate=0.1, steps=20) == pytest.approx(1.3672, abs=1e-4)


def test_the_accountants_notes_are_silenced_not_raised():
    """Opacus' "optimal order is the largest alpha" note and, for a tiny σ, numpy's overflow inside PRV (then
    ε = ∞) stay inside the accounting."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eps = epsilon(noise_multiplier=50.0, sample_rate=0.01, steps=10, delta=1e-5, accountant="rdp")
        assert eps == pytest.approx(0.1029, abs=1e-3)
        assert epsilon(noise_multiplier=0.05, sample_rate=0.5, steps=1000, delta=1e-5) == math.inf


def test_only_the_accountants_known_notes_are_silenced(monkeypatch):
    """The accounting silences Opacus' UserWarning notes and (in ε) numpy's RuntimeWarning overflow, nothing else:
    a FutureWarning — an Opacus deprecation — still reaches the user, from ε and from σ's calibration."""
    from opacus.accountants.rdp import RDPAccountant

    from dptrain.privacy import accounting

    def warns(categories, result):
        def f(*_, **__):
            for category in categories:
                warnings.warn(category.__name__, category, stacklevel=2)
            return result
        return f

    monkeypatch.setattr(RDPAccountant, "get_epsilon", warns((UserWarning, RuntimeWarning, FutureWarning), 1.5))
    monkeypatch.setattr(accounting, "get_noise_multiplier", warns((UserWarning, FutureWarning), 2.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1e-5, accountant="rdp") == 1.5
        assert [w.category for w in caught] == [FutureWarning]
        assert noise_multiplier_for(eps=1.0, delta=1e-5, sample_rate=0.1, steps=10, accountant="rdp") == 2.0
        assert [w.category for w in caught] == [FutureWarning, FutureWarning]


# σ calibrated with a prior (dataset.normalize=dp's statistics, data.py) is dptrain's own bisection, _calibrate (Opacus'
# calibration takes no prior); test_normalize.py checks it end to end. Here every branch, at RDP with q = 1 (its
# closed form: ~0.1 ms an ε).
PRIOR = ((8.0, 1.0, 2),)  # two Gaussian queries of noise 8 on the full data
CAL = {"delta": 1e-5, "sample_rate": 1.0, "steps": 5, "accountant": "rdp", "prior": PRIOR}


def spent(sigma, **kw):
    """ε of training at σ composed with the prior (CAL, overridden by kw)."""
    return epsilon(noise_multiplier=sigma, **(CAL | kw))


@pytest.mark.parametrize("eps,golden", [(0.75, 33.125), (1.0, 12.96875), (3.0, 3.4765625), (20.0, 0.68359375)])
def test_calibration_with_a_prior_spends_eps_composed_within_tolerance(eps, golden):
    """σ above 20 and above 10 (the search doubles its first bracket (0, 10] twice, once), between 1 and 10, below 1:
    training composed with the prior spends eps to within 0.5% and never more; the prior counts (σ calibrated without
    it is smaller and overspends); σ is the bisection's own midpoint, pinned so that a config keeps mapping to the
    same σ (the bracket's start, its doubling, the midpoint and the stopping rule all decide which σ is returned)."""
    with deadline():
        sigma = noise_multiplier_for(eps=eps, **CAL)
        alone = noise_multiplier_for(eps=eps, **(CAL | {"prior": ()}))
    assert eps * (1 - 0.005) < spent(sigma) <= eps
    assert sigma == pytest.approx(golden, rel=1e-9)
    assert alone < sigma and spent(alone) > eps


@pytest.mark.parametrize("eps", [3.0, 200.0])
def test_calibration_without_tolerance_stops_at_a_millionth_of_sigma(eps):
    """tolerance=0: the bisection runs until its bracket is 1e-6 of σ wide — σ spends at most eps, σ less a
    millionth more (σ ≈ 3.5 and ≈ 0.14)."""
    with deadline():
        sigma = _calibrate(eps=eps, tolerance=0, **CAL)
    assert spent(sigma) <= eps < spent(sigma * (1 - 1e-6))


def test_calibration_stops_at_the_documented_boundaries():
    """It stops once eps·(1 - tolerance) < ε(σ) ≤ eps, from the bracket (0, 10]: a σ spending exactly eps is taken
    (10 itself: no doubling; 5, the first midpoint); one spending exactly eps·(1 - 0.005) is not."""
    x = spent(5.0)
    tie = [e for e in _floats_around(x / (1 - 0.005)) if e * (1 - 0.005) == x]
    assert tie, "no float eps with eps·0.995 == ε(5) exactly"
    with deadline():
        assert noise_multiplier_for(eps=spent(10.0), **CAL) == 10.0
        assert noise_multiplier_for(eps=x, **CAL) == 5.0
        sigma = noise_multiplier_for(eps=tie[0], **CAL)
    assert sigma < 5.0 and tie[0] * (1 - 0.005) < spent(sigma) <= tie[0]


def _floats_around(x, n=50):
    """x and its n float neighbours on each side."""
    below, above = [x], [x]
    for _ in range(n):
        below.append(math.nextafter(below[-1], -math.inf))
        above.append(math.nextafter(above[-1], math.inf))
    return below[::-1] + above[1:]


def test_calibration_refuses_a_prior_that_already_spends_eps():
    """The prior alone spends ε = 0.6948 (RDP): an eps at or below it — 0.67 is above PRV's 0.644, so the chosen
    accountant's ε counts — is refused with that ε; an eps just above it needs a σ above 1e6, also refused."""
    floor = spent(1.0, steps=0)
    assert floor == pytest.approx(0.6948, abs=1e-4) and floor > spent(1.0, steps=0, accountant="prv")
    for eps in (floor, 0.67):
        with deadline(), pytest.raises(ValueError, match=r"^the other releases already spend eps=0\.6948$"):
            noise_multiplier_for(eps=eps, **CAL)
    with deadline(), pytest.raises(ValueError, match=r"^no noise multiplier below 1e6 reaches it$"):
        noise_multiplier_for(eps=math.nextafter(floor, math.inf), **CAL)


def test_steps_and_default_delta():
    assert steps_for(3, 0.02) == 150 and steps_for(0.001, 0.5) == 1
    assert default_delta(50_000) == 1e-5 and default_delta(1437) == 1e-5
    assert default_delta(1_000_000) == pytest.approx(1e-7)
    # δ < 1/n strictly: at n = 100,000 1e-5 is 1/n, so 1/(10 n); up to n < 100,000 1e-5
    assert default_delta(99_999) == 1e-5 and default_delta(100_000) == pytest.approx(1e-6)
    assert default_delta(150_000) == pytest.approx(0.1 / 150_000)


def test_poisson_batch_sizes_have_binomial_mean_and_variance():
    n, q, steps = 1000, 0.05, 4000
    sizes = torch.tensor([len(b) for b in PoissonSampler(n, sample_rate=q, steps=steps, seed=0)], dtype=torch.float)
    assert sizes.mean().item() == pytest.approx(n * q, rel=0.02)
    assert sizes.var().item() == pytest.approx(n * q * (1 - q), rel=0.1)
    some = next(iter(PoissonSampler(n, sample_rate=q, steps=1, seed=1)))
    assert len(set(some.tolist())) == len(some)  # without replacement


def test_shuffle_sampler_fixed_size_and_physical_split():
    assert {len(b) for b in ShuffleSampler(10, batch_size=4, steps=7)} == {4}
    assert [len(c) for c in physical(torch.arange(10), 4)] == [4, 4, 2]
    assert physical(torch.arange(0), 4) == []


def test_poisson_batches_are_the_sampler_streams_float64_uniforms_below_q():
    """Step t includes example i iff the i-th float64 uniform of the "sampler" stream's t-th draw is < q (seed 0 by
    default): the batches are reproducible from the seed, and float32's coarser grid is not used."""
    n, q = 1000, 0.05
    gen = Streams(0).generator("sampler")
    expected = [(torch.rand(n, generator=gen, dtype=torch.float64) < q).nonzero().flatten() for _ in range(3)]
    for sampler in (PoissonSampler(n, sample_rate=q, steps=3), PoissonSampler(n, sample_rate=q, steps=3, seed=7,
                                                                              streams=Streams(0))):
        got = list(sampler)
        assert len(got) == len(sampler) == 3 and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert not torch.equal(next(iter(PoissonSampler(n, sample_rate=q, steps=1, seed=1))), expected[0])


def test_an_example_whose_uniform_equals_q_is_left_out():
    """Inclusion is u < q, not u ≤ q: on the float64 uniforms' 2**-53 grid P(u < q) is q exactly for a q on the grid,
    where u ≤ q would add 2**-53 above the accountant's q. Seen where it shows: q set to one example's own uniform
    (the 51st smallest of step 1's draws) leaves that example out and takes the 50 below it."""
    n = 1000
    u = torch.rand(n, generator=Streams(0).generator("sampler"), dtype=torch.float64)
    j = int(u.argsort()[50])
    batch = next(iter(PoissonSampler(n, sample_rate=u[j].item(), steps=1)))
    assert len(batch) == 50 and j not in batch.tolist() and torch.equal(batch, (u < u[j]).nonzero().flatten())


def test_shuffle_batches_are_consecutive_slices_of_the_sampler_streams_permutations():
    """Batch after batch, the concatenated random permutations of the "sampler" stream (seed 0 by default): each
    epoch sees every example once; secure mode has no shuffled batches to offer."""
    def stream(seed):
        gen = Streams(seed).generator("sampler")
        return torch.cat([torch.randperm(10, generator=gen) for _ in range(3)])

    got = list(ShuffleSampler(10, batch_size=4, steps=6, streams=Streams(5)))
    assert all(b.dtype == torch.long for b in got) and torch.equal(torch.cat(got), stream(5)[:24])
    assert torch.equal(torch.cat(list(ShuffleSampler(10, batch_size=4, steps=5))), stream(0)[:20])
    with pytest.raises(ValueError, match=r"^secure mode needs Poisson sampling: shuffled batches are not what the "
                                         r"accountant assumes, so there is no guarantee to secure$"):
        ShuffleSampler(10, batch_size=4, steps=1, streams=Streams(0, secure=True))


def test_noise_standard_deviation_and_averaging():
    p = torch.nn.Parameter(torch.zeros(200_000))
    opt = DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=4,
                      seed=0)
    opt.add_noise()  # no gradient at all (an empty Poisson batch): noise only
    assert p.grad.std().item() == pytest.approx(2.0 * 0.5 / 4, rel=0.01)
    assert abs(p.grad.mean().item()) < 0.01


def test_seeded_noise_reproduces_and_secure_noise_differs():
    def draw(**kw):
        p = torch.nn.Parameter(torch.zeros(5))
        DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1,
                    **kw).add_noise()
        return p.grad

    assert torch.equal(draw(seed=3), draw(seed=3)) and torch.equal(draw(seed=3), draw(streams=Streams(3)))
    assert not torch.equal(draw(seed=3), draw(seed=4))
    assert not torch.equal(draw(seed=3, secure=True), draw(seed=3, secure=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_is_each_chunks_own_stream_times_sigma_R_over_L(dtype):
    """One process: chunk i of the flat gradient (CHUNKS equal ranges of its elements) gets the next draws of
    sub-stream i of the "noise" stream, in the gradient's dtype, times σR; then everything is ÷ L. Exactly."""
    sigma, R, L = 2.0, 1.5, 3  # σR = 3, σR/L = 1: neither a factor of 1 nor one that cancels
    ps = [torch.nn.Parameter(torch.zeros(500, dtype=dtype)), torch.nn.Parameter(torch.zeros(5, 100, dtype=dtype))]
    g = torch.linspace(-1, 1, 500, dtype=dtype)
    ps[0].grad = g.clone()  # a clipped sum; ps[1] has none (zeros)
    DPOptimizer(torch.optim.SGD(ps, lr=1.0), noise_multiplier=sigma, max_grad_norm=R, expected_batch_size=L,
                seed=4).add_noise()
    streams, size = Streams(4), 1000 // CHUNKS  # the chunk boundaries fall on the parameters' boundary at 500
    z = torch.cat([torch.empty(size, dtype=dtype).normal_(generator=streams.generator("noise", i))
                   for i in range(CHUNKS)])
    assert torch.equal(ps[0].grad, g.clone().add_(z[:500], alpha=sigma * R).div_(L))
    assert torch.equal(ps[1].grad.flatten(), torch.zeros(500, dtype=dtype).add_(z[500:], alpha=sigma * R).div_(L))


def test_zero_noise_steps_the_average_and_bad_arguments_are_refused():
    """σ = 0 is allowed (no noise: the update is the clipped sum ÷ L); step() zeroes the gradients (None), as does
    zero_grad(); σ < 0 and L ≤ 0 are refused."""
    p = torch.nn.Parameter(torch.zeros(10))
    p.grad = torch.arange(10.0)
    opt = DPOptimizer(torch.optim.SGD([p], lr=0.5), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4)
    opt.step()
    assert torch.equal(p.detach(), torch.arange(10.0) / 4 * -0.5) and p.grad is None
    p.grad = torch.ones(10)
    opt.zero_grad()
    assert p.grad is None
    with pytest.raises(ValueError, match=r"^noise_multiplier must be >= 0, got -0.1$"):
        DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=-0.1, max_grad_norm=1.0, expected_batch_size=4)
    with pytest.raises(ValueError, match=r"^expected_batch_size must be > 0, got 0$"):
        DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=0)


def test_noise_generator_states_restore_the_draws():
    """A checkpoint's noise state (generator_states: each chunk's generator, by device) restores the next draws
    exactly, in the same optimizer or another seed's; a state of the wrong number of chunks is refused."""
    def make(seed):
        p = torch.nn.Parameter(torch.zeros(1000))
        return p, DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                              expected_batch_size=1, seed=seed)

    p, a = make(0)
    a.add_noise()
    states = a.generator_states()
    assert list(states) == ["cpu"] and len(states["cpu"]) == CHUNKS
    p.grad = None
    a.add_noise()
    after = p.grad.clone()
    q, b = make(1)
    b.set_generator_states(states)
    b.add_noise()
    assert torch.equal(q.grad, after)
    a.set_generator_states(states)
    p.grad = None
    a.add_noise()
    assert torch.equal(p.grad, after)
    with pytest.raises(ValueError):
        b.set_generator_states({"cpu": states["cpu"][:-1]})


def test_noise_is_drawn_through_a_scratch_no_larger_than_its_chunk_or_SCRATCH(monkeypatch):
    """No parameter-sized noise buffer: each chunk draws through one scratch of min(SCRATCH, its range) elements
    (at least one). A device without a SCRATCH entry (a GPU's path) draws the same noise, with the default size."""
    import dptrain.privacy.optimizer as optimizer

    sizes, real = [], torch.empty

    def empty(*args, **kw):
        t = real(*args, **kw)
        sizes.append(t.numel())
        return t

    def noise(n):
        p = torch.nn.Parameter(torch.zeros(n))
        DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1,
                    seed=0).add_noise()
        return p.grad

    with monkeypatch.context() as m:
        m.setattr(torch, "empty", empty)
        for n, scratch in [(3_000_000, SCRATCH["cpu"]), (1000, 1000 // CHUNKS), (7, 1)]:
            sizes.clear()
            noise(n)
            assert sorted(sizes) == [scratch] * CHUNKS, n
    seeded = noise(1000)
    monkeypatch.setattr(optimizer, "SCRATCH", {})
    assert torch.equal(noise(1000), seeded)


def test_cpu_noise_fills_the_chunks_in_the_thread_pool_an_accelerators_one_by_one_on_its_device(monkeypatch):
    """On the CPU the chunks fill in parallel in the module's thread pool (all CHUNKS of them, in one map). Any other
    device (a GPU; here PyTorch's storage-less "meta" device, which takes that path without memory) draws them one
    after another in this thread, each chunk's generator made on that device, through a scratch ON that device of
    at most 1 << 22 elements (16 MB of float32: no parameter-sized noise buffer) — a chunk longer than that in
    several draws, every chunk drawn."""
    import dptrain.privacy.optimizer as optimizer

    mapped, real_pool = [], optimizer._POOL

    class Pool:
        def map(self, fn, chunks):
            mapped.append(list(chunks))
            return real_pool.map(fn, chunks)

    monkeypatch.setattr(optimizer, "_POOL", Pool())
    p = torch.nn.Parameter(torch.zeros(1000))
    DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1,
                seed=0).add_noise()
    assert mapped == [list(range(CHUNKS))] and p.grad.count_nonzero() == 1000

    mapped.clear()
    gen_devices, scratches, real_empty = [], [], torch.empty
    n = CHUNKS * (1 << 22) + CHUNKS * 1000  # each chunk 1000 elements longer than the scratch
    p = torch.nn.Parameter(torch.zeros(n, device="meta"))
    p.grad = torch.zeros(n, device="meta")
    opt = DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1,
                      seed=0)
    real_generator = opt.streams.generator

    def generator(name, *sub, device="cpu"):  # a meta generator does not exist: record the device, draw on the CPU
        gen_devices.append(device)
        return real_generator(name, *sub)

    def empty(*args, **kw):
        t = real_empty(*args, **kw)
        scratches.append((t.numel(), t.device))
        return t

    monkeypatch.setattr(opt.streams, "generator", generator)
    monkeypatch.setattr(torch, "empty", empty)
    draws, real_normal = [], torch.Tensor.normal_

    def normal_(t, *args, **kw):
        draws.append(t.numel())
        return real_normal(t, *args, **kw)

    monkeypatch.setattr(torch.Tensor, "normal_", normal_)
    opt.add_noise()
    meta = torch.device("meta")
    assert mapped == [] and gen_devices == [meta] * CHUNKS and list(opt.generator_states()) == ["meta"]
    assert scratches == [(1 << 22, meta)] * CHUNKS
    assert draws == [1 << 22, 1000] * CHUNKS


@pytest.mark.slow
def test_physical_batch_size_changes_memory_only(quick):
    _, a = quick("physical_batch_size=16", "name=a")
    sa = torch.load(a / "model.pt")
    _, b = quick("physical_batch_size=3", "name=b")
    sb = torch.load(b / "model.pt")
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-6), k


@pytest.mark.slow
def test_training_takes_exactly_the_calibrated_steps(quick):
    s, run_dir = quick("epochs=2.5", "batch_size=10")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1][key.STEP] == s[key.STEPS] == steps_for(2.5, 10 / 64)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["mixed_ghost", "opacus", "opacus_ghost"])
def test_empty_poisson_batches_are_noise_only_steps(quick, engine):
    s, run_dir = quick(f"engine={engine}", "batch_size=1", "epochs=0.5")  # q = 1/64: many empty logical batches
    steps = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])[key.STEP]
    assert s[key.STEPS] == steps == 32
    assert_eps_spent(s, target=3.0, steps=steps)


@pytest.mark.slow
def test_shuffle_is_labelled_not_guaranteed(quick):
    s, _ = quick("privacy.sampling=shuffle")
    assert s[key.SAMPLING] == "shuffle" and s[key.EPS_GUARANTEED] is False


@pytest.mark.slow
def test_given_noise_multiplier_reports_epsilon(quick):
    s, _ = quick("privacy.noise_multiplier=1.5", "eps=null", "privacy.secure=true")
    assert s[key.NOISE_MULTIPLIER] == 1.5 and s[key.EPS] is None
    assert (s[key.SAMPLE_RATE], s[key.STEPS], s[key.DELTA]) == (0.25, 4, 1e-5)  # L = 16 of n = 64, one epoch
    assert_eps_spent(s)
    assert s[key.SECURE] is True and s[key.SECURE_NOISE] is True


@pytest.mark.slow
def test_default_run_at_eps_1_is_tight_under_prv(compose, tmp_path):
    """`dptrain eps=1`: its (σ, q, steps, δ) recomputed with Opacus' PRV accountant gives 0.995 ≤ ε ≤ 1 — the
    training metrics' noise σ_m riding on the same batch (the step one Gaussian at (σ⁻² + 2σ_m⁻²)^(-1/2))."""
    from dptrain.train.run import run

    s = run(compose("progress=false", "eps=1"), str(tmp_path / "r"))
    acc = PRVAccountant()
    (metrics,) = [r for r in s[key.LEDGER] if r["release"] == "train/loss, train/acc"]
    joint = (s[key.NOISE_MULTIPLIER] ** -2 + 2 * metrics["noise_multiplier"] ** -2) ** -0.5
    acc.history = [(joint, s[key.SAMPLE_RATE], s[key.STEPS])]
    eps = acc.get_epsilon(delta=s[key.DELTA])
    assert 1.0 * (1 - 0.005) <= eps <= 1.0 and eps == pytest.approx(s[key.EPS_SPENT], rel=1e-6)
    assert s[key.SAMPLING] == "poisson" and s[key.ACCOUNTANT] == "prv"


def test_noise_reaches_every_parameter_including_non_contiguous_gradients():
    """Noise is streamed range by range into the gradients (no noise buffer): every element of every
    parameter gets its own N(0, σ²R²) draw, also where the gradient is channels-last (non-contiguous)."""
    shapes = [(64, 32, 3, 3), (300_000,), (7,), (128, 64)]
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    ps[0].grad = torch.zeros(shapes[0]).contiguous(memory_format=torch.channels_last)
    opt = DPOptimizer(torch.optim.SGD(ps, lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1,
                      seed=5)
    opt.add_noise()
    for p in ps[:2] + ps[3:]:
        assert p.grad.std().item() == pytest.approx(1.0, rel=0.03)
    assert (ps[2].grad != 0).all()
    blocks = ps[1].grad.split(1 << 14)  # no range or scratch piece repeats another's draw
    assert all(not torch.equal(a[:100], b[:100]) for a in blocks for b in blocks if a is not b)
    again = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    DPOptimizer(torch.optim.SGD(again, lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1,
                seed=5).add_noise()
    assert all(torch.equal(a.grad.contiguous(), b.grad.contiguous()) for a, b in zip(ps, again))


def test_an_accountant_is_one_entry_in_the_registry(monkeypatch):
    """Another accountant is a class with Opacus' IAccountant interface under a new name: ε composes its history,
    and σ is calibrated by the same bisection (Opacus' own calibration knows only its names)."""
    from opacus.accountants import RDPAccountant

    from dptrain.privacy import accounting

    class Renamed(RDPAccountant):  # the RDP accountant under another name: the same numbers, through the registry
        pass

    monkeypatch.setitem(accounting.ACCOUNTANTS, "renamed_rdp", Renamed)
    kw = dict(sample_rate=0.01, steps=500, delta=1e-5)
    assert epsilon(noise_multiplier=1.0, accountant="renamed_rdp", **kw) == epsilon(noise_multiplier=1.0,
                                                                                    accountant="rdp", **kw)
    sigma = noise_multiplier_for(eps=2.0, accountant="renamed_rdp", **kw)
    assert 2.0 * (1 - 0.005) < epsilon(noise_multiplier=sigma, accountant="rdp", **kw) <= 2.0
    assert sigma == pytest.approx(noise_multiplier_for(eps=2.0, accountant="rdp", **kw), rel=0.01)
