"""Data-parallel DP training on N processes under torchrun (gloo on CPU, NCCL on CUDA), one node or several:

    torchrun --nproc_per_node=2 -m dptrain <the same overrides as one process>

One `Dist` is passed around (`SINGLE` in one process: every method a no-op, one code path). Who keeps what:
sampling, `Sharded` (one shared Poisson mask, this rank's strided shard); the clipped sums and the noise,
privacy/optimizer.DPOptimizer (each noise chunk drawn by one rank, one all-reduce, ÷ L); the Opacus baselines,
Opacus' DPDDP (engines/opacus.py); nonprivate, torch's DDP (`ddp`). Rank 0 owns the run directory, the accountant
and the evaluation; the other ranks agree on its directory (`agree`) and write nothing there (`worker_overrides`);
checkpoints gather every rank's own streams to rank 0 (checkpoint.py)."""

from __future__ import annotations

import atexit
import contextlib
import inspect
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from dptrain.errors import UserError
from dptrain.privacy.sampling import BatchSampler

log = logging.getLogger("dptrain")
BUCKET = 1 << 24  # elements per all-reduce buffer (64 MB of fp32): large messages, bounded extra memory


@torch.no_grad()
def fingerprint(module: torch.nn.Module) -> torch.Tensor:
    """One float64 sum per parameter tensor (on the CPU): equal replicas give equal fingerprints."""
    return torch.stack([p.detach().double().sum() for p in module.parameters()]).cpu()


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes. `SINGLE` (world_size 1): every method a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # gloo, nccl; None in one process

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where collective buffers live: NCCL needs them on this rank's GPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    @property
    def substream(self) -> tuple[int, ...]:
        """The sub-key of a per-rank random stream (augmentation, dropout): () in one process, so a 1-process
        run keeps its streams; (rank,) on N, so ranks do not draw the same crops and masks for their shards."""
        return (self.rank,) if self.enabled else ()

    def place(self, device: torch.device) -> torch.device:
        """The run's device for this rank: cuda → cuda:<local rank>."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def describe(self, device: torch.device) -> str:
        """summary.json's `device`: 'cpu', or 'cpu x2 (gloo)' for two processes."""
        return str(device) if not self.enabled else f"{device.type} x{self.world_size} ({self.backend})"

    # --- agreeing on rank 0's values --------------------------------------------------------------------------

    def agree(self, obj):
        """Rank 0's `obj` on every rank (e.g. its run directory, whose name has a timestamp)."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0, device=self.comm_device)
        return box[0]

    def from_rank0(self, fn):
        """fn() computed on rank 0 only (the accountant, the summary), its value — or its exception, raised on
        every rank, so that an error is one clean exit everywhere rather than a hang — on every rank."""
        if not self.enabled:
            return fn()
        box = [None]
        if self.is_main:
            try:
                box[0] = (True, fn())
            except Exception as e:  # noqa: BLE001 — re-raised below, on every rank
                box[0] = (False, e)
        tdist.broadcast_object_list(box, src=0, device=self.comm_device)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def decide(self, *values: int) -> list[int]:
        """Rank 0's small integers on every rank: one broadcast of a few bytes (a decision only rank 0 can take,
        such as "the checkpoint interval has passed" by its clock, which every rank must then act on together)."""
        if not self.enabled:
            return [int(v) for v in values]
        t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=self.comm_device)
        tdist.broadcast(t, src=0)
        return [int(v) for v in t.tolist()]

    def gather(self, obj) -> list | None:
        """Every rank's `obj` (picklable), as a list by rank on rank 0; None on the others. One process: [obj]."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        tdist.gather_object(obj, out, dst=0)
        return out

    def check_same(self, text: str, what: str) -> None:
        """Every rank must run the same command: a multi-node launch with different overrides on one node would
        otherwise train on mismatched batches, silently."""
        ref = self.agree(text)
        if ref != text:
            raise UserError(f"rank {self.rank}: its {what} differs from rank 0's; launch every node with the same "
                            "command and overrides")

    @contextlib.contextmanager
    def rank0_first(self):
        """Rank 0 runs the block first (a dataset download), then each node's local rank 0, then the rest."""
        if not self.enabled:
            yield
            return
        phase = 0 if self.is_main else 1 if self.local_rank == 0 else 2
        for p in range(3):
            if p == phase:
                yield
            tdist.barrier()

    # --- tensors ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (identical already when seeded alike; made certain)."""
        if not self.enabled:
            return
        tensors = [t for t in (*module.parameters(), *module.buffers())]
        for bucket in _buckets(tensors):
            flat = self._flat(bucket)
            tdist.broadcast(flat, src=0)
            self._unflat(flat, bucket)

    @torch.no_grad()
    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """tensors ← their sum over the ranks, in place (flat buckets: few large messages). Every rank must call
        it with tensors of the same shapes in the same order — DPOptimizer passes every trainable parameter's
        .grad (zeros on a rank whose local batch was empty)."""
        if not self.enabled:
            return
        for bucket in _buckets(tensors):
            flat = self._flat(bucket)
            tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
            self._unflat(flat, bucket)

    def sum(self, *values: float) -> list[float]:
        """Python numbers summed over the ranks (examples seen, summed losses)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t.tolist()

    @torch.no_grad()
    def check_replicas(self, module: torch.nn.Module) -> None:
        """After training: every rank took the same steps from the same all-reduced gradients, so every rank's
        weights must equal rank 0's. A difference means the ranks desynchronised — an error, not a warning."""
        if not self.enabled:
            return
        mine = fingerprint(module).to(self.comm_device)
        ref = mine.clone()
        tdist.broadcast(ref, src=0)
        if not torch.equal(mine, ref):
            bad = int((mine != ref).nonzero()[0])
            raise RuntimeError(f"rank {self.rank}: parameter {bad} differs from rank 0's after training (the ranks "
                               "desynchronised)")

    def shard(self, sampler: BatchSampler) -> Sharded:
        return Sharded(sampler, self)

    def _flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in tensors])

    @staticmethod
    def _unflat(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        i = 0
        for t in tensors:
            t.copy_(flat[i : i + t.numel()].view_as(t))
            i += t.numel()


SINGLE = Dist()


def _buckets(tensors: list[torch.Tensor], size: int = BUCKET):
    """Consecutive runs of tensors of one dtype and device, up to `size` elements each (a larger tensor alone)."""
    bucket, n = [], 0
    for t in tensors:
        if bucket and (n + t.numel() > size or t.dtype != bucket[0].dtype or t.device != bucket[0].device):
            yield bucket
            bucket, n = [], 0
        bucket.append(t)
        n += t.numel()
    if bucket:
        yield bucket


class Sharded:
    """A BatchSampler (privacy/sampling.py) of this rank's part of every logical batch: the same batch on every
    rank, then `batch[rank::world]` — possibly empty; the loop still calls engine.step() for it.

    Why one shared mask rather than disjoint partitions each sampled at rate q (also exact Poisson): the logical
    batch is then exactly the one the 1-process run of the same command draws (tests/train/test_distributed.py compares
    them), and the strided shard balances the ranks to ±1 example where disjoint partitions give Binomial-sized
    local batches. The cost: every rank draws n uniforms per step."""

    def __init__(self, sampler: BatchSampler, dist: Dist):
        self.sampler, self.dist = sampler, dist
        self.n = sampler.n
        # secure mode: OS entropy differs per rank, so rank 0 draws the mask and broadcasts it
        self.broadcast = dist.enabled and getattr(sampler, "secure", False)

    @property
    def generator(self) -> torch.Generator | None:
        """The shared sampler stream (the same state on every rank; None in secure mode): what a resumed run
        redraws up to its checkpoint's epoch. Absent (AttributeError) when the wrapped sampler has none."""
        return None if self.broadcast else self.sampler.generator

    def __iter__(self):
        d = self.dist
        it = iter(self.sampler) if d.is_main or not self.broadcast else None
        for _ in range(len(self.sampler)):
            idx = next(it) if it is not None else None
            if self.broadcast:
                mask = torch.zeros(self.n, dtype=torch.uint8, device=d.comm_device)
                if d.is_main:
                    mask[idx.to(d.comm_device)] = 1
                tdist.broadcast(mask, src=0)
                idx = mask.nonzero().flatten().cpu()
            yield idx[d.rank :: d.world_size]

    def __len__(self):
        return len(self.sampler)


def init(device: str = "auto") -> Dist:
    """The process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), once per
    process (a Hydra multirun under torchrun reuses it); `SINGLE` when not launched by torchrun or with one
    process. Backend: NCCL when the run is on CUDA, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda else "gloo"
    if not tdist.is_initialized():
        if cuda:
            if local_rank >= torch.cuda.device_count():
                raise UserError(f"local rank {local_rank} but {torch.cuda.device_count()} CUDA device(s) on this "
                                "node: use --nproc_per_node <= the GPU count, or device=cpu")
            torch.cuda.set_device(local_rank)
        tdist.init_process_group(backend=backend)
        atexit.register(_destroy)
        if rank != 0:
            logging.getLogger("dptrain").setLevel(logging.WARNING)  # rank 0 tells the story once
    return Dist(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def _destroy() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def worker_overrides(environ=os.environ) -> list[str]:
    """Hydra overrides for a rank > 0 under torchrun: its run/sweep directory (whose name has a timestamp that
    can differ from rank 0's) and its .hydra/ files go to a temporary directory, removed at exit, so nothing of
    it lands in rank 0's outputs/ or multirun/ tree. Empty for rank 0 and for one process."""
    if int(environ.get("WORLD_SIZE", "1")) <= 1 or int(environ.get("RANK", "0")) == 0:
        return []
    tmp = tempfile.mkdtemp(prefix=f"dptrain-rank{environ['RANK']}-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return [f"hydra.run.dir={tmp}", f"hydra.sweep.dir={tmp}", "hydra.output_subdir=null",
            "hydra/hydra_logging=disabled"]  # Hydra's "Launching N jobs" lines once, from rank 0


def ddp(model: torch.nn.Module, dist: Dist, *, expected_batch_size: int) -> torch.nn.Module:
    """engine=nonprivate on N processes: torch's DistributedDataParallel. Its reducer all-reduces in a backward
    every rank runs: with fixed-size (shuffle) batches of L >= world examples every rank has >= 1 example per
    logical batch. The all-reduce sums (DDP's default averages over ranks), so the engine's ÷ L stays right.
    No buffer sync (no_buffer_sync): a buffer broadcast in every forward would be a collective per physical batch, and
    shards of different sizes can have different numbers of physical batches (BatchNorm is converted anyway)."""
    if expected_batch_size < dist.world_size:
        raise UserError(f"batch_size={expected_batch_size} must be >= the number of processes ({dist.world_size})")
    on_cuda = next(model.parameters()).device.type == "cuda"
    wrapped = DistributedDataParallel(model, device_ids=[dist.local_rank] if on_cuda else None,
                                      **no_buffer_sync(DistributedDataParallel))
    wrapped.register_comm_hook(None, _sum_hook)
    return wrapped


def no_buffer_sync(ddp_class) -> dict:
    """DDP's keyword that turns off the buffer broadcast in every forward, by feature check: forward_sync_buffers
    (torch >= 2.13, where it replaces broadcast_buffers), else broadcast_buffers (torch 2.11-2.12 have only it)."""
    params = inspect.signature(ddp_class.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _sum_hook(_, bucket):
    fut = tdist.all_reduce(bucket.buffer(), op=tdist.ReduceOp.SUM, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])
