"""Run directories → a table (.csv tidy, .md pivot with mean ± std over seeds, .png): dptrain-report's work
(cli/report.py).

Every directory below the given paths that holds a summary.json is a finished run; one that holds a
failed.json (a run stopped by the divergence guard) is listed as failed, with the ε it spent; one whose
status.json says "running" (a run still going, or killed: checkpoint.py) is listed as unfinished, with its last
checkpoint's step and ε and the command that continues it; one that holds a Hydra config (.hydra/) but none of
these is listed as failed or unfinished. None of them is fatal.
"""

from __future__ import annotations

import json
import os

import pandas as pd

from dptrain import keys as key
from dptrain.errors import UserError
from dptrain.keys import COLUMNS
from dptrain.privacy.accounting import epsilon_of
from dptrain.sweep.search import TUNING_FILE
from dptrain.train.ledger import history_of


def collect(paths: list[str]) -> tuple[list[dict], list[str]]:
    rows, failed = [], []
    for root in paths:
        if not os.path.isdir(root):
            failed.append(f"{root} (not a directory)")
            continue
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if x not in ("wandb", ".hydra")]
            if "summary.json" in files:
                try:
                    s = json.load(open(os.path.join(d, "summary.json")))
                except (OSError, ValueError) as e:
                    failed.append(f"{d} (unreadable summary.json: {type(e).__name__})")
                    continue
                row = {col: s.get(k) for col, k in COLUMNS.items()}
                cfg = s.get(key.CONFIG) or {}
                row.update(name=s.get(key.NAME), seed=cfg.get("seed"), batch_size=cfg.get("batch_size"),
                           epochs=cfg.get("epochs"), eps=row["eps"] if row["eps"] is not None else cfg.get("eps"),
                           eps_excludes="; ".join(s.get(key.EPS_EXCLUDES) or []), **_tuning(root, d, s),
                           run_dir=d)
                rows.append(row)
            elif "failed.json" in files:
                failed.append(f"{d} ({_failure(os.path.join(d, 'failed.json'))})")
            elif "status.json" in files:
                failed.append(f"{d} ({_unfinished(d)})")
            elif os.path.isdir(os.path.join(d, ".hydra")):
                failed.append(f"{d} (no summary.json: failed or unfinished)")
    return rows, failed


NOT_ACCOUNTED = "tuning cost not accounted"


def _tuning(root: str, d: str, s: dict) -> dict:
    """How a run was chosen: the selected run of a private search (its tuning.json's eps_incl_tuning), a private run
    of a plain `-m` sweep (a multirun.yaml above it, no tuning.json: "tuning cost not accounted" — choosing among
    its runs is a release their ε does not cover), or a single run."""
    here, stop = os.path.abspath(d), os.path.dirname(os.path.abspath(root))
    while here not in (stop, os.path.dirname(here)):  # the directories above the run, up to root's parent
        here = os.path.dirname(here)
        if os.path.isfile(os.path.join(here, TUNING_FILE)):
            t = json.load(open(os.path.join(here, TUNING_FILE)))
            return {"tuning": f"private search ({t.get('bound')})", "eps_incl_tuning": t.get("eps_incl_tuning")}
        if os.path.isfile(os.path.join(here, "multirun.yaml")):
            return {"tuning": NOT_ACCOUNTED if s.get(key.EPS_SPENT) is not None else "", "eps_incl_tuning": None}
    return {"tuning": "", "eps_incl_tuning": None}


def _failure(path: str) -> str:
    """failed.json in one line: its error and the ε spent before the run stopped."""
    try:
        f = json.load(open(path))
    except (OSError, ValueError) as e:
        return f"failed; unreadable failed.json: {type(e).__name__}"
    eps = f.get(key.EPS_SPENT)
    spent = "non-private" if eps is None else f"eps spent {eps:.4g} at delta {f.get(key.DELTA)}"
    return f"failed: {f.get(key.ERROR)}; {f.get(key.STEP)} steps, {spent}"


