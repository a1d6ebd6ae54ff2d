"""dptrain-bench: step time and peak memory per engine × model × input size × batch size.

Time: all engines of one (model, size, batch) live in one process and their steps are interleaved
(round-robin), so machine noise hits them alike; the median step is reported, and ratios against
`nonprivate` (and `opacus`) come from the same run. A step is forward + backward + clip + noise +
optimizer step. Memory: each engine runs alone in a fresh subprocess (peak RSS on CPU is per process, with
glibc's mmap threshold fixed so that RSS follows live tensors; on CUDA max_memory_allocated), and the peak
above the model-and-data baseline is reported.
Max batch: bisection on the batch size under --memory-budget (MB), one subprocess per probe.

    dptrain-bench                                  # → outputs/bench/<date>/bench-cpu.{csv,md,png}
    dptrain-bench --out results                    # the committed CPU table results/bench-cpu.* (make bench)
    dptrain-bench --models resnet18 --sizes 224 --batches 32 --device cuda --out results   # results/bench-gpu.*
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

DEFAULT = [  # (model, input size, batch): the goals
    ("cnn", 32, 64), ("resnet18", 32, 32), ("vit_tiny", 32, 32), ("vit_small", 32, 32), ("vgg11", 32, 16),
]
# bench-only names: a BEiT of vit_tiny's size (dim 192, depth 12, 3 heads; relative position bias, layer scale)
SIZED = {"beit_tiny": ("beit_base", {"embed_dim": 192, "num_heads": 3})}
ENGINES = ["nonprivate", "mixed_ghost", "ghost", "opacus", "opacus_ghost"]  # + per_sample, <mode>_2pass on request


def build(model_name: str, size: int, engine: str, batch: int, device: torch.device, seed: int = 0, dist=None,
          expected_batch_size: int | None = None, trainable: str = "all"):
    """trainable: model.trainable's subset (finetune.py; lora with conf's default LoraConfig), frozen before the
    engine attaches, as a run does."""
    from dptrain.config import LoraConfig
    from dptrain.engines import create_engine
    from dptrain.models.factory import create_model, grad_checkpointing
    from dptrain.models.finetune import set_trainable

    ckpt = "_ckpt" in engine  # <engine>_ckpt: with the model's activation checkpointing
    engine = engine.replace("_ckpt", "")
    torch.manual_seed(seed)
    kw = {"patch_size": 4} if model_name.startswith(("vit", "beit")) and size <= 64 else {}
    model_name, extra = SIZED.get(model_name, (model_name, {}))
    model = create_model(model_name, num_classes=10, img_size=size, **kw, **extra)
    if ckpt:
        grad_checkpointing(model, model_name)
    model = set_trainable(model, trainable, LoraConfig()).to(device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    name, passes, precision = parse_engine(engine)
    eng = create_engine(name, model, opt, noise_multiplier=1.0, max_grad_norm=1.0,
                        expected_batch_size=expected_batch_size or batch, passes=passes, precision=precision, dist=dist)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return eng, x, y


def parse_engine(label: str) -> tuple[str, int, str]:
    """An engine label → (engine, passes, precision): <engine>[_2pass][_bf16|_fp16], e.g. mixed_ghost_bf16 (a `_ckpt`
    anywhere in the label, handled by `build`, turns on the model's activation checkpointing)."""
    precision = "fp32"
    for p in ("bf16", "fp16"):
        if label.endswith("_" + p):
            label, precision = label.removesuffix("_" + p), p
    if label.endswith("_2pass"):
        return label.removesuffix("_2pass"), 2, precision
    return label, 1, precision


def one_step(eng, x, y, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    with eng.autocast():
        out = eng.model(x)
    eng.backward(out, y, last=True)
    eng.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def time_engines(model_name, size, batch, engines, device, steps=10, warmup=2,
                 errors: dict | None = None, trainable: str = "all", left=None) -> dict[str, float]:
    """Median step time (s) per engine, steps interleaved round-robin in this process. `errors`, if given, gets
    engine → the one line of an engine that could not be built or stepped. left: a callable giving the seconds
    left to the caller (gpu_check's clock): no round starts with under 5 s left (the medians of the rounds run)."""
    built = {}
    errors = {} if errors is None else errors
    for e in engines:
        try:
            built[e] = build(model_name, size, e, batch, device, trainable=trainable)
        except Exception as err:  # e.g. Opacus cannot run the model: recorded, not fatal
            errors[e] = f"cannot build: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            print(f"  {e}: cannot build ({type(err).__name__}: {str(err)[:100]})", file=sys.stderr)
    times = {e: [] for e in built}
    for i in range(warmup + steps):
        if left is not None and left() < 5:
            for e in built:
                if not times[e]:
                    errors[e] = f"not timed: the time budget ran out after {i} round(s) of warm-up"
            break
        for e, (eng, x, y) in list(built.items()):
            try:
                t = one_step(eng, x, y, device)
            except Exception as err:
                errors[e] = f"step failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                print(f"  {e}: step failed ({type(err).__name__}: {str(err)[:100]})", file=sys.stderr)
                del built[e]
                times.pop(e)
                continue
            if i >= warmup:
                times[e].append(t)
    return {e: statistics.median(ts) for e, ts in times.items() if ts}


def profile(model_name, size, batch, engines, device, steps=3) -> str:
    """Where one engine's step goes: the engine's own phases (dptrain::norms, dptrain::clipped_sum,
    dptrain::noise; labelled in the engine) and the top kernels by self time, per engine, from torch.profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    lines = []
    for e in engines:
        eng, x, y = build(model_name, size, e, batch, device)
        for _ in range(2):
            one_step(eng, x, y, device)
        with torch_profile(activities=acts) as prof:
            for _ in range(steps):
                one_step(eng, x, y, device)
        avg = prof.key_averages()
        total = sum(a.self_cpu_time_total for a in avg) / steps / 1000
        phases = {a.key: a.cpu_time_total / steps / 1000 for a in avg if a.key.startswith("dptrain::")}
        lines.append(f"## {model_name} {size}x{size} batch {batch}, {e}: {total:.1f} ms CPU per step")
        lines += [f"  {k:<22} {v:8.1f} ms" for k, v in sorted(phases.items())]
        lines.append(avg.table(sort_by="self_cpu_time_total", row_limit=12))
    return "\n".join(lines)


def peak_memory(model_name, size, batch, engine, device_name, steps=2, trainable: str = "all") -> dict | None:
    """{"peak_mb": the process's peak memory during `steps` steps in a fresh process (CPU: RSS, libraries
    included; CUDA: max allocated), "extra_mb": that peak minus the memory held before the first step (model,
    data, imports)}. None if it failed (e.g. out of memory)."""
    code = (f"from dptrain.bench.speed import _memory_child; _memory_child({model_name!r}, {size}, {batch}, "
            f"{engine!r}, {device_name!r}, {steps}, {trainable!r})")
    # glibc's dynamic mmap threshold keeps freed blocks in the heap, so RSS would depend on allocation order
    # (measured: the same non-private step's RSS after a step alternated 1.5 and 2.2 GB). A fixed threshold
    # returns every freed tensor to the OS: RSS then follows live memory, like CUDA's max allocated.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800, env=env)
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
        return {"peak_mb": out["peak_mb"], "extra_mb": out["extra_mb"]}
    except (IndexError, ValueError, KeyError):
        return None


class _RSSPeak:
    """Samples the process's resident set size every ms in a thread: the peak of the steps themselves
    (ru_maxrss would also hold the import- and build-time high-water mark)."""

    def __enter__(self):
        import threading

        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.base = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _memory_child(model_name, size, batch, engine, device_name, steps, trainable="all"):
    device = torch.device(device_name)
    eng, x, y = build(model_name, size, engine, batch, device, trainable=trainable)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(steps):
            one_step(eng, x, y, device)
        peak = torch.cuda.max_memory_allocated()
        extra = peak - base
    else:
        with _RSSPeak() as m:
            for _ in range(steps):
                one_step(eng, x, y, device)
        peak, extra = m.peak, m.peak - m.base
    print(json.dumps({"peak_mb": peak / 2**20, "extra_mb": extra / 2**20}))


MAX_BATCH_LIMIT = 1024  # --max-batch-limit: the search's upper end; bisection over 1..limit takes log2(limit) probes


def max_batch(model_name, size, engine, device_name, budget_mb, hi=MAX_BATCH_LIMIT) -> int:
    """Largest batch ≤ `hi` whose step's peak memory fits `budget_mb`, by bisection: at most ⌈log2(hi + 1)⌉ probes,
    one stderr line each (each is a fresh process and a step, up to minutes on CPU). `hi` itself means "≥ hi"."""
    lo, best, probe, most = 1, 0, 0, math.ceil(math.log2(hi + 1))
    while lo <= hi:
        mid, probe, t0 = (lo + hi) // 2, probe + 1, time.perf_counter()
        mem = peak_memory(model_name, size, mid, engine, device_name, steps=1)
        fits = mem is not None and mem["peak_mb"] <= budget_mb
        peak = "failed (out of memory?)" if mem is None else f"peak {mem['peak_mb']:.0f} MB"
        print(f"   max batch {engine}: probe {probe} of <= {most}, batch {mid}: {peak}, {'fits' if fits else 'over'} "
              f"{budget_mb:g} MB ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        if fits:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def default_out(name: str) -> str:
    """Where results go without --out: a new timestamped folder under outputs/ (git-ignored), never the committed
    results/ tables — those are rewritten only when --out names them (make bench)."""
    return os.path.join("outputs", "bench", time.strftime("%Y-%m-%d_%H-%M-%S"), name)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dptrain-bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", help="model names (default: the issue's set)")
    ap.add_argument("--sizes", nargs="*", type=int, help="input sizes (default: 32)")
    ap.add_argument("--batches", nargs="*", type=int, help="batch sizes (default: per model)")
    ap.add_argument("--engines", nargs="*", default=ENGINES)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--trainable", nargs="*", default=["all"], help="model.trainable subsets, one set of rows each: "
                    "all, head, bias, lora (finetune.py; ratios against the same subset's nonprivate)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="measure peak memory")
    ap.add_argument("--memory-budget", type=float, default=None, help="MB; bisect the max batch per engine")
    ap.add_argument("--max-batch-limit", type=int, default=MAX_BATCH_LIMIT,
                    help="with --memory-budget: search batches 1..this (log2 of it probes per engine)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler breakdown per engine, no table")
    ap.add_argument("--out", default=None, help="output folder, as dptrain-report's --out: <out>/bench-<device>."
                    "{csv,md,png} (default: outputs/bench/<date>/; the committed results/ only when named here)")
    ap.add_argument("--processes", nargs="*", type=int, help="samples/s of 1 vs N data-parallel processes "
                    "(bench_dist.py; default out: outputs/bench/<date>/bench-dist-<device>)")
    ap.add_argument("--threads-per-process", type=int, help="with --processes: torch threads per process "
                    "(default: the cores split between the processes)")
    return ap


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.processes:
        from dptrain.bench.dist import main as bench_processes

        return bench_processes(args)

    device = torch.device(args.device)
    torch.set_num_threads(torch.get_num_threads())
    if args.models:
        configs = [(m, s, b) for m in args.models for s in (args.sizes or [32]) for b in (args.batches or [32])]
    else:
        configs = [(m, s, b) for m, s0, b0 in DEFAULT for s in (args.sizes or [s0]) for b in (args.batches or [b0])]
    configs = [(m, s, b, t) for m, s, b in configs for t in args.trainable]
    out = out_prefix(args.out, f"bench-{device.type if device.type != 'cuda' else 'gpu'}")
    if args.profile:
        for model_name, size, batch, _ in configs:
            print(profile(model_name, size, batch, args.engines, device, steps=args.steps))
        return
    _plan(configs, args)
    rows, t0, argv = [], time.perf_counter(), sys.argv if argv is None else ["dptrain-bench", *argv]
    for i, (model_name, size, batch, trainable) in enumerate(configs):
        print(f"== {model_name} {size}x{size} batch {batch} trainable {trainable}", file=sys.stderr)
        times = time_engines(model_name, size, batch, args.engines, device, steps=args.steps, trainable=trainable)
        for e in args.engines:
            row = {"model": model_name, "size": size, "batch": batch, "trainable": trainable, "engine": e,
                   "step_ms": None,
                   "peak_mem_mb": None, "extra_mem_mb": None, "max_batch": None}
            if e in times:
                row["step_ms"] = 1000 * times[e]
                if args.memory:
                    mem = peak_memory(model_name, size, batch, e, args.device, trainable=trainable) or {}
                    row["peak_mem_mb"], row["extra_mem_mb"] = mem.get("peak_mb"), mem.get("extra_mb")
                if args.memory_budget:
                    row["max_batch"] = max_batch(model_name, size, e, args.device, args.memory_budget,
                                                 hi=args.max_batch_limit)
            rows.append(row)
            nan = float("nan")
            print(f"   {e:<13} {row['step_ms'] or nan:9.1f} ms  peak {row['peak_mem_mb'] or nan:8.0f} MB"
                  f"  extra {row['extra_mem_mb'] or nan:8.0f} MB", file=sys.stderr)
        write(rows, out, device=args.device, argv=argv)  # the rows so far: a stopped bench keeps what it measured
        _eta(i + 1, len(configs), time.perf_counter() - t0)


def out_prefix(folder: str | None, name: str) -> str:
    """<folder>/<name>: --out names a folder, as dptrain-report's does; default outputs/bench/<date>/."""
    return os.path.join(folder, name) if folder else default_out(name)


def _plan(configs, args) -> None:
    """What the bench will do, before it starts: a default run takes tens of minutes on 2 CPU cores."""
    n, e = len(configs), len(args.engines)
    line = f"dptrain-bench: {n} model config(s) x {e} engine(s): {args.steps} interleaved steps each"
    if args.memory:
        line += f", then peak memory in {n * e} fresh process(es)"
    if args.memory_budget:
        probes = math.ceil(math.log2(args.max_batch_limit + 1))
        line += (f", then the max batch under {args.memory_budget:g} MB: bisection over 1..{args.max_batch_limit}, "
                 f"<= {probes} fresh processes per engine ({n * e * probes} at most)")
    print(line + "; each row is written as it finishes, with an estimate of the rest", file=sys.stderr, flush=True)


def _eta(done: int, total: int, elapsed: float) -> None:
    rest = elapsed / done * (total - done)
    print(f"   {done}/{total} config(s) in {elapsed / 60:.1f} min" + (f"; the rest: about {rest / 60:.1f} min"
                                                                      if rest else ""), file=sys.stderr, flush=True)


def write(rows: list[dict], out: str, *, device: str, argv: list[str]) -> None:
    import pandas as pd

    from dptrain.report import plot_bench
    from dptrain.train.outputs import git_commit, machine

    df = pd.DataFrame(rows)
    num = ["step_ms", "peak_mem_mb", "extra_mem_mb"]
    df[num] = df[num].astype(float)  # None (not measured) → NaN
    ids = ["model", "size", "batch"] + (["trainable"] if "trainable" in df else [])  # a subset against its own
    for ref in ("nonprivate", "opacus"):
        base = df[df.engine == ref].set_index(ids)
        for col, name in (("step_ms", "time"), ("peak_mem_mb", "peak"), ("extra_mem_mb", "extra")):
            key = df.set_index(ids).index
            ref_vals = base[col].reindex(key).to_numpy() if len(base) else None
            df[f"{name}_vs_{ref}"] = df[col].to_numpy() / ref_vals if ref_vals is not None else None
    df["commit"], df["machine"] = git_commit(), machine()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)  # only now: a bench stopped before a row leaves nothing
    df.to_csv(out + ".csv", index=False)
    cols = ["model", "size", "batch", "trainable", "engine", "step_ms", "time_vs_nonprivate", "time_vs_opacus",
            "peak_mem_mb", "peak_vs_nonprivate", "extra_mem_mb", "extra_vs_nonprivate", "max_batch", "note"]
    with open(out + ".md", "w") as f:
        f.write(f"# dptrain-bench ({device})\n\ncommand: `{' '.join(argv)}`  \ncommit: {git_commit()}  \n"
                f"machine: {machine()}\n\n")
        f.write("step_ms: median of interleaved steps (forward+backward+clip+noise+optimizer step); "
                "peak_mem_mb: the process's peak memory during the steps, in a fresh process per engine (CPU: RSS "
                "including torch's libraries; CUDA: max allocated); extra_mem_mb: that peak above the memory held "
                "before the first step (model, data, imports); max_batch: largest batch whose peak fits "
                "--memory-budget; "
                "ratios are against the same run's nonprivate / opacus.\n\n")
        f.write(df[[c for c in cols if c in df]].to_markdown(index=False, floatfmt=".2f") + "\n")
    plot_bench(df, out + ".png")
    print(f"wrote {out}.csv, {out}.md, {out}.png", file=sys.stderr)


if __name__ == "__main__":
    main()
