"""Poisson subsampling (what the accountants assume) and logical → physical batches.

Each step includes every example independently with probability q = L/n; the logical batch has a
random size (mean L, variance n·q·(1-q)), possibly zero, and is processed in physical batches of at most
`physical_batch_size` — memory only: the update depends on the logical batch alone.

Randomness: the "sampler" stream of `streams` (streams.py), or OS entropy on every step in secure mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from .streams import Streams, os_bernoulli


class BatchSampler(Protocol):
    """What the training loop asks of a batch sampler: `len()` logical batches, each a 1-d index tensor (possibly
    empty), in the order of the run's steps. `n`: the examples it samples from. `generator`: the seeded stream its
    batches come from, whose state after k batches is a function of the seed alone — a resumed run redraws the
    batches up to its checkpoint from it (checkpoint.py); None when the draws cannot be replayed (secure mode: OS
    entropy). PoissonSampler and ShuffleSampler keep it; distributed.Sharded is one over either."""

    n: int
    generator: torch.Generator | None

    def __iter__(self) -> Iterator[torch.Tensor]: ...

    def __len__(self) -> int: ...


class PoissonSampler:
    def __init__(self, n: int, *, sample_rate: float, steps: int, seed: int = 0, streams: Streams | None = None):
        self.n, self.sample_rate, self.steps = n, float(sample_rate), int(steps)
        self.streams = streams if streams is not None else Streams(seed)
        self.secure = self.streams.secure
        self.generator = None if self.secure else self.streams.generator("sampler")

    def __iter__(self):
        for _ in range(self.steps):
            if self.secure:
                mask = os_bernoulli(self.n, self.sample_rate)
            else:  # float64 uniforms: float32's 2**-24 grid puts P(u < q) up to 6e-8 above q
                mask = torch.rand(self.n, generator=self.generator, dtype=torch.float64) < self.sample_rate
            yield mask.nonzero().flatten()

    def __len__(self):
        return self.steps


class ShuffleSampler:
    """Fixed-size batches of a random permutation: NOT what the DP accountants assume (non-private runs,
    or explicitly labelled experiments whose ε is then not guaranteed)."""

    def __init__(self, n: int, *, batch_size: int, steps: int, seed: int = 0, streams: Streams | None = None):
        self.n, self.batch_size, self.steps = n, batch_size, steps
        streams = streams if streams is not None else Streams(seed)
        if streams.secure:
            raise ValueError("secure mode needs Poisson sampling: shuffled batches are not what the accountant "
                             "assumes, so there is no guarantee to secure")
        self.generator = streams.generator("sampler")

    def __iter__(self):
        perm = torch.empty(0, dtype=torch.long)
        for _ in range(self.steps):
            if len(perm) < self.batch_size:
                perm = torch.cat([perm, torch.randperm(self.n, generator=self.generator)])
            yield perm[: self.batch_size]
            perm = perm[self.batch_size :]

    def __len__(self):
        return self.steps


def physical(indices: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Split one logical batch into physical batches of at most `size` (none for an empty batch)."""
    return list(torch.split(indices, size)) if len(indices) else []
