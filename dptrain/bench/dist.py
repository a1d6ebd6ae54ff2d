"""`dptrain-bench --processes 1 2 …`: samples/s of one data-parallel DP step on 1 vs N processes.

A fixed GLOBAL batch B is split over N processes (B/N each, the way torchrun -m dptrain splits a logical
batch); each process runs forward + engine.backward + engine.step() — the one all-reduce of the clipped sums,
noise on rank 0, ÷ L, optimizer step — on gloo (CPU) or NCCL (one GPU per process). The machine's cores are
split between the processes (cores // N threads each: what torchrun's OMP_NUM_THREADS=1 does on a 2-core box),
so the comparison is "the same machine, as 1 process or as N". Reported: rank 0's median step, samples/s = B
over it, the speed-up over 1 process, and the median time of one all-reduce of the model's gradients alone
(comm_ms: what the N-process step pays on top of its share of the compute).
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile
import time

import pandas as pd
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from dptrain.bench.speed import out_prefix
from dptrain.bench.steps import build, one_step
from dptrain.train.distributed import Dist
from dptrain.train.outputs import git_commit, machine


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: tuple, out: str) -> None:
    model_name, size, batch, engine, device_name, steps, threads = args
    torch.set_num_threads(threads)
    dist, device = Dist(), torch.device(device_name)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        tdist.init_process_group(backend, rank=rank, world_size=world)
        dist = Dist(rank=rank, world_size=world, local_rank=rank, backend=backend)
    local = batch // world + (rank < batch % world)  # batch[rank::world]
    eng, x, y = build(model_name, size, engine, max(local, 1), device, dist=dist, expected_batch_size=batch)
    x, y = x[:local], y[:local]
    times = []
    for i in range(steps + 2):  # 2 warm-up steps
        dist.sum(0.0)  # a barrier: every rank starts the step together
        t = one_step(eng, x, y, device) if local else _empty_step(eng)
        if i >= 2:
            times.append(t)
    grads = [p for p in eng.detach().parameters() if p.requires_grad]
    comm = []
    for _ in range(5 if world > 1 else 0):
        bufs = [torch.zeros_like(p) for p in grads]
        dist.sum(0.0)
        t0 = time.perf_counter()
        dist.all_reduce_sum_(bufs)
        comm.append(time.perf_counter() - t0)
    if rank == 0:
        torch.save({"step_s": statistics.median(times), "comm_s": statistics.median(comm) if comm else 0.0}, out)
    if world > 1:
        tdist.destroy_process_group()


def _empty_step(eng) -> float:
    t = time.perf_counter()
    eng.step()
    return time.perf_counter() - t


def measure(model_name: str, size: int, batch: int, engine: str, device: str, processes: int, steps: int,
            threads: int | None = None) -> dict:
    """One configuration on `processes` processes (spawned: a fresh interpreter each), `threads` each (default:
    the cores split between them)."""
    threads = threads or max(1, (os.cpu_count() or 1) // processes)
    if device.startswith("cuda") and processes > torch.cuda.device_count():
        raise SystemExit(f"--processes {processes} on CUDA needs {processes} GPUs (one per process); "
                         f"this machine has {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.start_processes(_worker, args=(processes, _port(), (model_name, size, batch, engine, device, steps, threads),
                                          out), nprocs=processes, start_method="spawn")
        r = torch.load(out)
    return {"model": model_name, "size": size, "batch": batch, "engine": engine, "processes": processes,
            "threads_per_process": threads, "step_ms": 1000 * r["step_s"], "samples_s": batch / r["step_s"],
            "comm_ms": 1000 * r["comm_s"]}


def bench_processes(args) -> None:
    """`dptrain-bench --processes 1 2 [--models …] [--engines …] [--batches …]` (cli/bench.py's parsed arguments)
    → <out>.csv, .md."""

    models = args.models or ["cnn", "resnet18"]
    engines = [e for e in args.engines if e != "opacus_ghost"] if args.engines else ["nonprivate", "mixed_ghost"]
    rows = []
    for m in models:
        for s in args.sizes or [32]:
            for b in args.batches or [64]:
                for e in engines:
                    for n in args.processes:
                        row = measure(m, s, b, e, args.device, n, args.steps, args.threads_per_process)
                        rows.append(row)
                        print(f"   {m} {s} batch {b} {e:<12} x{n}: {row['step_ms']:8.1f} ms  "
                              f"{row['samples_s']:8.1f} samples/s  comm {row['comm_ms']:6.1f} ms", file=sys.stderr)
    df = pd.DataFrame(rows)
    one = df[df.processes == 1].set_index(["model", "size", "batch", "engine"])["samples_s"]
    df["speedup"] = df.samples_s.to_numpy() / one.reindex(df.set_index(["model", "size", "batch", "engine"]).index)\
        .to_numpy()
    out = out_prefix(args.out, f"bench-dist-{'gpu' if args.device.startswith('cuda') else 'cpu'}")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    df["commit"], df["machine"] = git_commit(), machine()
    df.to_csv(out + ".csv", index=False)
    with open(out + ".md", "w") as f:
        command = " ".join(["dptrain-bench", *sys.argv[1:]])
        f.write(f"# dptrain-bench --processes ({args.device})\n\ncommand: `{command}`  \ncommit: {git_commit()}  \n"
                f"machine: {machine()}\n\n{__doc__.split(chr(10) * 2)[1]}\n\n")
        cols = ["model", "size", "batch", "engine", "processes", "threads_per_process", "step_ms", "samples_s",
                "speedup", "comm_ms"]
        f.write(df[cols].to_markdown(index=False, floatfmt=".2f") + "\n")
    print(f"wrote {out}.csv, {out}.md", file=sys.stderr)
