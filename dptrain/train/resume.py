"""Resuming a run (`dptrain resume=<run dir>`): which run directory may be continued, with which config, on how
many processes and which device. The checkpoint's writing and the objects' restoring: checkpoint.py.

A resumed run runs its saved config; overrides other than HARMLESS ones are refused unless they equal the saved
value (`resume_config`, then `load`). It continues in the same directory, on the world size and device type that
wrote the checkpoint, with the budget it started with (`resumed_budget`)."""

from __future__ import annotations

import json
import logging
import os
import socket

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from dptrain.config import TrainConfig
from dptrain.errors import UserError
from dptrain.train.budget import Budget
from dptrain.train.outputs import git_commit

log = logging.getLogger("dptrain")

FILE, STATUS_FILE = "checkpoint.pt", "status.json"
FORMAT = 1  # checkpoint.pt's layout; a checkpoint of another format is refused
# overrides that `resume=` accepts with a new value (a key, or a group whose keys all qualify): they change
# neither the privacy nor the result. Any other override must equal the saved value.
HARMLESS = ("resume", "progress", "logger", "checkpoint", "dataset.num_workers", "keep_freed_memory",
           "keep_freed_memory_max_gb")
_MISSING = object()


def resume_config(cfg, overrides: list[str]):
    """The config of the run in `cfg.resume` (its checkpoint's), with the command line's HARMLESS overrides
    applied; any other override that would change a saved value is refused in one line."""
    run_dir = str(cfg.resume)
    saved = _read(run_dir, mmap=True)["config"]
    try:
        out = OmegaConf.merge(OmegaConf.structured(TrainConfig), saved)
    except Exception as e:  # a checkpoint of another dptrain version
        raise UserError(f"resume={run_dir}: its saved config does not fit this dptrain's ({type(e).__name__}: "
                        f"{_first_line(e)})") from None
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        k = o.key_or_group
        if k.startswith("hydra"):
            continue
        new = OmegaConf.select(cfg, k, default=_MISSING)
        if _harmless(k) and new is not _MISSING:
            OmegaConf.update(out, k, new, merge=False)
            continue
        old = OmegaConf.select(out, k, default=_MISSING)
        if new is _MISSING or old is _MISSING:
            why = f"{k} is not one of its keys"
        elif _plain(new) != _plain(old):
            path, a, b = _difference(k, _plain(new), _plain(old))
            why = f"{path}={b}, not {a}"
        else:
            continue
        raise UserError(f"resume={run_dir}: refusing {o.input_line}: a resumed run keeps its saved config ({why}), "
                        f"as a change could change its privacy or its result; allowed: {', '.join(HARMLESS[1:])}")
    out.resume = run_dir
    return out


def load(cfg, *, world_size: int = 1) -> dict:
    """The checkpoint `cfg.resume` continues from, after checking that run may be continued with `cfg` on
    `world_size` processes (torchrun's; 1 without it). Under torchrun rank 0 calls it and sends the state to the
    others (run._prepare)."""
    run_dir = str(cfg.resume)
    state = _read(run_dir, mmap=False)
    check_world_size(state, world_size, run_dir)
    saved, now = _comparable(state["config"]), _comparable(OmegaConf.to_container(cfg, resolve=True))
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if changed:
        k = changed[0]
        raise UserError(f"resume={run_dir}: {k}={now.get(k)} differs from the run's saved {k}={saved.get(k)}; a "
                        f"resumed run keeps its saved config (allowed to change: {', '.join(HARMLESS[1:])})")
    if state["commit"] != git_commit():
        log.warning("resume: the checkpoint was written by commit %s, this is %s; the result is bit-identical to an "
                    "uninterrupted run only with the same code", state["commit"], git_commit())
    return state


def check_world_size(state: dict, world_size: int, run_dir: str) -> None:
    """A checkpoint continues on as many processes as wrote it: each process's random streams (its noise chunks,
    its dropout and augmentation generators) and running sums are its own, and another count would deal the
    shards, the noise chunks and the streams out differently — private still, but not the run that was started.
    Refused in one line."""
    saved = int(state.get("world_size", 1))  # a checkpoint without the key: one process (they all were, then)
    if saved != world_size:
        again = (f"dptrain resume={run_dir}" if saved == 1 else
                 f"torchrun with {saved} processes in all (--nproc_per_node x --nnodes): -m dptrain resume={run_dir}")
        raise UserError(f"resume={run_dir}: its checkpoint was written by {saved} process(es), this run has "
                        f"{world_size}; each process's random streams and running sums are its own, so continue it "
                        f"on as many: {again}")


