"""Random streams (privacy/streams.py, issue #14): one seed, spawned streams that never coincide; secure mode
draws the sampler and the noise from the OS."""

import logging
import math
import os
import re

import numpy as np
import pytest
import torch
from conftest import TINY

from dptrain import keys as key
from dptrain.errors import UserError
from dptrain.privacy import DPOptimizer
from dptrain.privacy.optimizer import CHUNKS
from dptrain.privacy.sampling import PoissonSampler
from dptrain.privacy.streams import KEYS, Streams, os_bernoulli, os_normal

CPU = torch.device("cpu")


def every_stream(seed):
    s = Streams(seed)
    return {(name, i): s.seed_for(name, i) if name == "noise" else s.seed_for(name)
            for name in KEYS for i in (range(CHUNKS) if name == "noise" else [None])}


def test_no_two_streams_coincide_for_seeds_0_to_999():
    """Distinct in the 32 bits torch's CPU generator keeps (manual_seed(s) and manual_seed(s + 2**32) are the
    same generator), hence in all 64."""
    for seed in range(1000):
        seeds = every_stream(seed)
        assert len({s & 0xFFFFFFFF for s in seeds.values()}) == len(seeds), seed
        assert all(0 <= s < 2**63 for s in seeds.values())


def test_stream_seeds_are_pinned():
    """The derivation is the reproducibility contract: renumbering a key changes every past run's streams."""
    s = Streams(0)
    assert s.seed_for("sampler") == Streams(0).seed_for("sampler") != Streams(1).seed_for("sampler")
    got = {name: s.seed_for(name) for name in ("model", "sampler", "augment")} | {"noise0": s.seed_for("noise", 0)}
    assert got == PINNED, got
    assert Streams().seed == 0 and Streams().seed_for("sampler") == PINNED["sampler"]  # the default seed is 0


PINNED = {"model": 4334430513956379144, "sampler": 6619194650426729951, "augment": 7076583287685412047,
          "noise0": 4744905141714261070}  # SeedSequence(0, spawn_key=(k, ...)).generate_state(1, uint64)[0] >> 1


@pytest.mark.parametrize("seed", [-1, 1.5, "3", True])
def test_seed_must_be_a_non_negative_integer(seed):
    with pytest.raises(ValueError, match=rf"^seed must be a non-negative integer, got {re.escape(repr(seed))}$"):
        Streams(seed)


def test_describe_says_where_each_stream_comes_from():
    """summary.json's privacy/streams: the spawn key of each seeded stream; in secure mode os.urandom for exactly
    the sampler, the noise, Opacus' noise, dataset.normalize=dp's noise and the metric releases' noise (ledger.py)."""
    seeded = {name: f"SeedSequence(7, spawn_key=({k},))" for name, k in KEYS.items()}
    seeded["noise"] = "SeedSequence(7, spawn_key=(4, chunk))"
    seeded["metrics"] = "SeedSequence(7, spawn_key=(8, 0 train | 1 val, step))"
    assert Streams(7).describe() == seeded
    assert Streams(7).summary() == {key.SECURE: False, key.STREAMS: seeded}
    secure = Streams(7, secure=True).summary()
    from_os = dict.fromkeys(("sampler", "noise", "opacus", "norm", "metrics"), "os.urandom")
    assert secure == {key.SECURE: True, key.STREAMS: seeded | from_os}


def test_unknown_streams_and_streams_that_coincide_in_32_bits_are_refused(monkeypatch):
    """The low-32-bit guard (a ~2**-32 event per pair, so forced here: every key's seed gets the same low bits)."""
    with pytest.raises(KeyError, match="unknown random stream 'bogus'; valid: model, data, split, sampler, noise, "
                                       "augment, opacus, norm"):
        Streams(0).seed_for("bogus")
    with pytest.raises(RuntimeError, match=r"^stream 'noise' draws from the OS in secure mode \(os_bernoulli / "
                                           r"os_normal\), never from a seed$"):
        Streams(0, secure=True).seed_for("noise", 0)

    class Colliding:  # stream key (k, ...) → 64-bit output 2·((k + 1)·2**32 + 12345): low 32 bits of s are 12345
        def __init__(self, entropy, spawn_key):
            self.k = spawn_key[0]

        def generate_state(self, n_words, dtype):
            return np.array([((self.k + 1) << 33) | (12345 << 1)], dtype=np.uint64)

    monkeypatch.setattr(np.random, "SeedSequence", Colliding)
    s = Streams(3)
    assert s.seed_for("model") == s.seed_for("model") == (1 << 32) | 12345  # one stream twice is no collision
    with pytest.raises(RuntimeError, match=r"^seed=3: random streams \(0,\) and \(1,\) coincide in the 32 bits "
                                           r"torch's CPU generator keeps; use another seed$"):
        s.seed_for("data")