def _unfinished(d: str) -> str:
    """status.json without summary.json in one line: how far its last checkpoint got, and how to continue."""
    try:
        st = json.load(open(os.path.join(d, "status.json")))
    except (OSError, ValueError) as e:
        return f"unfinished; unreadable status.json: {type(e).__name__}"
    if st.get(key.STATUS) != "running":
        return f"no summary.json; status.json says {st.get(key.STATUS)}"
    if not st.get("checkpoint"):
        return "unfinished: running, or killed before its first checkpoint (start it again)"
    eps = st.get(key.EPS_SPENT)
    spent = "non-private" if eps is None else f"eps spent {eps:.4g}"
    return (f"unfinished: running, or killed; checkpoint at step {st.get(key.STEP)} of {st.get(key.STEPS)}, "
            f"{spent}; continue with: dptrain resume={d}")


def pivot_md(df, value="test_acc") -> str:
    g = df.groupby(["model", "engine", "eps"], dropna=False)[value]
    cell = g.mean().map(lambda m: f"{m:.4f}").astype(str)
    std, n = g.std(), g.count()
    cell = cell.where(n < 2, cell + " ± " + std.map(lambda s: f"{s:.4f}"))
    table = cell.unstack("eps")
    table.columns = [f"eps={c}" if not pd.isna(c) else "non-private" for c in table.columns]
    return table.reset_index().to_markdown(index=False)


def plot_runs(df, path: str) -> None:
    import matplotlib  # optional: plotting only, and its import is slow

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    fig.suptitle(_title(df), fontsize=9)
    private = df[df.eps.notna()]
    for (model, engine), part in private.groupby(["model", "engine"]):
        m = part.groupby("eps").test_acc.agg(["mean", "std"]).reset_index()
        axes[0].errorbar(m["eps"], m["mean"], yerr=m["std"].fillna(0), marker="o", label=f"{model} / {engine}")
    axes[0].set(xlabel="ε (target)", ylabel="test accuracy", title="test accuracy vs ε", ylim=(0, 1))  # not zoomed
    if len(private):
        axes[0].set_xscale("log")
        axes[0].minorticks_off()  # a log axis over 1..8 labels its minor ticks 2×10⁰, 3×10⁰, ...
        ticks = sorted(private.eps.unique())
        axes[0].set_xticks(ticks, [f"{e:g}" for e in ticks])  # plain labels at the ε values run
        axes[0].legend(fontsize=7)
    per = df.groupby("engine")[["step_ms", "peak_mem_mb"]].mean()
    axes[1].bar(per.index, per["step_ms"])
    axes[1].set(ylabel="median step (ms)", title="time and memory per engine")
    ax2 = axes[1].twinx()
    ax2.plot(per.index, per["peak_mem_mb"], "o", color="tab:red")  # engines are categories: no joining line
    ax2.set_ylabel("peak memory (MB)", color="tab:red")
    ax2.set_ylim(bottom=0)  # from 0, as the bars: an axis from 1270 MB made 1% look like 10×
    axes[1].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _title(df) -> str:
    """What the runs were: dataset(s), δ and epochs (each listed when the runs differ), and how many runs."""
    def values(col, fmt="{}"):
        vals = sorted({v for v in df[col].dropna()}) if col in df else []
        return ", ".join(fmt.format(v) for v in vals) or "?"

    return (f"{values('dataset')}; δ = {values('delta', '{:.3g}')}; {values('epochs', '{:g}')} epochs; "
            f"{len(df)} run(s)")


def beside(paths: list[str]) -> str:
    """The folder that holds all `paths` (a sweep's own folder for one sweep): where a report goes by default."""
    common = os.path.commonpath([os.path.abspath(p) for p in paths])
    return os.path.relpath(common) if not any(os.path.isabs(p) for p in paths) else common


