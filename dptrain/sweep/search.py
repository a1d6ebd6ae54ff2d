"""`dptrain -m hparams_search=private ...`: the private random search of tuning.py as a Hydra sweeper
(hydra_plugins/dptrain_private_sweeper, configured by conf/hydra/sweeper/dptrain_private.yaml).

It draws K (OS entropy), runs K trials — each a full dptrain run with hyperparameters drawn from `params` and its own
OS-drawn seed — with the console and logging silenced (a trial's line would reveal K), keeps only the best trial
(highest return value: test/acc, the held-out split's under dataset.val_fraction > 0) as <sweep dir>/selected,
deletes the others, and writes <sweep dir>/tuning.json with ε including the tuning (tuning.eps_incl_tuning).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Transformer
from hydra.core.utils import JobStatus
from omegaconf import OmegaConf

from dptrain import keys as key
from dptrain.errors import UserError
from dptrain.privacy.accounting import epsilon_of
from dptrain.sweep.tuning import DISTRIBUTIONS, check_space, draw_trials, eps_incl_tuning, os_rng
from dptrain.train.ledger import history_of

TUNING_FILE = "tuning.json"


def parse_space(params: dict | None) -> dict:
    """params (key → Hydra sweep syntax: `a,b,c`, choice(...), range(...), interval(a, b), tag(log, interval(a, b)))
    → key → a function of a numpy generator returning the value's override string."""
    space = {}
    for override in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in (params or {}).items()]):
        space[override.get_key_element()] = _sampler(override)
    check_space(space)
    return space


def _sampler(override):
    key = override.get_key_element()
    if not override.is_sweep_override():
        value = override.get_value_element_as_str()
        return lambda rng: value
    if override.is_choice_sweep() or override.is_range_sweep():
        values = [str(x) for x in override.sweep_iterator(transformer=Transformer.encode)]
        return lambda rng: values[int(rng.integers(len(values)))]
    if override.is_interval_sweep():
        v = override.value()
        lo, hi, log = float(v.start), float(v.end), "log" in v.tags
        if log and lo <= 0:
            raise UserError(f"hydra.sweeper.params.{key}: a log interval needs a start > 0, got {lo}")
        return lambda rng: repr(float(math.exp(rng.uniform(math.log(lo), math.log(hi))) if log else
                                      rng.uniform(lo, hi)))
    raise UserError(f"hydra.sweeper.params.{key}: unsupported sweep '{override.input_line}'")


def check_settings(distribution: str, mean: float, shape: float) -> None:
    if distribution not in DISTRIBUTIONS:
        raise UserError(f"unknown hydra.sweeper.distribution '{distribution}'; valid: {', '.join(DISTRIBUTIONS)}")
    if not (isinstance(mean, (int, float)) and math.isfinite(mean) and mean >= 1):
        raise UserError(f"hydra.sweeper.mean must be >= 1 and finite, got {mean}")
    if distribution != "poisson" and not (isinstance(shape, (int, float)) and 0 <= shape < math.inf):
        raise UserError(f"hydra.sweeper.shape (η of the truncated negative binomial) must be >= 0, got {shape}")


_NULL = []  # one devnull stream for the process, never closed: a trial's log handlers may keep it after the trial


@contextlib.contextmanager
def silenced():
    """The trials' console lines and log records go nowhere: each would tell how many trials ran."""
    if not _NULL:
        _NULL.append(open(os.devnull, "w"))  # noqa: SIM115 - kept open on purpose (above)
    null = _NULL[0]
    with contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def run_trials(launcher, arguments: list[str], space: dict, k: int) -> list[tuple]:
    """K trials, one at a time: [(score or None, run dir or None)] — a failed trial scores None."""
    rng, out = os_rng(), []
    for _ in range(k):
        seed = int.from_bytes(os.urandom(8), "little") >> 2  # each trial its own noise and sampler streams
        # job number 0 and a random directory for every trial: the selected run's files never say which trial it was
        overrides = [*arguments, *(f"{key}={draw(rng)}" for key, draw in space.items()), f"seed={seed}",
                     f"hydra.sweep.subdir=trial-{os.urandom(8).hex()}"]
        try:
            with silenced():
                ret = launcher.launch([overrides], initial_job_idx=0)[0]
        except (Exception, SystemExit):  # a trial that fails outputs nothing (⊥), never stops the search
            out.append((None, None))
            continue
        ok = ret.status == JobStatus.COMPLETED and isinstance(ret._return_value, (int, float))
        out.append((float(ret._return_value) if ok else None, str(ret.hydra_cfg.hydra.runtime.output_dir)
                    if ret.hydra_cfg is not None else None))
    return out


