"""`make gpu-check`: every check that needs a GPU, in one prepared command for a bare, offline CUDA machine:

    mkdir -p $OUT && PYTHONPATH=. PYTHONUNBUFFERED=1 python3 -m dptrain.bench.gpu_check --out $OUT/gpu-check

First the kit (kit.py: what dptrain needs and the machine lacks, from wheels/), then the sections in SECTIONS'
order (gpu_sections.py, gpu_memory.py), each written to <out>.json/.md as soon as it ends, under a time budget
from the command's start (BUDGET_S on CUDA): a section, and inside the long ones each row, starts only with its
need left, else is recorded as skipped, so a rerun fits in one 600 s device command. A CPU dry run of the flow:
`python -m dptrain.bench.gpu_check --device cpu --bench-models cnn --memory-budget-mb 700 --out /tmp/gc/gc`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback

T0 = time.time()  # the clock starts before torch's import (seconds on a cold machine): the budget is the command's

import torch  # noqa: E402

from dptrain.bench.gpu_memory import BENCH_ENGINES, Clock, beit_large, bench_model, max_batch  # noqa: E402
from dptrain.bench.gpu_sections import bf16_bound, dropout_replay, exactness, gpu_tests, headline  # noqa: E402
from dptrain.bench.kit import install_kit  # noqa: E402

SECTIONS = ["replay", "bf16_bound", "headline", "gpu_tests", "bench", "max_batch", "exactness", "beit_large"]
BENCH_MODELS = ["vgg19", "resnet18", "vit_base", "beit_base"]
# the least time (s, CUDA) a section needs to be worth starting; the GPU estimate of each, not a measurement
NEEDS = {"replay": 5, "bf16_bound": 10, "headline": 60, "gpu_tests": 60, "bench": 30, "max_batch": 30,
         "exactness": 30, "beit_large": 30}
# the command's default budget on CUDA, from its start (torch's import and the kit's install included): a section or
# a row starts only with its need left, so the command ends by ~420 s, and a rerun fits in a 600 s device command
BUDGET_S = 390.0


def _fmt(v, spec=".3g"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def summary_md(report: dict, rows: list[dict]) -> str:
    """The headline numbers: per model, DP's cost against the same precision's nonprivate and against Opacus."""
    lines = ["| model | engine | step ms | × nonprivate (same precision) | × opacus | peak MB | note |",
             "|---|---|---|---|---|---|---|"]
    by = {(r["model"], r["engine"]): r for r in rows}
    for r in rows:
        prec = "_bf16" if r["engine"].endswith("_bf16") else "_fp16" if r["engine"].endswith("_fp16") else ""
        base, op = by.get((r["model"], "nonprivate" + prec)), by.get((r["model"], "opacus"))
        def ratio(ref, r=r):
            return r["step_ms"] / ref["step_ms"] if r["step_ms"] and ref and ref["step_ms"] else None

        lines.append(f"| {r['model']} {r['size']}px b{r['batch']} | {r['engine']} | {_fmt(r['step_ms'], '.1f')} | "
                     f"{_fmt(ratio(base), '.2f')} | {_fmt(ratio(op), '.2f') if not prec else ''} | "
                     f"{_fmt(r['peak_mem_mb'], '.0f')} | {(r.get('note') or '')[:120]} |")
    mb = report.get("max_batch")
    if isinstance(mb, dict) and "error" not in mb:
        budget = next((v["budget_mb"] for v in mb.values() if isinstance(v, dict)), None)
        lines += ["", f"max batch under {_fmt(budget, '.0f')} MB of peak memory:", ""]
        for e, v in mb.items():
            if isinstance(v, dict) and "max_batch" in v:
                lines.append(f"- {e}: {v['max_batch']} ({'exact' if v['exact'] else 'lower bound'}; "
                             f"{_fmt(v['mb_per_example'])} MB per example + {_fmt(v['fixed_mb'], '.0f')} MB)")
            else:
                lines.append(f"- {e}: {_fmt(v, '.2f') if not isinstance(v, dict) else json.dumps(v)[:200]}")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/gpu-check", help="output prefix (.json, .md, -tests.log)")
    ap.add_argument("--bench-out", default=None, help="the bench's output prefix (.csv, .md, .png; default: "
                    "bench-gpu beside --out, bench-cpu on CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bench-models", nargs="+", default=BENCH_MODELS,
                    help="the bench's models, the first one also for max_batch (a CPU dry run: cnn)")
    ap.add_argument("--bench-engines", nargs="+", default=BENCH_ENGINES)
    ap.add_argument("--size", type=int, default=None, help="bench input size (default: 224 on CUDA, 32 on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="bench batch (default: 32 on CUDA, 8 on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per engine (default: 5 on CUDA, 2 on CPU)")
    ap.add_argument("--memory-budget-mb", type=float, default=40960.0,
                    help="max_batch's budget of peak memory (default 40 GiB, an A100-40GB's worth)")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="the whole command's budget from its start: a section or row that would start with too "
                         f"little left is skipped (default: {BUDGET_S:.0f} on CUDA, none on CPU)")
    ap.add_argument("--wheels", default="wheels", help="the wheel folder installed first (see kit above)")
    ap.add_argument("--site", default=None, help="where the wheels go (default: <tmp>/dptrain-site)")
    ap.add_argument("--no-install", action="store_true", help="skip the kit: install nothing")
    ap.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS, help="which sections to run")
    return ap


def _save(report: dict, rows: list[dict], args, bench_out: str, command: list[str]) -> None:
    """Write <out>.json and <out>.md (and the bench's files when it has rows): called after every section."""
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    if rows:
        try:
            from dptrain.bench.speed import write  # pandas and matplotlib: without them the rows stay in the json

            write(rows, bench_out, device=args.device, argv=["python -m dptrain.bench.gpu_check", *command])
            report["bench_files"] = [bench_out + x for x in (".csv", ".md", ".png")]
        except Exception:  # noqa: BLE001 - pandas/matplotlib missing: the rows stay in the json
            report["bench_files"] = {"error": traceback.format_exc()[-600:]}
    with open(args.out + ".md", "w") as f:
        f.write(f"# gpu-check ({report['env']['name']}, torch {report['env']['torch']}, python "
                f"{report['env']['python']})\n\ncommand: `python -m dptrain.bench.gpu_check {' '.join(command)}`\n\n")
        if rows or "max_batch" in report:
            f.write(summary_md(report, rows) + "\n")
        f.write("```json\n" + json.dumps(report, indent=1, default=str) + "\n```\n")


def _plan(args, device, clock: Clock, size: int, batch: int, steps: int, rows: list[dict]) -> list[tuple]:
    """(name, thunk) per section, in SECTIONS' order; the first bench model's max_batch right after its bench."""
    gpu = device.type == "cuda"
    plan = [("kit", lambda: install_kit(args.wheels, args.site, timeout=min(300, clock.left() - 5)))
            ] if not args.no_install else []
    models = list(args.bench_models)

    def bench_section(m):
        def go():
            new = bench_model(m, size, batch, steps, device, clock, args.bench_engines)
            rows.extend(new)
            return {r["engine"]: {k: r[k] for k in ("step_ms", "peak_mem_mb", "note") if r[k] is not None}
                    for r in new}
        return go

    sections = {
        "replay": lambda: dropout_replay(device),
        "bf16_bound": lambda: bf16_bound(device, clock),
        "headline": lambda: headline(device, args.out, timeout=min(180, clock.left() - 5)),
        "max_batch": lambda: max_batch(models[0], size, device, args.memory_budget_mb, clock),
        # capped: the bench and the max batch after it must keep a share of the budget
        "gpu_tests": lambda: gpu_tests(device, args.out + "-tests.log", timeout=min(150, clock.left() - 5)),
        "exactness": lambda: exactness(device, clock),
        "beit_large": lambda: beit_large(device, size, clock),
    }
    rest = [(f"bench/{m}", bench_section(m)) for m in models[1:]] if "bench" in args.sections else []
    for name in SECTIONS:
        if name not in args.sections or (name == "beit_large" and not gpu):
            continue
        if name == "bench":
            plan.append((f"bench/{models[0]}", bench_section(models[0])))
        else:
            plan.append((name, sections[name]))
            if name == "max_batch":
                plan += rest
    return plan if "max_batch" in args.sections else plan + rest  # no max_batch: the other models last


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    command = sys.argv[1:] if argv is None else list(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    # as a program, the clock runs from the process's start (T0: before torch's import); called in-process, from now
    clock = Clock(args.time_budget_s if args.time_budget_s is not None else BUDGET_S if gpu else None,
                  t0=T0 if argv is None else None)
    size = args.size or (224 if gpu else 32)
    batch, steps = args.batch or (32 if gpu else 8), args.steps or (5 if gpu else 2)
    bench_out = args.bench_out or os.path.join(os.path.dirname(args.out), "bench-gpu" if gpu else "bench-cpu")
    report = {"env": {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
                      "name": torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu"},
              "args": vars(args), "seconds": {}}
    for d in {os.path.dirname(args.out), os.path.dirname(bench_out)}:
        os.makedirs(d or ".", exist_ok=True)
    rows: list[dict] = []

    for name, run in _plan(args, device, clock, size, batch, steps, rows):
        t = time.time()
        need = NEEDS.get(name.split("/")[0], 0)
        if clock.left() < need:
            report[name] = {"skipped": f"time budget: {clock.left():.0f} s left, this section needs ~{need} s"}
            print(f"== {name}: skipped ({clock.left():.0f} s left)", flush=True)
            _save(report, rows, args, bench_out, command)
            continue
        print(f"== {name} ({'' if clock.budget is None else f'{clock.left():.0f} s left'})", flush=True)
        try:
            report[name] = run()
        except Exception:  # noqa: BLE001 - one section's failure must not cost the others
            report[name] = {"error": traceback.format_exc()[-2000:]}
        report["seconds"][name] = round(time.time() - t, 1)
        print(json.dumps(report[name], default=str)[:2000], flush=True)
        print(f"   ({report['seconds'][name]} s)", flush=True)
        _save(report, rows, args, bench_out, command)
    report["seconds"]["total"] = round(time.time() - clock.t0, 1)
    _save(report, rows, args, bench_out, command)
    print(f"wrote {args.out}.json, {args.out}.md" + (f", {bench_out}.{{csv,md,png}}" if rows else ""), flush=True)


if __name__ == "__main__":
    main()
