"""The command line's contract, kept before Hydra runs: a bad command line is ONE line `<prog>: error: ...` on
stderr and exit 2, and leaves nothing on disk. Hydra composes the config again afterwards (the engine stays Hydra);
this module composes it first with Hydra's compose API, so that Hydra's own multi-line composition errors (an
unknown group option, an unknown key, a value of the wrong type) become one line, and a refused run never gets the
run directory that @hydra.main creates before calling the task."""

from __future__ import annotations

import difflib
import logging
import os
import sys
import time

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from dptrain.errors import UserError
from dptrain.train.rundir import Claim

# argv tokens that keep Hydra's own behaviour (help pages, --cfg, --info, ...): no pre-composition then
_RUN_FLAGS = {"--multirun", "-m"}


def overrides_of(argv: list[str]) -> tuple[list[str], bool] | None:
    """(overrides, multirun) of a command line that runs, or None when it has a flag other than --multirun/-m
    (Hydra's --cfg, --info, -cp, ...: those print or redirect, and Hydra checks them itself)."""
    if any(a.startswith("-") and a not in _RUN_FLAGS for a in argv):
        return None
    return [a for a in argv if a not in _RUN_FLAGS], any(a in _RUN_FLAGS for a in argv)


def compose(conf_dir: str, config_name: str, overrides: list[str], *, multirun: bool = False):
    """The composed configs (hydra node included) of `overrides`, or a one-line UserError. With --multirun, each
    value of a choice sweep (`eps=1,3`) is composed with the other overrides' first values; interval sweeps
    (optuna's) are left to the sweeper."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        variants = [list(overrides)]
        if multirun:
            variants = _sweep_variants(parsed)
        return [_compose(conf_dir, config_name, v) for v in variants]
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(one_line(e, conf_dir=conf_dir, config_name=config_name)) from None


def _sweep_variants(parsed) -> list[list[str]]:
    base, sweeps = [], []
    for o in parsed:
        if not o.is_sweep_override():
            base.append(o.input_line)
        elif o.is_discrete_sweep():
            values = list(o.sweep_string_iterator())
            base.append(f"{o.get_key_element()}={values[0]}")
            sweeps += [(len(base) - 1, f"{o.get_key_element()}={v}") for v in values[1:]]
    out = [base]
    for i, line in sweeps:
        out.append(base[:i] + [line] + base[i + 1:])
    return out


def _compose(conf_dir: str, config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides, return_hydra_config=True)


def one_line(e: Exception, *, conf_dir: str = "", config_name: str = "train") -> str:
    """Hydra's and OmegaConf's composition errors as the sentence a user needs, on one line."""
    cause = e.__cause__ or e.__context__
    if isinstance(e, MissingConfigException) and e.options is not None and e.missing_cfg_file:
        group, _, name = e.missing_cfg_file.rpartition("/")
        hint = f"; any timm model: model=timm model.name={name}" if group == "model" else ""
        return f"unknown {group} '{name}'; valid: {', '.join(sorted(e.options))}{hint}"
    missing = (ConfigKeyError, ConfigAttributeError)
    if isinstance(cause, missing) or (isinstance(e, missing) and (cause := e)):
        key = getattr(cause, "full_key", None) or _quoted(str(e))
        return unknown_key(key, conf_dir=conf_dir, config_name=config_name)
    if isinstance(cause, ValidationError) or (isinstance(e, ValidationError) and (cause := e)):
        return _bad_value(cause)
    if isinstance(e, OverrideParseException):  # the grammar's complaint, without its link to Hydra's docs
        return f"cannot parse '{e.override}': {str(e.message).splitlines()[0]} (quote a value with spaces or brackets)"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]
    return "; ".join(lines) or type(e).__name__


def unknown_key(key: str, *, conf_dir: str, config_name: str) -> str:
    """`engine.max_grad_norm` → "did you mean 'max_grad_norm'?": the nearest key anywhere in the config, the same
    leaf name in another node first (Hydra's own hint, `+engine.max_grad_norm`, would add a key nothing reads)."""
    keys = _known_keys(conf_dir, config_name)
    leaf = key.rpartition(".")[2]
    same_leaf = [k for k in keys if k.rpartition(".")[2] == leaf]
    near = same_leaf or difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return f"unknown config key '{key}'" + (f"; did you mean '{near[0]}'?" if near else
                                           "; `dptrain --help` lists the knobs")


def _known_keys(conf_dir: str, config_name: str) -> list[str]:
    try:
        cfg = _compose(conf_dir, config_name, [])
    except Exception:  # noqa: BLE001 - a suggestion is optional
        return []
    out = []

    def walk(node, prefix):
        for k, v in node.items():
            if k == "hydra":
                continue
            if OmegaConf.is_dict(v) and len(v):
                walk(v, f"{prefix}{k}.")
            out.append(prefix + str(k))

    walk(cfg, "")
    return out


def _bad_value(e) -> str:
    msg = str(e).splitlines()[0]
    key = getattr(e, "full_key", "") or "value"
    if "could not be converted to" in msg:  # "Value 'abc' of type 'str' could not be converted to Float"
        want = msg.rsplit(" ", 1)[-1].lower()
        want = {"float": "a number", "integer": "an integer", "boolean": "true or false"}.get(want, want)
        value = msg.split("'")[1] if msg.count("'") >= 2 else "?"
        return f"{key} must be {want}, got '{value}'"
    return f"{key}: {msg}"


def _quoted(s: str) -> str:
    return s.split("'")[1] if s.count("'") >= 2 else s


def fail(prog: str, message: str, *, code: int = 2):
    """The one line on stderr and the exit code; nothing on stdout. Under torchrun only rank 0 says it (every
    rank meets the same command line); the others wait a moment first, as torchrun stops every worker as soon as
    one exits, and rank 0's line would be lost if another rank's exit came first."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(2.0)
    sys.exit(code)


def start(prog: str, conf_dir: str, config_name: str, check) -> Claim | None:
    """Before @hydra.main: compose the command line, `check(cfg)` it (no torch needed), then claim the run
    directory (rundir.py) and pin it on the command line — its name holds a timestamp that Hydra would otherwise
    resolve again, a second later perhaps. A mistake: the one line and exit 2, nothing on disk. None when Hydra
    is to print something (--help, --cfg), under --multirun (each job's directory is claimed in the task) and on
    torchrun ranks > 0 (rank 0 owns the run directory)."""
    parsed = overrides_of(sys.argv[1:])
    if parsed is None:
        return None
    overrides, multirun = parsed
    try:
        cfgs = compose(conf_dir, config_name, overrides, multirun=multirun)
        for cfg in cfgs:
            check(cfg)
        cfg = cfgs[0]
        if multirun or int(os.environ.get("RANK", "0")) != 0:
            return None
        run_dir = str(cfg.hydra.run.dir)
        claim = Claim(run_dir)
    except UserError as e:
        fail(prog, str(e))
    sys.argv.append("hydra.run.dir='" + run_dir.replace("\\", "\\\\").replace("'", "\\'") + "'")
    return claim


def run(main, claim: Claim | None) -> None:
    """Hydra's task under the claim: a refusal (exit 2 before the run wrote anything) leaves no trace."""
    try:
        main()
    except SystemExit as e:
        if claim is not None and e.code == 2:
            claim.refused()
        raise
    finally:
        if claim is not None:
            claim.release()


def without_hydra(cfg):
    """The composed config less its `hydra` node, as the task function receives it."""
    out = cfg.copy()
    with open_dict(out):
        out.pop("hydra", None)
    return out


def log_to_files(logger, message: str) -> None:
    """`message` as an ERROR in the run's log files only (cli.log): the terminal already has its one line."""
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, None, None)
    for h in logging.getLogger().handlers + logger.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)
