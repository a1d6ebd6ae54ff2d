"""dptrain-bench: step time and peak memory per engine × model × input size × batch size.

    dptrain-bench                                  # → outputs/bench/<date>/bench-cpu.{csv,md,png}
    dptrain-bench --out results                    # the committed CPU table results/bench-cpu.* (make bench)
    dptrain-bench --models resnet18 --sizes 224 --batches 32 --device cuda --out results   # results/bench-gpu.*
"""

from __future__ import annotations

import argparse
import sys

import torch

from dptrain.bench import dist, memory, speed


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dptrain-bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", help="model names (default: the issue's set)")
    ap.add_argument("--sizes", nargs="*", type=int, help="input sizes (default: 32)")
    ap.add_argument("--batches", nargs="*", type=int, help="batch sizes (default: per model)")
    ap.add_argument("--engines", nargs="*", default=speed.ENGINES)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--trainable", nargs="*", default=["all"], help="model.trainable subsets, one set of rows each: "
                    "all, head, bias, lora (finetune.py; ratios against the same subset's nonprivate)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="measure peak memory")
    ap.add_argument("--memory-budget", type=float, default=None, help="MB; bisect the max batch per engine")
    ap.add_argument("--max-batch-limit", type=int, default=memory.MAX_BATCH_LIMIT,
                    help="with --memory-budget: search batches 1..this (log2 of it probes per engine)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler breakdown per engine, no table")
    ap.add_argument("--out", default=None, help="output folder, as dptrain-report's --out: <out>/bench-<device>."
                    "{csv,md,png} (default: outputs/bench/<date>/; the committed results/ only when named here)")
    ap.add_argument("--processes", nargs="*", type=int, help="samples/s of 1 vs N data-parallel processes "
                    "(bench/dist.py; default out: outputs/bench/<date>/bench-dist-<device>)")
    ap.add_argument("--threads-per-process", type=int, help="with --processes: torch threads per process "
                    "(default: the cores split between the processes)")
    return ap


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.processes:
        return dist.bench_processes(args)
    device = torch.device(args.device)
    torch.set_num_threads(torch.get_num_threads())
    if args.models:
        configs = [(m, s, b) for m in args.models for s in (args.sizes or [32]) for b in (args.batches or [32])]
    else:
        configs = [(m, s, b) for m, s0, b0 in speed.DEFAULT for s in (args.sizes or [s0])
                   for b in (args.batches or [b0])]
    configs = [(m, s, b, t) for m, s, b in configs for t in args.trainable]
    out = speed.out_prefix(args.out, f"bench-{device.type if device.type != 'cuda' else 'gpu'}")
    if args.profile:
        for model_name, size, batch, _ in configs:
            print(speed.profile(model_name, size, batch, args.engines, device, steps=args.steps))
        return
    speed.run(configs, engines=args.engines, device=device, steps=args.steps, memory=args.memory,
              memory_budget=args.memory_budget, max_batch_limit=args.max_batch_limit, out=out,
              argv=["dptrain-bench", *(sys.argv[1:] if argv is None else argv)])  # as a user types it, no local path


if __name__ == "__main__":
    main()
