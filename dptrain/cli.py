"""`dptrain`: Hydra entry point. Returns test accuracy, the metric sweepers optimise."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig

from .config import register

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
register()
log = logging.getLogger("dptrain")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg) -> float:
    from .errors import UserError
    from .privacy import CoverageError
    from .run import run

    try:
        summary = run(cfg, HydraConfig.get().runtime.output_dir)
    except (UserError, CoverageError) as e:
        log.error("%s", e)
        print(f"dptrain: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_summary(summary))
    return summary["test/acc"]


def format_summary(s: dict) -> str:
    eps = s.get("privacy/eps_spent")
    priv = "non-private" if eps is None else (
        f"eps spent {eps:.3f} (target {s['privacy/eps']}, delta {s['privacy/delta']:.3g}, "
        f"sigma {s['privacy/noise_multiplier']:.3f}, {s['privacy/accountant']}, {s['privacy/sampling']})")
    return (f"{s['model']} on {s['dataset']} with {s['engine']}: test acc {s['test/acc']:.4f} | {priv}\n"
            f"  {s['perf/samples_per_s']:.0f} samples/s, step {s['perf/step_ms']:.1f} ms (median), "
            f"peak mem {s['perf/peak_mem_mb']:.0f} MB, {s['privacy/steps']} steps in {s['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
