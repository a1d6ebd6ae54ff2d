"""What a run leaves behind: summary.json, metrics.jsonl, optional wandb, and the progress bar."""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import platform
import resource
import subprocess
import sys

import torch

from dptrain import keys as key
from dptrain.errors import check_name

LOGGERS = ("none", "wandb")


def git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_state() -> dict:
    """summary.json's provenance: the HEAD commit, whether the tracked files (or untracked, not ignored files in
    the package and conf/) differ from it, and the sha256 of `git diff HEAD` (the same hash: the same edits).
    None each outside a git checkout."""
    commit, dirty, digest = git_commit(), None, None
    if commit is not None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        try:
            diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=root, capture_output=True, timeout=30).stdout
            new = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--", "dptrain", "conf"],
                                 cwd=root, capture_output=True, timeout=30).stdout
            dirty, digest = bool(diff or new.strip()), hashlib.sha256(diff).hexdigest()
        except (OSError, subprocess.SubprocessError):
            pass
    return {key.COMMIT: commit, key.COMMIT_DIRTY: dirty, key.COMMIT_DIFF: digest}


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.machine()} CPU x{os.cpu_count()}, {platform.system()}, torch {torch.__version__}"


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring a new run's peak (peak_memory_mb): a multirun sweep runs its jobs in one process, whose
    lifetime peak would otherwise be every later job's. CUDA: the allocator's peak statistics; Linux: the RSS
    high-water mark (VmHWM), reset to the current RSS by writing 5 to /proc/self/clear_refs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: peak_memory_mb falls back to the process's lifetime peak
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA; on CPU the peak resident set size since reset_peak_memory (Linux's
    VmHWM), else the process's lifetime peak (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def atomic_write(path: str, write) -> None:
    """write(binary file) into path.tmp, flushed to disk, then renamed over `path`: a reader, or a run killed at
    any instant, sees the old file or the new one, never a part."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself
        finally:
            os.close(fd)
    except OSError:
        pass


def write_json(path: str, obj: dict) -> None:
    text = json.dumps({k: _clean(v) for k, v in obj.items()}, indent=2, default=str)
    atomic_write(path, lambda f: f.write(text.encode()))


def wandb_sync_hint(run_dir: str) -> str | None:
    """The command that uploads the run's offline wandb runs (one per part of a resumed run), or None if none."""
    runs = sorted(glob.glob(os.path.join(glob.escape(run_dir), "wandb", "offline-run-*")))
    return f"wandb: offline run; upload it with: wandb sync {' '.join(runs)}" if runs else None


class Tracker:
    """metrics.jsonl (one line per epoch) and, with logger=wandb, the same metrics to Weights & Biases —
    offline unless WANDB_MODE or logger.mode says otherwise (no account needed)."""

    def __init__(self, run_dir: str, *, logger: str = "none", project: str = "dptrain", mode: str = "offline",
                 config: dict | None = None, name: str | None = None):
        self.run_dir = run_dir
        self.metrics = os.path.join(run_dir, "metrics.jsonl")
        self.wandb = None
        check_name("logger", logger, LOGGERS)
        if logger == "wandb":
            import wandb  # optional: only with logger=wandb

            os.environ.setdefault("WANDB_MODE", mode)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=project, name=name, config=config, dir=run_dir, reinit="finish_previous")

    def log(self, row: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        if self.wandb is not None:
            self.wandb.log(row)

    def fail(self, record: dict) -> str:
        """failed.json instead of summary.json (dptrain-report lists the run as failed); returns its path."""
        path = os.path.join(self.run_dir, "failed.json")
        write_json(path, record)
        if self.wandb is not None:
            self.wandb.summary[key.ERROR] = record.get(key.ERROR)
            self.wandb.finish(exit_code=1)
        return path

    def finish(self, summary: dict) -> None:
        write_json(os.path.join(self.run_dir, "summary.json"), summary)
        if self.wandb is not None:
            for k, v in summary.items():
                if isinstance(v, (int, float, str)) or v is None:
                    self.wandb.summary[k] = v
            self.wandb.finish()


class NullTracker:
    """A data-parallel rank other than 0: rank 0's Tracker writes the run's files; this one writes nothing."""

    def log(self, row: dict) -> None:
        pass

    def fail(self, record: dict) -> str:
        return "rank 0's run directory"

    def finish(self, summary: dict) -> None:
        pass
