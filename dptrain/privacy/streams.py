"""Every random stream of a run, derived from ONE seed (`Streams`) — or, in secure mode, the privacy-critical ones
drawn from the operating system's CSPRNG on every draw (`os_bernoulli`, `os_normal`).

KEYS are part of the reproducibility contract: never renumber one, only append. Model init, dropout,
augmentation and the data split stay seeded in secure mode: the guarantee does not rest on their secrecy, and
they stay reproducible."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

KEYS = {
    "model": 0,    # torch.manual_seed: weight init, dropout / drop-path (torch's global generators)
    "data": 1,     # synthetic data (dataset=fake)
    "split": 2,    # which training examples are held out as validation (dataset.val_fraction)
    "sampler": 3,  # Poisson (or shuffle) batch selection
    "noise": 4,    # DP noise of the built-in DPOptimizer; sub-key = the noise chunk (optimizer.CHUNKS ranges)
    "augment": 5,  # random crop / flip (dataset.augment, privacy.augmult)
    "opacus": 6,   # the Opacus baselines' noise generator
    "norm": 7,     # the noise of dataset.normalize=dp's statistics (data.py)
    "metrics": 8,  # the noise of the released training / validation metrics (ledger.py); sub-key: 0 train, 1 val
}
SECURE = ("sampler", "noise", "opacus", "norm", "metrics")  # from the OS in secure mode, never from a seed
MASK64 = (1 << 64) - 1


class Streams:
    """The random streams of one run: `seed_for(name, *sub)` (an int), `generator(name, *sub, device=)`.
    seed=None draws a fresh root seed from the OS (recorded in `.seed`, so the run can be repeated).

    Stream NAME gets `numpy.random.SeedSequence(seed, spawn_key=(KEYS[NAME], *sub))` (= SeedSequence(seed).spawn
    (...)[KEY]), whose 64-bit output seeds a torch.Generator. SeedSequence hashes (entropy, spawn key) into its pool,
    so two keys give unrelated seeds for every seed (a collision is a ~2**-63 event per pair), and stream k of seed a
    is unrelated to stream j of seed b (no `seed + 1` arithmetic across runs). So the noise is never a function of
    the uniforms that chose the batch it is meant to hide, as it would be with seeds like `seed` and `seed*1000 + i`.

    torch's CPU generator (mt19937) keeps only the LOW 32 BITS of a seed (manual_seed(1) and manual_seed(1 + 2**32)
    draw the same numbers); CUDA's Philox keeps all 64. So a Streams object refuses to hand out two streams whose
    low 32 bits coincide (a ~2**-32 event per pair; tests check seeds 0..999 for every stream).

    Secure mode (`secure=True`, config `privacy.secure`): the SECURE streams — the Poisson inclusion mask and the
    Gaussian noise — come from `os.urandom` (getrandom(2): the kernel's ChaCha20 CSPRNG) on every draw;
    `seed_for`/`generator` refuse to seed them. A torch generator re-seeded from os.urandom would not do: mt19937 is
    not a CSPRNG and its CPU seed is 32 bits, so the noise would be one of 2**32 sequences. Opacus' secure_mode gets
    its bits from torchcsprng's /dev/urandom generator (unmaintained; no build for this torch): reading os.urandom
    directly is the same entropy source without the dependency."""

    def __init__(self, seed: int | None = 0, *, secure: bool = False):
        if seed is None:
            seed = int(np.random.SeedSequence().entropy)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed, self.secure = int(seed), bool(secure)
        self._issued: dict[int, tuple] = {}  # low 32 bits → stream key (torch CPU generators keep only those)

    def seed_for(self, name: str, *sub: int) -> int:
        if name not in KEYS:
            raise KeyError(f"unknown random stream '{name}'; valid: {', '.join(KEYS)}")
        if self.secure and name in SECURE:
            raise RuntimeError(f"stream '{name}' draws from the OS in secure mode (os_bernoulli / os_normal), "
                               "never from a seed")
        key = (KEYS[name], *(int(s) for s in sub))
        s = int(np.random.SeedSequence(self.seed, spawn_key=key).generate_state(1, np.uint64)[0]) >> 1  # < 2**63
        low = s & 0xFFFFFFFF
        if self._issued.setdefault(low, key) != key:
            raise RuntimeError(f"seed={self.seed}: random streams {self._issued[low]} and {key} coincide in the "
                               "32 bits torch's CPU generator keeps; use another seed")
        return s

    def generator(self, name: str, *sub: int, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed_for(name, *sub))

    def describe(self) -> dict[str, str]:
        """Where each stream comes from, for summary.json."""
        sub = {"noise": " chunk", "metrics": " 0 train | 1 val, step"}  # sub-streams: per noise chunk, per release
        return {name: "os.urandom" if self.secure and name in SECURE
                else f"SeedSequence({self.seed}, spawn_key=({k},{sub.get(name, '')}))" for name, k in KEYS.items()}

    def summary(self) -> dict:
        return {"privacy/secure": self.secure, "privacy/streams": self.describe()}


def os_bernoulli(n: int, p: float) -> torch.Tensor:
    """n independent Bernoulli(p') from os.urandom, p' = floor(p·2**64)/2**64 ∈ (p - 2**-64, p]: an example is
    included iff a uniform 64-bit integer is < floor(p·2**64), so the realised rate is ≤ p and the accountant's q
    stays an upper bound. 8 bytes of OS entropy per example and step. (n,) bool."""
    if p >= 1:
        return torch.ones(n, dtype=torch.bool)
    threshold = np.uint64(math.floor(max(p, 0.0) * 2.0**64))  # exact: p is a double, 2**64 a power of two
    bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return torch.from_numpy(bits < threshold)


def os_normal(n: int) -> torch.Tensor:
    """n draws of N(0, 1) from os.urandom, (n,) float64 on the CPU. As in Opacus' secure_mode, each is the sum of
    four N(0, 1) draws halved (Holohan & Braghin 2021, §5.1: the floating-point attack on Gaussian samplers of
    Jin et al. 2022 then costs ~2**159 instead of ~2**53). The normals are Box–Muller in float64 from 53-bit
    uniforms: a draw is bounded by 8.6 (σ units, before the four-sum), a truncation of probability ~1e-17.
    32 bytes of OS entropy per value: far slower than seeded noise, a deployment setting, not an experiment one."""
    m = 4 * n  # normals, made in Box–Muller pairs
    k = (m + 1) // 2
    u = (np.frombuffer(os.urandom(16 * k), dtype=np.uint64) >> np.uint64(11)).astype(np.float64)
    u *= 2.0**-53  # 53-bit uniforms on [0, 1)
    r = np.sqrt(-2.0 * np.log1p(-u[:k]))  # 1 - u ∈ (0, 1]: finite
    t = (2.0 * np.pi) * u[k:]
    z = np.concatenate([r * np.cos(t), r * np.sin(t)])[:m]
    return torch.from_numpy(z.reshape(4, n).sum(0) * 0.5)
