"""Poisson subsampling (what the accountants assume) and logical → physical batches.

Each step includes every example independently with probability q = L/n; the logical batch has a
random size (mean L, variance n·q·(1-q)), possibly zero, and is processed in physical batches of at most
`physical_batch_size` — memory only: the update depends on the logical batch alone.
"""

from __future__ import annotations

import torch


class PoissonSampler:
    def __init__(self, n: int, *, sample_rate: float, steps: int, seed: int = 0):
        self.n, self.sample_rate, self.steps = n, float(sample_rate), int(steps)
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        for _ in range(self.steps):
            mask = torch.rand(self.n, generator=self.generator) < self.sample_rate
            yield mask.nonzero().flatten()

    def __len__(self):
        return self.steps


class ShuffleSampler:
    """Fixed-size batches of a random permutation: NOT what the DP accountants assume (non-private runs,
    or explicitly labelled experiments whose ε is then not guaranteed)."""

    def __init__(self, n: int, *, batch_size: int, steps: int, seed: int = 0):
        self.n, self.batch_size, self.steps = n, batch_size, steps
        self.generator = torch.Generator().manual_seed(seed)

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
