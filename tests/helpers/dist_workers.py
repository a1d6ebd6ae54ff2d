"""Scenarios for test_distributed.py, each run on 1 process (the reference) and on 2 gloo processes.

A scenario trains a tiny model for a few logical batches through the real path — create_engine(..., dist=),
Dist.shard, loop.train_one_epoch — and returns what it observed (the update, the batches each rank saw); the
test compares the 2-rank results with the 1-process ones and with the formula (the noise's std σR/L).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn
from torch.utils.data import TensorDataset

from dptrain.engines import create_engine
from dptrain.privacy.sampling import PoissonSampler
from dptrain.privacy.streams import Streams
from dptrain.train.distributed import SINGLE, Dist
from dptrain.train.loop import train_one_epoch

N = 12  # training examples


def _data(dtype) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 1, 8, 8, generator=g, dtype=dtype)
    x[::3] *= 6  # a few large inputs: clipped examples next to unclipped ones
    return TensorDataset(x, torch.randint(0, 3, (N,), generator=g))


def _model(wide: bool, dtype) -> nn.Module:
    torch.manual_seed(0)
    if wide:  # 102 400 weights: the noise's std is measured to ±0.5%
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 1600, bias=False)).to(dtype)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3)).to(dtype)


def scenario(dist: Dist, *, engine: str, batches: list | str, sigma: float, R: float = 1.0, L: int = 4,
             passes: int = 1, wide: bool = False, secure: bool = False, dtype=torch.float64) -> dict:
    """Train on `batches` (index lists, or "poisson": 3 Poisson batches at q = 0.3 from the run's stream) with
    SGD(lr=1) and return {"update": θ0 - θ (flat, float64), "seen": the examples this rank trained on}."""
    ds, model = _data(dtype), _model(wide, dtype)
    dist.broadcast_module(model)
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    streams = Streams(0, secure=secure)
    eng = create_engine(engine, model, opt, noise_multiplier=sigma, max_grad_norm=R, expected_batch_size=L,
                        streams=streams, passes=passes, dist=dist)
    if batches == "poisson":
        logical = list(dist.shard(PoissonSampler(N, sample_rate=0.3, steps=3, streams=streams)))
    else:
        logical = [torch.tensor(b, dtype=torch.long)[dist.rank :: dist.world_size] for b in batches]
    train_one_epoch(eng, ds, logical, physical_batch_size=2, device=torch.device("cpu"))
    after = torch.cat([p.detach().flatten() for p in eng.detach().parameters()]).double()
    return {"update": before - after, "seen": [b.tolist() for b in logical]}


# name → scenario keywords: test_distributed.py runs each on 1 process and on 2
SCENARIOS = {
    # the 2-rank clipped sum equals the 1-process one (σ = 0), both pass modes; Poisson batches through Sharded
    "sum_mixed_ghost": dict(engine="mixed_ghost", batches="poisson", sigma=0.0, R=1.0),
    "sum_ghost_2pass": dict(engine="ghost", batches="poisson", sigma=0.0, R=1.0, passes=2),
    "sum_per_sample": dict(engine="per_sample", batches=[list(range(N))], sigma=0.0, R=1.0),
    # with noise: the same update as 1 process, noise included (the ranks draw the 1-process run's noise chunks)
    "noisy_mixed_ghost": dict(engine="mixed_ghost", batches="poisson", sigma=0.7, R=1.0),
    # a step where rank 1's local batch is empty ([5]: rank 0 takes it), then one where both are
    "empty_mixed_ghost": dict(engine="mixed_ghost", batches=[[5], [], [2, 7, 9]], sigma=0.5),
    "empty_opacus": dict(engine="opacus", batches=[[5], [], [2, 7, 9]], sigma=0.5, dtype=torch.float32),
    "empty_opacus_ghost": dict(engine="opacus_ghost", batches=[[5], [], [2, 7, 9]], sigma=0.5, dtype=torch.float32),
    "nonprivate": dict(engine="nonprivate", batches=[list(range(N)), [1, 4, 6, 10, 11]], sigma=0.0),
    # the noise of one step: its std must be σR/L (not √2 more or less); one rank has data (σ ≫ the clipped sum)
    "std_mixed_ghost": dict(engine="mixed_ghost", batches=[[5]], sigma=50.0, L=4, wide=True, dtype=torch.float32),
    "std_mixed_ghost_empty": dict(engine="mixed_ghost", batches=[[]], sigma=1.0, L=4, wide=True,
                                  dtype=torch.float32),
    "std_secure": dict(engine="mixed_ghost", batches=[[5, 8]], sigma=50.0, L=4, wide=True, secure=True,
                       dtype=torch.float32),
    "std_opacus": dict(engine="opacus", batches=[[5, 8]], sigma=50.0, L=4, wide=True, dtype=torch.float32),
    "std_opacus_empty": dict(engine="opacus", batches=[[]], sigma=1.0, L=4, wide=True, dtype=torch.float32),
    # secure mode: rank 0's OS-drawn mask, broadcast — the ranks' shards partition one batch
    "secure_sampling": dict(engine="mixed_ghost", batches="poisson", sigma=1.0, secure=True),
}


def reference(name: str) -> dict:
    return scenario(SINGLE, **SCENARIOS[name])


def worker(rank: int, world: int, port: int, out_dir: str, names: list[str]) -> None:
    """One of `world` gloo processes (torch.multiprocessing.start_processes): every scenario in `names`."""
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    dist = Dist(rank=rank, world_size=world, local_rank=rank, backend="gloo")
    try:
        torch.save({name: scenario(dist, **SCENARIOS[name]) for name in names}, f"{out_dir}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def resume_worker(rank: int, world: int, port: int, out_dir: str, overrides: list[str]) -> None:
    """One of `world` gloo processes running dptrain's run() three times: uninterrupted (out_dir/ref); killed
    (in-process: a BaseException on every rank) after its 6th step, with a checkpoint after every step
    (out_dir/run; rank 0 keeps a copy of it as out_dir/killed); resumed from that checkpoint (resume=out_dir/run)."""
    import shutil

    import torch.distributed as tdist

    from dptrain.train.run import run
    from helpers.runs import EVERY_STEP, Killed, compose, dies_at

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    dist = Dist(rank=rank, world_size=world, local_rank=rank, backend="gloo")
    d = f"{out_dir}/run"
    try:
        run(compose(*overrides), f"{out_dir}/ref", dist=dist)
        with contextlib.suppress(Killed), dies_at(6):  # after step 6, before anything of it is saved
            run(compose(*overrides, EVERY_STEP), d, dist=dist)
        tdist.barrier()
        if dist.is_main:
            shutil.copytree(d, f"{out_dir}/killed")
        run(compose(*overrides, EVERY_STEP, f"resume={d}"), d, dist=dist)
    finally:
        tdist.destroy_process_group()
