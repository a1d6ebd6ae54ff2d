"""Noise and averaging, once per logical batch (DP-SGD, Abadi et al. 2016, Alg. 1)."""

from __future__ import annotations

import os

import torch


class DPOptimizer:
    """Wraps a torch optimizer. `step()` adds N(0, σ²R²) to every trainable parameter's summed clipped
    gradient (zeros where no example touched it, e.g. an empty Poisson batch), divides by the *expected*
    logical batch size L (not the realised one: the sensitivity of the average is R/L only then),
    steps, and zeroes the gradients. Call it once per logical batch, after all its physical batches.

    The generator is seeded (reproducible experiments) unless `secure=True`, which seeds it from OS
    entropy for deployments.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: int, seed: int | None = None, secure: bool = False):
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if expected_batch_size <= 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        self.optimizer = optimizer
        self.noise_multiplier, self.max_grad_norm = float(noise_multiplier), float(max_grad_norm)
        self.expected_batch_size = int(expected_batch_size)
        self.secure = secure
        self.seed = int.from_bytes(os.urandom(8), "little") >> 1 if secure or seed is None else seed
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    @torch.no_grad()
    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if std > 0:
                    noise = torch.randn(p.shape, generator=self._generator(p.device), device=p.device,
                                        dtype=p.dtype)
                    p.grad.add_(noise, alpha=std)
                p.grad.div_(self.expected_batch_size)

    def step(self) -> None:
        self.add_noise()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()