def eps_together(df, failed: list[str]) -> dict:
    """The ε of all the runs together: every mechanism of every run's ledger (history_of) composed as if all ran on
    the same examples — the cost of a search made by hand (its validation runs and the run it chose) or of a table's
    seeds. A bound, never an estimate: a run on a subset of the examples (dataset.val_fraction) is counted as if on all.
    The runs' own accountant when they share one that composes mixed mechanisms, else prv. Composition of mechanisms
    fixed in advance: when a run's σ or steps were chosen from another run's release, the bound that holds composes
    the worst candidate's RDP curve instead (scripts/tuning_cost.py); the printed line says so. Composition also needs
    independent noise: two runs at one seed without privacy.secure are refused (`independent`)."""
    if failed:  # their ε is spent too, and their ledgers are incomplete: fail closed
        raise UserError(f"--together: {len(failed)} failed or unfinished run(s) spent ε too ({failed[0]}); finish "
                        "them (dptrain resume=<run dir>) or report without them")
    if df.eps_incl_tuning.notna().any():  # its summary is one trial's: the search's cost is its RDP bound
        raise UserError("--together cannot compose the selected run of a private search (hparams_search=private): "
                        "its ε including tuning is in its sweep's tuning.json; report it separately")
    if df.eps_spent.isna().any():
        names = ", ".join(df[df.eps_spent.isna()].run_dir)
        raise UserError(f"--together: non-private run(s) among them ({names}): their ε is infinite; leave them out")
    same = {"dataset": df.dataset.astype(str).str.removesuffix(key.VAL_SUFFIX), "delta": df.delta}  # -val: a split
    for col, values in same.items():
        if values.nunique(dropna=False) > 1:
            raise UserError(f"--together composes runs on the same examples at one δ; these runs have {col} "
                            f"{', '.join(map(str, sorted(set(values), key=str)))}: report them separately")
    accountants = set(df.accountant)
    accountant = accountants.pop() if len(accountants) == 1 and "gdp" not in accountants else "prv"
    summaries = {d: json.load(open(os.path.join(d, "summary.json"))) for d in df.run_dir}
    independent(summaries, what="--together")
    history = []
    for d, s in summaries.items():
        if not s.get(key.LEDGER):  # a summary from before the privacy ledger: its mechanisms are not all written
            raise UserError(f"--together: {d} has no privacy/ledger (a run older than the ledger): its mechanisms "
                            "cannot be composed; rerun it or report without it")
        history += history_of(s)
    delta = float(df.delta.iloc[0])
    return {"eps": epsilon_of(history, delta=delta, accountant=accountant), "delta": delta, "accountant": accountant,
            "runs": len(df), "sum": float(df.eps_spent.sum())}


def independent(summaries: dict[str, dict], *, what: str) -> None:
    """Composition needs each run's noise independent of the others'. Without privacy.secure every stream comes from
    `seed` (privacy/streams.py), so two runs at one seed draw the SAME noise: the difference of their releases (two
    validation accuracies, two first steps) is noise-free, and no composed ε bounds it. Fail closed on such a pair."""
    seen = {}
    for d, s in summaries.items():
        if s.get(key.SECURE) or s.get(key.SECURE_NOISE):  # OS entropy on every draw: independent of every run
            continue
        seed = (s.get(key.CONFIG) or {}).get("seed")
        if seed in seen:
            raise UserError(f"{what}: {seen[seed]} and {d} both ran at seed {seed} without privacy.secure, so they "
                            "drew the same noise and the difference of their releases is noise-free: no composed ε "
                            "covers them. Give each run its own seed (seed=<n>) or privacy.secure=true, and rerun")
        seen[seed] = d