def test_sampler_and_noise_never_share_a_generator():
    """The issue's collision: at seed 0 the Poisson sampler and noise chunk 0 were both manual_seed(0), so step 1's
    noise was a transform of the uniforms that chose step 1's batch. No consumer's generator may start in the
    state of another's, for any seed (checked 0..49)."""
    from dptrain.engines import create_engine

    for seed in range(50):
        sampler = PoissonSampler(100, sample_rate=0.1, steps=1, seed=seed)
        p = torch.nn.Parameter(torch.zeros(3))
        noise = DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                            expected_batch_size=1, seed=seed)._generators(CPU)
        model = torch.nn.Linear(2, 2)
        opacus = create_engine("opacus", model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0,
                               max_grad_norm=1.0, expected_batch_size=1, seed=seed).optimizer.generator
        states = [g.get_state() for g in [sampler.generator, *noise, opacus]]
        for i in range(len(states)):
            for j in range(i):
                assert not torch.equal(states[i], states[j]), (seed, i, j)
    # and concretely, at seed 0: the sampler's first uniforms are not the ones behind chunk 0's first normals
    sampler = PoissonSampler(100, sample_rate=0.1, steps=1, seed=0)
    gen0 = DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                       expected_batch_size=1, seed=0)._generators(CPU)[0]
    assert not torch.equal(torch.rand(8, generator=sampler.generator), torch.rand(8, generator=gen0))


@pytest.mark.slow
def test_every_generator_a_run_seeds_is_distinct(compose, tmp_path, monkeypatch):
    """A real run (fake data, validation split, augmentation, built-in engine and Opacus) at seed 0: every
    torch generator it seeds and the global seed are pairwise distinct in the bits torch keeps."""
    from dptrain.train.run import run

    seeded = []

    class Recording(torch.Generator):
        def manual_seed(self, seed):
            seeded.append((str(self.device), seed & (0xFFFFFFFF if self.device.type == "cpu" else 2**64 - 1)))
            return super().manual_seed(seed)

    real_manual_seed = torch.manual_seed

    def manual_seed(seed):
        seeded.append(("global", seed & 0xFFFFFFFF))
        return real_manual_seed(seed)

    monkeypatch.setattr(torch, "Generator", Recording)
    monkeypatch.setattr(torch, "manual_seed", manual_seed)
    for engine in ("mixed_ghost", "opacus"):
        seeded.clear()
        run(compose(*TINY, f"engine={engine}", "dataset.augment=true", "dataset.val_fraction=0.25", "seed=0",
                    "eps=null", "privacy.noise_multiplier=1.0"),
            str(tmp_path / engine))
        values = [s for _, s in seeded]
        assert len(values) >= (13 if engine == "mixed_ghost" else 6), seeded  # global, data, split, sampler, …
        assert len(set(values)) == len(values), (engine, sorted(values))


def test_secure_mode_refuses_seeds_and_draws_from_the_os():
    s = Streams(0, secure=True)
    for name in ("sampler", "noise", "opacus"):
        with pytest.raises(RuntimeError, match="draws from the OS"):
            s.seed_for(name)
    assert s.seed_for("model") == Streams(0).seed_for("model")  # init, augmentation, split: still seeded
    assert s.describe()["sampler"] == s.describe()["noise"] == "os.urandom"
    a, b = (PoissonSampler(1000, sample_rate=0.5, steps=1, streams=s) for _ in range(2))
    assert a.generator is None and not torch.equal(next(iter(a)), next(iter(b)))
    p = torch.nn.Parameter(torch.zeros(300_000))
    DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=4,
                streams=s).add_noise()
    assert p.grad.std().item() == pytest.approx(0.25, rel=0.01) and abs(p.grad.mean().item()) < 0.003


def test_os_bernoulli_rate_never_exceeds_q():
    assert not os_bernoulli(1000, 0.0).any() and os_bernoulli(1000, 1.0).all()
    assert all(os_bernoulli(1000, p).shape == (1000,) and os_bernoulli(1000, p).dtype == torch.bool
               for p in (0.0, 0.3, 1.0))
    n, q = 1_000_000, 0.3
    rate = os_bernoulli(n, q).double().mean().item()
    assert abs(rate - q) < 6 * (q * (1 - q) / n) ** 0.5


def test_os_normal_is_standard_normal():
    z = os_normal(400_000)
    n = len(z)
    assert z.dtype == torch.float64 and n == 400_000
    assert abs(z.mean().item()) < 6 / n**0.5
    assert abs(z.var().item() - 1) < 6 * (2 / n) ** 0.5
    assert abs((z.abs() > 1.959964).double().mean().item() - 0.05) < 6 * (0.05 * 0.95 / n) ** 0.5
    assert abs((z**4).mean().item() - 3) < 6 * (96 / n) ** 0.5  # Gaussian kurtosis; var(z⁴) = 105 - 9
    assert len(torch.unique(os_normal(1000))) == 1000


