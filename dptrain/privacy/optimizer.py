"""Noise and averaging, once per logical batch (DP-SGD, Abadi et al. 2016, Alg. 1)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.autograd.profiler import record_function

from .errors import CoverageError
from .streams import Streams, os_normal

# The noise for the flat vector of all gradients is split into CHUNKS fixed ranges, each with its own
# generator (sub-stream `chunk` of the "noise" stream, streams.py), so the draw does not depend on the thread
# count. On CPU the ranges fill in parallel threads (normal_ and os.urandom release the GIL). Each range is drawn
# through a small scratch buffer straight into the gradients, so no parameter-sized noise tensor exists (a
# model-sized share of the extra memory), and the scratch stays in cache while it is added.
CHUNKS = 8
SCRATCH = {"cpu": 1 << 18}  # elements per draw; other devices: 1 << 22 (fewer kernel launches)
_POOL = ThreadPoolExecutor(max_workers=max(1, min(CHUNKS, os.cpu_count() or 1)))


class DPOptimizer:
    """Wraps a torch optimizer. `step()` adds N(0, σ²R²) to every trainable parameter's summed clipped
    gradient (zeros where no example touched it, e.g. an empty Poisson batch), divides by the *expected*
    logical batch size L (not the realised one: the sensitivity of the average is R/L only then),
    steps, and zeroes the gradients. Call it once per logical batch, after all its physical batches.

    The noise comes from `streams` ("noise" stream, one sub-stream per chunk; default Streams(seed, secure)):
    seeded generators (reproducible experiments; seed=None: a fresh root seed), or in secure mode OS entropy
    on every draw (streams.os_normal) for deployments.

    Data-parallel (`dist`: an object with `rank`, `world_size` and `all_reduce_sum_(tensors)`, distributed.py;
    None in one process): each rank's .grad holds the clipped sum of its shard of the logical batch. The noise is
    partitioned, not replicated: noise chunk i (a fixed range of the flat gradient, with its own sub-stream) is
    drawn by rank i mod world ALONE and added to that rank's .grad (zeros elsewhere in the range on the other
    ranks); then one all-reduce sums the ranks' gradients: Σ_i c_i·g_i + N(0, σ²R²), every coordinate's noise
    drawn exactly once — the very draws of a 1-process run of the same seed, since a chunk's stream does not
    depend on who draws it — and the same result on every rank; then ÷ L. Each rank draws 1/world of the
    noise, so no rank waits for one rank's noise. Every rank calls step() for every logical batch, also when its
    shard was empty: the all-reduce is collective.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: int, seed: int | None = None, secure: bool = False,
                 streams: Streams | None = None, dist=None):
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if expected_batch_size <= 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        self.optimizer = optimizer
        self.noise_multiplier, self.max_grad_norm = float(noise_multiplier), float(max_grad_norm)
        self.expected_batch_size = int(expected_batch_size)
        self.streams = streams if streams is not None else Streams(seed, secure=secure)
        self.secure = self.streams.secure
        self._gens: dict[str, list[torch.Generator]] = {}
        self.dist = dist if dist is not None and dist.world_size > 1 else None
        # the noise chunks this process draws: all of them in one process; rank r of N: those with i mod N = r
        rank, world = (0, 1) if self.dist is None else (self.dist.rank, self.dist.world_size)
        self.noise_chunks = [i for i in range(CHUNKS) if i % world == rank]

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def _generators(self, device: torch.device) -> list[torch.Generator]:
        key = str(device)
        if key not in self._gens:
            self._gens[key] = [self.streams.generator("noise", i, device=device) for i in range(CHUNKS)]
        return self._gens[key]

    def _add_noise(self, grads: list[torch.Tensor], std: float) -> None:
        """grads += std · N(0, I) on this process's chunks (`noise_chunks`) of their flat concatenation (CHUNKS)."""
        device = grads[0].device
        flat = [g.view(-1) for g in grads]
        starts, total = [], 0
        for f in flat:
            starts.append(total)
            total += f.numel()
        gens = None if self.secure else self._generators(device)
        size = SCRATCH.get(device.type, 1 << 22)
        if self.secure:  # host-side OS entropy, 32 bytes per value: keep the float64 temporaries small
            size = min(size, SCRATCH["cpu"])

        def fill(i: int) -> None:
            lo, hi = total * i // CHUNKS, total * (i + 1) // CHUNKS
            scratch = torch.empty(min(size, max(hi - lo, 1)), device=device, dtype=grads[0].dtype)
            for f, s in zip(flat, starts):
                a, b = max(lo, s), min(hi, s + f.numel())
                for j in range(a, b, size):  # this parameter's part of range i, one scratch at a time
                    n = min(size, b - j)
                    z = scratch[:n].copy_(os_normal(n)) if gens is None else scratch[:n].normal_(generator=gens[i])
                    f[j - s : j - s + n].add_(z, alpha=std)

        if device.type == "cpu":
            list(_POOL.map(fill, self.noise_chunks))
        else:
            for i in self.noise_chunks:
                fill(i)

    @torch.no_grad()
    def add_noise(self) -> None:
        """grad ← (grad + σR·N(0, I)) / L for every trainable parameter (zeros where grad is None); data-parallel:
        grad ← (Σ_ranks grad + σR·N(0, I)) / L, each noise chunk added by one rank before the one all-reduce."""
        std = self.noise_multiplier * self.max_grad_norm
        groups: dict[tuple, list[torch.Tensor]] = {}
        for g, group in enumerate(self.optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                if not p.requires_grad and p.grad is not None:
                    # noise goes to the trainable parameters; the inner optimizer would step this one with its
                    # clipped sum alone
                    raise CoverageError(
                        f"parameter {i} of param group {g} (shape {tuple(p.shape)}) has a gradient but "
                        "requires_grad=False, so it would be stepped with no noise; freeze parameters before the "
                        "forward, or set its .grad to None")
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    elif not p.grad.is_contiguous():  # the flat view below must write into the gradient itself
                        p.grad = p.grad.contiguous()
                    groups.setdefault((p.device, p.dtype), []).append(p.grad)
        for grads in groups.values():
            if std > 0 and self.noise_chunks:
                with record_function("dptrain::noise"):
                    self._add_noise(grads, std)
            if self.dist is not None:
                with record_function("dptrain::all_reduce"):
                    self.dist.all_reduce_sum_(grads)
            torch._foreach_div_(grads, float(self.expected_batch_size))

    def step(self) -> None:
        self.add_noise()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()

    def generator_states(self) -> dict[str, list[torch.Tensor]]:
        """Each noise chunk generator's state, by device (a checkpoint's; none in secure mode: OS entropy)."""
        return {device: [g.get_state() for g in gens] for device, gens in self._gens.items()}

    def set_generator_states(self, states: dict[str, list[torch.Tensor]]) -> None:
        here = {str(p.device) for g in self.param_groups for p in g["params"]}
        for device in states.keys() - here:  # _generators() would start fresh streams on `here`'s devices
            raise ValueError(f"noise generator states saved on {device}, but the parameters are on "
                             f"{', '.join(sorted(here))}: a noise stream does not carry across devices")
        for device, chunks in states.items():
            for g, state in zip(self._generators(torch.device(device)), chunks, strict=True):
                g.set_state(state)
