"""dptrain-bench's table (cli/bench.py parses its arguments): per engine × model × input size × batch size.

Time: all engines of one (model, size, batch) live in one process and their steps are interleaved
(round-robin, steps.py), so machine noise hits them alike; the median step is reported, and ratios against
`nonprivate` (and `opacus`) come from the same run. A step is forward + backward + clip + noise + optimizer step.
Memory: each engine alone in a fresh process, its peak above the model-and-data baseline (memory.py). Max batch:
bisection under a memory budget (memory.py). Rows → <out>.csv, .md, .png as each config finishes.
"""

from __future__ import annotations

import math
import os
import sys
import time

import pandas as pd
import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from dptrain.bench.memory import max_batch, peak_memory
from dptrain.bench.steps import build, one_step, time_engines
from dptrain.train.outputs import git_commit, machine

DEFAULT = [  # (model, input size, batch): the default table's rows
    ("cnn", 32, 64), ("resnet18", 32, 32), ("vit_tiny", 32, 32), ("vit_small", 32, 32), ("vgg11", 32, 16),
]
ENGINES = ["nonprivate", "mixed_ghost", "ghost", "opacus", "opacus_ghost"]  # + per_sample, <mode>_2pass on request


def profile(model_name, size, batch, engines, device, steps=3) -> str:
    """Where one engine's step goes: the engine's own phases (dptrain::norms, dptrain::clipped_sum,
    dptrain::noise; labelled in the engine) and the top kernels by self time, per engine, from torch.profiler."""
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


def default_out(name: str) -> str:
    """Where results go without --out: a new timestamped folder under outputs/ (git-ignored), never the committed
    results/ tables — those are rewritten only when --out names them (make bench)."""
    return os.path.join("outputs", "bench", time.strftime("%Y-%m-%d_%H-%M-%S"), name)


def run(configs: list[tuple], *, engines: list[str], device: torch.device, steps: int, memory: bool,
        memory_budget: float | None, max_batch_limit: int, out: str, argv: list[str]) -> None:
    """The bench of `configs` ((model, size, batch, trainable) each): the plan first, then per config its rows
    (time, memory, max batch per engine) written to <out>.{csv,md,png} as it finishes, with an estimate of the rest."""
    _plan(configs, engines, steps, memory, memory_budget, max_batch_limit)
    rows, t0 = [], time.perf_counter()
    for i, (model_name, size, batch, trainable) in enumerate(configs):
        print(f"== {model_name} {size}x{size} batch {batch} trainable {trainable}", file=sys.stderr)
        times = time_engines(model_name, size, batch, engines, device, steps=steps, trainable=trainable)
        for e in engines:
            row = {"model": model_name, "size": size, "batch": batch, "trainable": trainable, "engine": e,
                   "step_ms": None,
                   "peak_mem_mb": None, "extra_mem_mb": None, "max_batch": None}
            if e in times:
                row["step_ms"] = 1000 * times[e]
                if memory:
                    mem = peak_memory(model_name, size, batch, e, str(device), trainable=trainable) or {}
                    row["peak_mem_mb"], row["extra_mem_mb"] = mem.get("peak_mb"), mem.get("extra_mb")
                if memory_budget:
                    row["max_batch"] = max_batch(model_name, size, e, str(device), memory_budget, hi=max_batch_limit)
            rows.append(row)
            nan = float("nan")
            print(f"   {e:<13} {row['step_ms'] or nan:9.1f} ms  peak {row['peak_mem_mb'] or nan:8.0f} MB"
                  f"  extra {row['extra_mem_mb'] or nan:8.0f} MB", file=sys.stderr)
        write(rows, out, device=str(device), argv=argv)  # the rows so far: a stopped bench keeps what it measured
        _eta(i + 1, len(configs), time.perf_counter() - t0)


def out_prefix(folder: str | None, name: str) -> str:
    """<folder>/<name>: --out names a folder, as dptrain-report's does; default outputs/bench/<date>/."""
    return os.path.join(folder, name) if folder else default_out(name)


def _plan(configs, engines, steps, memory, memory_budget, max_batch_limit) -> None:
    """What the bench will do, before it starts: a default run takes tens of minutes on 2 CPU cores."""
    n, e = len(configs), len(engines)
    line = f"dptrain-bench: {n} model config(s) x {e} engine(s): {steps} interleaved steps each"
    if memory:
        line += f", then peak memory in {n * e} fresh process(es)"
    if memory_budget:
        probes = math.ceil(math.log2(max_batch_limit + 1))
        line += (f", then the max batch under {memory_budget:g} MB: bisection over 1..{max_batch_limit}, "
                 f"<= {probes} fresh processes per engine ({n * e * probes} at most)")
    print(line + "; each row is written as it finishes, with an estimate of the rest", file=sys.stderr, flush=True)


def _eta(done: int, total: int, elapsed: float) -> None:
    rest = elapsed / done * (total - done)
    print(f"   {done}/{total} config(s) in {elapsed / 60:.1f} min" + (f"; the rest: about {rest / 60:.1f} min"
                                                                      if rest else ""), file=sys.stderr, flush=True)


def write(rows: list[dict], out: str, *, device: str, argv: list[str]) -> None:
    """The rows → <out>.csv, .md (ratios against the same run's nonprivate / opacus), .png."""
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


def plot_bench(df, path: str) -> None:
    """The ratios against nonprivate per config and engine: time (log axis), peak and extra memory (from 0)."""
    import matplotlib  # optional: plotting only, and its import is slow

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = df.assign(config=df.model + " " + df["size"].astype(str) + "px b" + df.batch.astype(str))
    fig, axes = plt.subplots(1, 3, figsize=(18, 4))
    for ax, col, label in ((axes[0], "time_vs_nonprivate", "step time / non-private"),
                           (axes[1], "peak_vs_nonprivate", "peak memory / non-private"),
                           (axes[2], "extra_vs_nonprivate", "extra memory / non-private")):
        if col not in df:
            continue
        piv = df.pivot_table(index="config", columns="engine", values=col)
        if piv.empty:
            continue
        # time ratios span 1-100x: log; memory ratios sit near 1, where a log axis from 0.98 made 1.7% look like a
        # full-height difference: linear from 0
        piv.plot.bar(ax=ax, logy=col.startswith("time"), rot=20)
        if not col.startswith("time"):
            ax.set_ylim(bottom=0)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set(ylabel=label, xlabel="")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