def test_os_bernoulli_includes_exactly_the_64_bit_words_below_floor_q_2_64(monkeypatch):
    """Example i is in iff its 64-bit word from os.urandom (8 bytes each, one read) is < floor(q·2**64): a word
    equal to the threshold stays out, so the rate is ≤ q, and at q = 0 nothing is ever included."""
    from fractions import Fraction

    words = []

    def urandom(k):
        assert k == 8 * len(words)
        return np.array(words, dtype=np.uint64).tobytes()

    monkeypatch.setattr(os, "urandom", urandom)
    t3 = math.floor(Fraction(0.3) * 2**64)
    for q, w, want in [(0.25, [2**62 - 1, 2**62, 2**62 + 1, 0, 2**64 - 1], [1, 0, 0, 1, 0]),
                       (0.0, [0, 1, 2**63], [0, 0, 0]), (0.3, [t3 - 1, t3, t3 + 1], [1, 0, 0])]:
        words[:] = w
        assert os_bernoulli(len(w), q).tolist() == [bool(x) for x in want], q


def test_os_normal_reads_32_bytes_per_value_and_halves_four_box_muller_normals(monkeypatch):
    """n values read 32·n bytes in one call (the cost os_normal states): 4n normals from 2n Box–Muller
    pairs of 53-bit uniforms (the top 53 bits of each 64-bit word × 2**-53), radii from the first 2n uniforms and
    angles from the last 2n, cosines then sines; value j is half the sum of normals j, n + j, 2n + j, 3n + j."""
    n, asked = 3, []
    raw = np.random.default_rng(0).integers(0, 2**64, size=64, dtype=np.uint64, endpoint=False).tobytes()

    def urandom(k):
        asked.append(k)
        return raw[:k]

    monkeypatch.setattr(os, "urandom", urandom)
    z = os_normal(n)
    assert asked == [32 * n] and z.dtype == torch.float64 and z.shape == (n,)
    u = [int(w >> np.uint64(11)) * 2.0**-53 for w in np.frombuffer(raw[:32 * n], dtype=np.uint64)]
    k = 2 * n
    normals = ([math.sqrt(-2 * math.log1p(-u[i])) * math.cos(2 * math.pi * u[k + i]) for i in range(k)]
               + [math.sqrt(-2 * math.log1p(-u[i])) * math.sin(2 * math.pi * u[k + i]) for i in range(k)])
    want = [0.5 * sum(normals[a * n + j] for a in range(4)) for j in range(n)]
    assert z.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_a_generator_is_made_on_the_device_asked_for(monkeypatch):
    """generator(name, *sub, device=d) is a torch.Generator on d (a CUDA tensor's normal_ refuses a CPU generator,
    and CUDA's Philox keeps all 64 seed bits), seeded with seed_for(name, *sub); the default device is the CPU."""
    made, real = [], torch.Generator
    if torch.cuda.is_available():
        assert Streams(0).generator("noise", 0, device="cuda").device.type == "cuda"

    def generator(device="cpu"):  # no CUDA here: record the device asked for, make a CPU generator
        made.append(device)
        return real()

    monkeypatch.setattr(torch, "Generator", generator)
    s = Streams(3)
    g = s.generator("noise", 2, device="cuda:1")
    assert made == ["cuda:1"] and g.initial_seed() == Streams(3).seed_for("noise", 2)
    s.generator("sampler")
    assert made == ["cuda:1", "cpu"]


FIXED_SIGMA = ("eps=null", "privacy.noise_multiplier=1.0")  # no σ calibration: these tests are about streams


@pytest.mark.slow
def test_secure_noise_is_a_deprecated_alias_of_secure(quick, caplog):
    """secure_noise=true maps to secure=true (sampler AND noise from the OS) with a warning; two secure runs with
    the same seed train different models, two seeded ones the same."""
    with caplog.at_level(logging.WARNING, logger="dptrain"):
        s, d = quick("privacy.secure_noise=true", "optimizer.lr=0.5", *FIXED_SIGMA)
    assert "privacy.secure_noise is deprecated" in caplog.text
    assert s["privacy/secure"] is True and s["privacy/streams"]["sampler"] == "os.urandom"
    a = torch.load(d / "model.pt")
    s, d = quick("privacy.secure=true", "optimizer.lr=0.5", *FIXED_SIGMA)
    b = torch.load(d / "model.pt")
    assert s["privacy/secure"] is True and any(not torch.equal(a[k], b[k]) for k in a)
    s, d = quick("optimizer.lr=0.5", *FIXED_SIGMA)
    assert s["privacy/secure"] is False and s["privacy/streams"]["sampler"].startswith("SeedSequence(0")
    c = torch.load(d / "model.pt")
    quick("optimizer.lr=0.5", *FIXED_SIGMA)
    assert all(torch.equal(c[k], v) for k, v in torch.load(d / "model.pt").items())


@pytest.mark.parametrize("override,message", [
    ("engine=opacus", "privacy.secure=true needs a built-in engine"),
    ("engine=nonprivate", "privacy.secure=true needs a private engine"),
    ("privacy.sampling=shuffle", "privacy.secure=true needs privacy.sampling=poisson"),
])
def test_secure_mode_refuses_what_it_cannot_secure(quick, override, message):
    with pytest.raises(UserError, match=message):
        quick("privacy.secure=true", override, *FIXED_SIGMA)