def report(paths: list[str], *, table: str | None = None, out: str | None = None, together: bool = False) -> dict:
    rows, failed = collect(paths)
    if not rows:
        raise UserError(f"no summary.json under {', '.join(paths)}"
                         + (f"; failed/unfinished: {', '.join(failed)}" if failed else ""))
    df = pd.DataFrame(rows)
    joint = eps_together(df, failed) if together else None
    if not table:  # the runs' own name (a sweep's table), else "runs"
        table = df["name"].dropna().iloc[0] if df["name"].notna().any() else "runs"
    out = out or beside(paths)
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, table)
    df.to_csv(base + ".csv", index=False)
    with open(base + ".md", "w") as f:
        f.write(f"# {table}\n\n{len(df)} runs; commit(s) {', '.join(sorted(set(map(str, df.commit))))}; "
                f"machine(s) {', '.join(sorted(set(map(str, df.machine))))}\n\n")
        seeds = df.groupby(["model", "engine", "eps"], dropna=False).size().max()
        f.write(_labels(df))  # what the ε columns leave out, before any number
        f.write(f"## test accuracy ({'mean ± std over seeds' if seeds > 1 else 'one run per cell'})\n\n"
                + pivot_md(df) + "\n\n")
        f.write("## ε spent\n\n" + pivot_md(df, "eps_spent") + "\n\n")
        if df.eps_incl_tuning.notna().any():
            f.write("## ε including tuning\n\n" + pivot_md(df, "eps_incl_tuning") + "\n\n")
        if joint:
            f.write("## ε of these runs together\n\n" + _together_line(joint) + "\n\n")
        f.write("## runs\n\n" + df.drop(columns=["machine", "run_dir"]).to_markdown(index=False, floatfmt=".4g")
                + "\n")
        if failed:
            f.write("\n## failed or unfinished\n\n" + "\n".join(f"- {x}" for x in failed) + "\n")
    plot_runs(df, base + ".png")
    return {"csv": base + ".csv", "md": base + ".md", "png": base + ".png", "runs": len(df), "failed": failed,
            "notes": lines(df) + ([_together_line(joint)] if joint else []), "together": joint}


def _together_line(j: dict) -> str:
    return (f"ε of the {j['runs']} runs together: {j['eps']:.4g} at δ {j['delta']:.3g} (every run's ledger composed "
            f"by {j['accountant']}, as if all ran on the same examples; naive composition: the sum of their ε, "
            f"{j['sum']:.4g}, at δ {j['runs'] * j['delta']:.3g}). It holds for runs with independent noise (each "
            "its own seed, or privacy.secure) and settings fixed before the runs; a run whose settings were chosen "
            "from the others' results needs the worst candidate's RDP curve "
            "(scripts/tuning_cost.py).")


def _labels(df) -> str:
    """The md's notes on what the ε columns leave out: a plain sweep's choice, nonprivate metric releases."""
    out = []
    plain = df[df.tuning == NOT_ACCOUNTED]
    if len(plain):
        out.append(f"**{NOT_ACCOUNTED}**: {len(plain)} private runs of a plain `-m` sweep; choosing among them "
                   "releases more than their ε covers (Papernot & Steinke 2022): use hparams_search=private, or "
                   "`dptrain-report --together` for all of them composed (each run at its own seed, or "
                   "privacy.secure=true).")
    searched = df[df.eps_incl_tuning.notna()]
    for _, r in searched.iterrows():
        out.append(f"selected run of a private search: {r.run_dir} — eps {r.eps_spent:.4g}, eps_incl_tuning "
                   f"{r.eps_incl_tuning:.4g} ({r.tuning}).")
    excl = df[df.eps_excludes.astype(bool)]
    for what in sorted(set(excl.eps_excludes)):
        out.append(f"ε excludes {what}: {int((excl.eps_excludes == what).sum())} run(s) (log.*=nonprivate).")
    return "".join(f"{line}\n\n" for line in out)


def lines(df) -> list[str]:
    """What dptrain-report prints about the ε of the runs, beside the files (the md's notes)."""
    return [line for line in _labels(df).split("\n\n") if line]