def check_device(state: dict, device: str | None, run_dir: str) -> None:
    """A checkpoint continues on the device type that wrote it (cpu, cuda): its noise generators, torch's and the
    engine's, are device generators whose states do not carry to another device's (a CPU Mersenne Twister, a CUDA
    Philox counter), so a run resumed elsewhere (device=auto on a machine that now has, or lacks, CUDA) would draw
    fresh streams — not the run that was started. Refused in one line. A checkpoint without the key: its noise
    generators' devices say it."""
    saved = state.get("device") or next((torch.device(d).type for d in state.get("engine", {}).get("noise", {})),
                                        None)
    if saved is None or device is None or saved == device:
        return
    how = (f"CUDA_VISIBLE_DEVICES= dptrain resume={run_dir} (CUDA hidden: device=auto is then cpu)" if saved == "cpu"
           else f"dptrain resume={run_dir} on a machine with CUDA")
    raise UserError(f"resume={run_dir}: its checkpoint was written on {saved}, this run is on {device}; its random "
                    f"streams (noise, dropout) are {saved} generators that do not carry to {device}, so continue it "
                    f"there: {how}")


def _harmless(k: str) -> bool:
    return any(k == h or k.startswith(h + ".") for h in HARMLESS)


def _difference(k: str, new, old) -> tuple[str, object, object]:
    """The first leaf where two values differ: (dotted key, new, old)."""
    if isinstance(new, dict) and isinstance(old, dict):
        for sub in sorted(new.keys() | old.keys()):
            if new.get(sub) != old.get(sub):
                return _difference(f"{k}.{sub}", new.get(sub), old.get(sub))
    return k, new, old


def _plain(v):
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def _comparable(config: dict) -> dict:
    """The config's values by dotted key, the HARMLESS ones left out."""
    flat = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict) and v and k not in ("kwargs",):
                walk(v, f"{prefix}{k}.")
            elif not _harmless(prefix + k):
                flat[prefix + k] = v

    walk(config, "")
    return flat


def _read(run_dir: str, *, mmap: bool) -> dict:
    """checkpoint.pt of `run_dir`, if that run may be resumed: it exists, did not finish or fail, and is not
    running now on this machine."""
    if not os.path.isdir(run_dir):
        raise UserError(f"resume={run_dir}: not a directory")
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        raise UserError(f"resume={run_dir}: that run finished (summary.json); nothing to resume")
    if os.path.exists(os.path.join(run_dir, "failed.json")):
        raise UserError(f"resume={run_dir}: that run failed (failed.json); resumed, it would diverge again")
    status = read_status(run_dir) or {}
    if status.get("host") == socket.gethostname() and status.get("pid") != os.getpid() and _alive(status.get("pid")):
        raise UserError(f"resume={run_dir}: that run is still running (pid {status['pid']} on this machine); "
                        "stop it first")
    path = os.path.join(run_dir, FILE)
    if not os.path.isfile(path):
        raise UserError(f"resume={run_dir}: no {FILE} there (the run stopped before its first checkpoint, or "
                        "ran with checkpoint.every_s=0); start it again")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # any unreadable file is the same one-line error
        raise UserError(f"resume={run_dir}: unreadable {FILE} ({type(e).__name__}: {_first_line(e)})") from None
    if state.get("format") != FORMAT:
        raise UserError(f"resume={run_dir}: {FILE} has format {state.get('format')}, this dptrain reads {FORMAT}")
    return state


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_status(run_dir: str) -> dict | None:
    try:
        with open(os.path.join(run_dir, STATUS_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def resumed_budget(state: dict, *, n: int, batch_size: int) -> Budget:
    """The budget the run started with (validated then, from the same config), not a new calibration: its σ
    was used for the steps taken, and an accountant of another version could calibrate another. The training
    set must still have the n examples its sample rate q = L/n was computed for."""
    b = state["budget"]
    saved = Budget(**{**b, "prior": tuple(tuple(m) for m in b.get("prior", ())),
                      "evaluated": tuple(b.get("evaluated", ())), "excludes": tuple(b.get("excludes", ()))})
    if saved.sample_rate != batch_size / n:
        raise UserError(f"resume: the training set now has n={n} examples, giving q={batch_size / n:.6g}; the run's "
                        f"q={saved.sample_rate:.6g} (its data changed)")
    return saved
