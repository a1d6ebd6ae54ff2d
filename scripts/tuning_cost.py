"""Issue #32: what a CIFAR-10 cell cost including the hand-made search that chose its epochs.

A cell = validation runs (settings fixed before any ran) + one final run whose settings were CHOSEN from their
results. `dptrain-report <runs> --together` composes the runs as run (PRV): exact for settings fixed in advance, but
the final run's mechanism (σ, steps) depended on the validation releases. The bound that holds for that adaptive
choice is RDP's (adaptive composition, with the chosen mechanism replaced by the worst of the candidates it was chosen
from, order by order: ε_λ = Σ_val ε_λ(run) + max_c ε_λ(candidate c)), converted to (ε, δ) as Opacus does.

    .venv/bin/python scripts/tuning_cost.py --runs <val runs...> --final <final run> \
        --experiment cifar10_scatter_flips_tta_eps1 --candidates epochs=30 epochs=60 --n 50000
"""

import argparse
import json
import os

import numpy as np
from hydra import compose, initialize_config_dir
from opacus.accountants.analysis.rdp import get_privacy_spent

from dptrain import keys as key
from dptrain.config import CONF_DIR, register
from dptrain.errors import UserError
from dptrain.privacy.accounting import epsilon_of
from dptrain.report import independent
from dptrain.sweep.tuning import ORDERS, rdp_curve
from dptrain.train.budget import create_budget
from dptrain.train.ledger import history_of


def summary(run_dir: str) -> dict:
    return json.load(open(os.path.join(run_dir, "summary.json")))


def candidate(experiment: str, override: str, n: int, prior: list) -> list:
    """The mechanisms a final run with `override` would have run on n examples (its budget, calibrated as dptrain
    calibrates it), without running it."""
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", override])
    b = create_budget(cfg, n, prior=tuple(map(tuple, prior)))
    return [list(m) for m in b.history(b.steps)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="the validation runs (settings fixed in advance)")
    ap.add_argument("--final", required=True, help="the final run, its settings chosen from the validation runs")
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--candidates", nargs="+", required=True, help="the overrides the final run was chosen among")
    ap.add_argument("--n", type=int, required=True, help="the final run's training set size")
    ap.add_argument("--delta", type=float, default=1e-5)
    a = ap.parse_args()
    summaries = {d: summary(d) for d in [*a.runs, a.final]}  # each read once
    independent(summaries, what="tuning_cost.py")  # shared noise: no bound holds
    val = [m for d in a.runs for m in history_of(summaries[d])]
    final = history_of(summaries[a.final])
    cands = {c: candidate(a.experiment, c, a.n, summaries[a.final][key.PRIOR]) for c in a.candidates}
    assert any(np.allclose(np.array(h, float), np.array(final, float)) for h in cands.values()), (final, cands)
    worst = np.max([rdp_curve(h) for h in cands.values()], axis=0)
    adaptive, order = get_privacy_spent(orders=list(ORDERS), rdp=rdp_curve(val) + worst, delta=a.delta)
    print(f"- as run, PRV (dptrain-report --together): eps {epsilon_of(val + final, delta=a.delta):.3f}")
    print(f"- as run, RDP: eps {epsilon_of(val + final, delta=a.delta, accountant='rdp'):.3f}")
    print(f"- adaptive choice among {', '.join(a.candidates)} (RDP, worst candidate per order): eps {adaptive:.3f} "
          f"(order {order:g}) at delta {a.delta:g}")
    for c, h in cands.items():
        print(f"  - candidate {c}: mechanisms (sigma, q, steps) {[[round(x, 4) for x in m] for m in h]}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # one line, as dptrain's own commands
        raise SystemExit(str(e)) from None  # the message names the script
