"""`dptrain`: Hydra entry point. Returns test accuracy, the metric sweepers optimise."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig

from dptrain import keys as key
from dptrain.cli import terminal
from dptrain.cli.help import page
from dptrain.config import CONF_DIR, ROOT, check_paths, model_name, register, validate
from dptrain.errors import UserError

register()


def _add_plugins() -> None:
    """hparams_search=private's sweeper lives in <repo>/hydra_plugins (Hydra looks for sweepers only in that
    namespace package, which the editable install does not map): add it before Hydra scans its plugins."""
    try:
        import hydra_plugins
    except ImportError:  # no Hydra plugin installed at all: the repo's folder is the namespace
        sys.path.append(ROOT)
        return
    here = os.path.join(ROOT, "hydra_plugins")
    if os.path.isdir(here) and here not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(here)


_add_plugins()
log = logging.getLogger("dptrain")


def main():
    """Under torchrun, ranks > 0 send Hydra's own files to a temporary directory: rank 0 owns the run's. The
    command line is composed and checked before Hydra runs (terminal.py): a mistake is one line and exit 2."""
    if sys.argv[1:2] in (["--help"], ["-h"]) and len(sys.argv) <= 3:  # ours; Hydra's is --hydra-help
        try:
            print(page(CONF_DIR, sys.argv[2] if len(sys.argv) == 3 else None))
        except UserError as e:
            terminal.fail("dptrain", str(e))
        return None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun only: distributed.py imports torch (seconds)
        from dptrain.train.distributed import worker_overrides

        sys.argv += worker_overrides()
    claim = terminal.start("dptrain", CONF_DIR, "train", precheck)
    return terminal.run(_main, claim)


def precheck(cfg) -> None:
    """What the command line alone can show wrong: numbers and keys (config.validate), or a path that must exist
    and does not — resume=, dataset.root= (each would be created). The run checks everything else once torch has
    loaded (run.check_config)."""
    if cfg.resume:
        if not os.path.isdir(str(cfg.resume)):
            raise UserError(f"resume={cfg.resume}: not a directory")
        return
    validate(terminal.without_hydra(cfg))
    check_paths(cfg)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _main(cfg) -> float:
    # torch and timm load for the run only: --help and a refused command line answer without them
    from dptrain.privacy import CoverageError
    from dptrain.train.checkpoint import resume_config
    from dptrain.train.distributed import init
    from dptrain.train.outputs import wandb_sync_hint
    from dptrain.train.run import run

    try:
        if cfg.resume:  # the run's saved config; of the command line's overrides, only harmless ones apply
            cfg = resume_config(cfg, HydraConfig.get().overrides.task)
        dist = init(cfg.device)  # torchrun's environment → the process group; one process: a no-op
        summary = run(cfg, HydraConfig.get().runtime.output_dir, dist=dist)
    except (UserError, CoverageError) as e:
        _fail(e)
    except KeyboardInterrupt:  # Ctrl-C: one line, the run directory says how far it got (status.json)
        print(interrupted(HydraConfig.get().runtime.output_dir), file=sys.stderr)
        sys.exit(130)
    if dist.is_main:
        run_dir = str(cfg.resume or HydraConfig.get().runtime.output_dir)  # where run() wrote
        print(format_summary(summary, run_dir=run_dir))
        hint = wandb_sync_hint(run_dir)
        if hint:
            print(hint)
    return summary[key.TEST_ACC]


def _fail(e: Exception):
    """A user's mistake: one line on stderr (in cli.log too), exit 2."""
    terminal.log_to_files(log, str(e))
    terminal.fail("dptrain", str(e))


def interrupted(run_dir: str) -> str:
    """Ctrl-C's one line: whether the run can be continued, and the command that does it."""
    from dptrain.train.checkpoint import FILE  # torch: loaded with the run, not at the CLI's start

    if os.path.isfile(os.path.join(run_dir, FILE)):
        return f"dptrain: interrupted; continue the run with: dptrain resume={run_dir} (its last checkpoint)"
    return f"dptrain: interrupted before the first checkpoint; nothing to resume in {run_dir}"


def format_summary(s: dict, *, run_dir: str | None = None) -> str:
    eps = s.get(key.EPS_SPENT)
    priv = "non-private" if eps is None else (
        f"eps spent {eps:.3f} (target {s[key.EPS]}, delta {s[key.DELTA]:.3g}, "
        f"sigma {s[key.NOISE_MULTIPLIER]:.3f}, {s[key.ACCOUNTANT]}, {s[key.SAMPLING]})")
    if s.get(key.EPS_EXCLUDES):
        priv += f"; eps excludes {' and '.join(s[key.EPS_EXCLUDES])} (log.*=nonprivate)"
    if s.get(key.CHECKPOINT_EPS_SPENT) is not None:
        priv += f"; its checkpoint's run spent eps {s[key.CHECKPOINT_EPS_SPENT]:.3f} (composes if the data overlap)"
    config = s.get(key.CONFIG) or {}
    model = model_name(config.get("model") or {"name": s[key.MODEL]},
                                (config.get("dataset") or {}).get("image_size"))
    init = f" ({s[key.INIT]})" if s.get(key.INIT) else ""  # "fine-tuned from <weights>" / "from scratch"
    # dataset.val_fraction > 0: test/acc is the held-out split of the training set's (the test split is never read)
    acc = "val acc" if (config.get("dataset") or {}).get("val_fraction") else "test acc"
    return (f"{model}{init} on {s[key.DATASET]} with {s[key.ENGINE]}: {acc} {s[key.TEST_ACC]:.4f} | {priv}\n"
            f"  {s[key.SAMPLES_PER_S]:.0f} samples/s, step {s[key.STEP_MS]:.1f} ms (median), "
            f"peak mem {s[key.PEAK_MEM_MB]:.0f} MB, {s[key.STEPS]} steps in {s[key.WALL_S]:.1f} s"
            + (f"\n  files: {run_dir} (summary.json, metrics.jsonl, model.pt)" if run_dir else "")
            + "".join(f"\n  WARNING: {w}" for w in s.get(key.WARNINGS) or ()))


if __name__ == "__main__":
    main()