def select(sweep_dir: Path, results: list[tuple]) -> Path | None:
    """Keep the best trial as sweep_dir/selected (the first of equals), delete every other trial's directory."""
    scored = [(s, d) for s, d in results if s is not None and d is not None]
    best = max(scored, key=lambda r: r[0])[1] if scored else None
    for _, d in results:
        if d is not None and d != best and os.path.isdir(d):
            shutil.rmtree(d)
    if best is None:
        return None
    target = sweep_dir / "selected"
    os.replace(best, target)
    return target


def record(sweep_dir: Path, selected: Path | None, *, distribution: str, mean: float, shape: float,
           params: dict) -> dict:
    """tuning.json: the search's settings, the selected run and ε including the tuning (never K)."""
    info = {"hparams_search": "private", "distribution": distribution, "mean": mean,
            "shape": shape if distribution != "poisson" else None, "params": dict(params or {}),
            "bound": "Papernot & Steinke 2022, " + ("Theorem 6" if distribution == "poisson" else "Theorem 2"),
            "selected": None, "eps": None, "delta": None, "eps_incl_tuning": None, "order": None}
    if selected is not None:
        s = json.loads((selected / "summary.json").read_text())
        frac = (s.get(key.CONFIG) or {}).get("dataset", {}).get("val_fraction", 0)
        info.update(selected=selected.name, score=s[key.TEST_ACC], eps=s[key.EPS_SPENT], delta=s[key.DELTA],
                    selected_on=f"held-out split of the private set (dataset.val_fraction={frac}; its reads are in "
                    "each trial's ledger)" if frac else "the test split, read by every trial: the selected run's "
                    "test accuracy is optimistic (select on dataset.val_fraction > 0)")
        if s[key.EPS_SPENT] is not None:
            eps, order = eps_incl_tuning(history_of(s), delta=s[key.DELTA], distribution=distribution, mean=mean,
                                         shape=shape or 0.0)
            # one trial's ε by RDP too: the bound goes through RDP, which is looser than PRV by itself
            info.update(eps_incl_tuning=eps, order=order, eps_trial_rdp=epsilon_of(history_of(s), delta=s[key.DELTA],
                                                                                   accountant="rdp"))
    (sweep_dir / TUNING_FILE).write_text(json.dumps(info, indent=2))
    return info


def search(sweeper, arguments: list[str]) -> dict:
    """The sweeper's sweep(): draw K, run the trials, select, record, print one summary line."""
    try:
        check_settings(sweeper.distribution, sweeper.mean, sweeper.shape)
        if any(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(arguments)):
            raise UserError("hparams_search=private draws values from hydra.sweeper.params: give the searched keys "
                            "there, not as comma lists on the command line")
        space = parse_space(sweeper.params)
    except UserError as e:
        print(f"dptrain: error: {e}", file=sys.stderr)
        sys.exit(2)
    sweep_dir = Path(sweeper.config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(sweeper.config, sweep_dir / "multirun.yaml")
    k = draw_trials(sweeper.distribution, sweeper.mean, sweeper.shape)
    selected = select(sweep_dir, run_trials(sweeper.launcher, arguments, space, k))
    info = record(sweep_dir, selected, distribution=sweeper.distribution, mean=sweeper.mean, shape=sweeper.shape,
                  params=sweeper.params)
    print(summary_line(info, sweep_dir))
    return info


def summary_line(info: dict, sweep_dir) -> str:
    if info["selected"] is None:
        return f"private search: no trial released (none drawn, or none finished); {sweep_dir}/{TUNING_FILE}"
    eps = "non-private" if info["eps"] is None else (
        f"eps {info['eps']:.3f}, eps incl. tuning {info['eps_incl_tuning']:.3f} (delta {info['delta']:.3g}, "
        f"{info['bound']})")
    return f"private search: selected {sweep_dir}/{info['selected']}: test acc {info['score']:.4f} | {eps}"
