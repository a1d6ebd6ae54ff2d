"""Issue #32, item 4: what the ScatterNet flips recipe's step costs against the no-flip step, and where.

The flips recipe trains scatter_cnn on two fixed views per example (the features and the mirror image's,
privacy.augmult=2): each example enters as 2 rows, and its per-example gradient is the sum over both. One step of
`--batch` examples on CIFAR-sized features (243 × 8 × 8), per engine and K ∈ {1, 2}, in one process, interleaved
round-robin, median of `--rounds`, one thread, keep_freed_memory on (as the recipe runs); then the share of each
mixed_ghost step spent in the engine's per-example norms (torch.profiler, the `dptrain::norms` ranges).

    .venv/bin/python scripts/flips_step_cost.py --batch 256 --rounds 5 > results/cifar10_flips_step_cost.md
"""

import argparse
import platform
import statistics
import subprocess

import torch
from torch.profiler import ProfilerActivity, profile

from dptrain.bench.steps import one_step
from dptrain.engines import create_engine
from dptrain.models.factory import create_model
from dptrain.train.allocator import keep_freed_memory

ENGINES = ("nonprivate", "mixed_ghost", "per_sample")
CPU = torch.device("cpu")


def build(engine: str, B: int, K: int):
    torch.manual_seed(0)
    model = create_model("scatter_cnn", num_classes=10, in_chans=243, img_size=8, norm="none")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    eng = create_engine(engine, model, opt, noise_multiplier=1.0, max_grad_norm=0.1, expected_batch_size=B, augmult=K)
    return eng, torch.randn(B * K, 243, 8, 8), torch.randint(0, 10, (B,))


def step(eng, x, y) -> float:
    return one_step(eng, x, y, CPU)  # the bench's timed step: forward, engine backward, optimizer step


def norms_share(B: int, K: int) -> float:
    """Fraction of a mixed_ghost step's CPU time inside the engine's per-example norms (two profiled steps)."""
    eng, x, y = build("mixed_ghost", B, K)
    step(eng, x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        total = step(eng, x, y) + step(eng, x, y)
    norms = sum(e.cpu_time_total for e in prof.key_averages() if e.key == "dptrain::norms") / 1e6
    return norms / total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    kept = keep_freed_memory()
    cases = {(e, K): build(e, a.batch, K) for e in ENGINES for K in (1, 2)}
    times = {k: [] for k in cases}
    for r in range(a.rounds + 1):  # round 0 warms up
        for k, case in cases.items():
            t = step(*case)
            if r:
                times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med[("nonprivate", 1)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# The flips step's cost (issue #32, item 4): scatter_cnn, batch {a.batch}, ScatterNet features 243×8×8\n")
    print(f"- command: `.venv/bin/python scripts/flips_step_cost.py --batch {a.batch} --rounds {a.rounds}`")
    print(f"- commit {commit}; {platform.machine()}, torch {torch.__version__}, one thread, keep_freed_memory {kept}")
    print(f"- median of {a.rounds} interleaved rounds (one process); K = rows per example (2: the flips recipe)\n")
    print("| engine | K | step (s) | / non-private K=1 | / same engine K=1 |")
    print("|---|---:|---:|---:|---:|")
    for (e, K), t in med.items():
        print(f"| {e} | {K} | {t:.3f} | {t / base:.2f} | {t / med[(e, 1)]:.2f} |")
    print("\n| mixed_ghost | share of the step in the per-example norms |")
    print("|---|---:|")
    for K in (1, 2):
        print(f"| K = {K} | {norms_share(a.batch, K):.0%} |")


if __name__ == "__main__":
    main()
