"""dptrain-report: run directories → <table>.csv (tidy), .md (pivot; mean ± std where a cell has several seeds),
.png, beside the runs (in the folder that holds them all) unless --out names a folder (results/: the committed
tables, only when asked).

    dptrain-report multirun/acc_vs_eps/2026-11-28_10-00-00      # a sweep → that folder/acc_vs_eps.*
    dptrain-report outputs/a outputs/b --table mine              # some runs → outputs/mine.*
    dptrain-report multirun/acc_vs_eps/<date> --out results      # the committed results/acc_vs_eps.*
    dptrain-report val_a val_b chosen --together                 # + the ε of a hand-made search, all runs composed
"""

from __future__ import annotations

import argparse
import sys

from dptrain.cli.terminal import fail
from dptrain.errors import UserError
from dptrain.report import report


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dptrain-report", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="run or sweep directories")
    ap.add_argument("--table", help="output name (default: the runs' `name`)")
    ap.add_argument("--out", help="output folder (default: the folder holding the runs; results/ only when named)")
    ap.add_argument("--together", action="store_true",
                    help="also the ε of all the runs composed, as if on the same examples: what a grid, a table's "
                         "seeds or a search by hand spent in all (for settings fixed before the runs; each run at "
                         "its own seed or with privacy.secure, so that their noise is independent)")
    return ap


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    try:
        r = report(args.paths, table=args.table, out=args.out, together=args.together)
    except UserError as e:
        fail("dptrain-report", str(e))
    print(f"{r['runs']} runs → {r['csv']}, {r['md']}, {r['png']}")
    for note in r["notes"]:
        print(f"  {note}")
    for f in r["failed"]:
        print(f"  failed/unfinished: {f}", file=sys.stderr)


if __name__ == "__main__":
    main()
