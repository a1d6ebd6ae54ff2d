"""dptrain-audit: an empirical lower bound on ε from one real training run (audit.py); every dptrain override plus
audit.*. Exit 0 when the bound is consistent with the run's ε, 1 when it is not, 2 on a bad command line.

    dptrain-audit eps=3 audit.canaries=1000 audit.canary=dirac     # white-box: gradient-space canaries
    dptrain-audit eps=3 audit.canary=noise                          # black-box: out-of-distribution canaries
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig

from dptrain.audit import EPS_LOWER_BOUND, PASSED, audit, format_line, register
from dptrain.cli import terminal
from dptrain.cli.train import CONF_DIR
from dptrain.config import check_paths, validate
from dptrain.errors import UserError
from dptrain.privacy import CoverageError

log = logging.getLogger("dptrain")
register()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="audit")
def _task(cfg) -> float:
    try:
        result = audit(cfg, HydraConfig.get().runtime.output_dir)
    except (UserError, CoverageError) as e:
        terminal.log_to_files(log, str(e))
        terminal.fail("dptrain-audit", str(e))
    print(format_line(result))
    if not result[PASSED]:
        sys.exit(1)  # the audit failed: the run leaks more than it claims
    return result[EPS_LOWER_BOUND]


def precheck(cfg) -> None:
    """The command line's numbers, keys and paths, before Hydra runs (terminal.start)."""
    validate(terminal.without_hydra(cfg))
    check_paths(cfg)


def main() -> None:
    claim = terminal.start("dptrain-audit", CONF_DIR, "audit", precheck)
    terminal.run(_task, claim)


if __name__ == "__main__":
    main()
