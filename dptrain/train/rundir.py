"""A run directory belongs to one live process: `claim` takes an exclusive flock on <run dir>/.lock (the pid
inside, for the error message) before Hydra writes its .hydra/ and log there. The kernel drops the lock when the
process dies — a killed run never leaves a stale lock — so a second dptrain in the same directory (the same
hydra.run.dir, two resumes of one run) is refused in one line, instead of interleaving metrics.jsonl and
overwriting model.pt. A refused run (`Claim.refused`) leaves the directory as it found it."""

from __future__ import annotations

import fcntl
import os
import shutil

from dptrain.errors import UserError

LOCK = ".lock"
# what Hydra writes before the task runs: its config copies (.hydra/, a resume's .hydra/resume-<date>/) and the
# job's log. Anything else new in the directory means the run itself started writing (status.json, ...)
_HYDRAS = {".hydra", LOCK}


class Claim:
    def __init__(self, path: str):
        self.path = path
        self.created = _missing_ancestors(path)  # the directories this claim made, deepest first
        os.makedirs(path, exist_ok=True)
        self.before = _snapshot(path)
        self._fd = _lock(os.path.join(path, LOCK))
        if self._fd is None:  # the directory is the other process's: nothing here is undone
            pid = _read_pid(os.path.join(path, LOCK))
            raise UserError(f"run directory {path} is in use by another dptrain process (pid {pid}); wait for it to "
                            "end, or choose another directory (hydra.run.dir=...)")
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def refused(self) -> None:
        """The run stopped before writing anything of its own (a one-line refusal): remove what this command added
        — the whole directory if it made it, else Hydra's new .hydra/ entries and log lines."""
        if self._started():
            return  # a run that began (status.json, failed.json, ...) keeps its record
        self._undo()

    def release(self) -> None:
        if self._fd is not None:  # removed while still locked: whoever opens it next gets a new file (_lock)
            try:
                os.remove(os.path.join(self.path, LOCK))
            except FileNotFoundError:
                pass  # a refused run's directory, removed
            os.close(self._fd)
            self._fd = None

    def _started(self) -> bool:
        now = _snapshot(self.path)
        return any(name not in _HYDRAS and not name.endswith(".log") and self.before.get(name) != stamp
                   for name, stamp in now.items())

    def _undo(self) -> None:
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
            for d in self.created[1:]:  # parents this claim made (outputs/, outputs/train/), while still empty
                try:
                    os.rmdir(d)
                except OSError:
                    break
            return
        for name in _snapshot(self.path):
            path = os.path.join(self.path, name)
            if name == ".hydra" and os.path.isdir(path):
                _undo_new_entries(path, self.before_hydra)
            elif name.endswith(".log") and name not in self.before:
                os.remove(path)
            elif name.endswith(".log"):
                with open(path, "r+b") as f:  # Hydra appends the refused command's lines: cut them off
                    f.truncate(self.before[name][1])

    @property
    def before_hydra(self) -> set[str]:
        return self.before.get(".hydra", (0, 0, set()))[2]


def _lock(path: str) -> int | None:
    """An fd holding an exclusive flock on `path`, or None when another process holds it. The file may be removed
    by its owner between our open and our flock (Claim.release): then lock the new file instead."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _read_pid(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


def _snapshot(path: str) -> dict:
    """name → (mtime_ns, size[, entries of .hydra/]) of the directory's top level."""
    out = {}
    for e in os.scandir(path):
        st = e.stat(follow_symlinks=False)
        entries = set(os.listdir(e.path)) if e.name == ".hydra" and e.is_dir() else set()
        out[e.name] = (st.st_mtime_ns, st.st_size, entries) if e.name == ".hydra" else (st.st_mtime_ns, st.st_size)
    return out


def _undo_new_entries(hydra_dir: str, before: set[str]) -> None:
    for name in set(os.listdir(hydra_dir)) - before:
        p = os.path.join(hydra_dir, name)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    if not before:
        os.rmdir(hydra_dir)


def _missing_ancestors(path: str) -> list[str]:
    """`path` and each parent that does not exist yet, deepest first."""
    out, p = [], os.path.abspath(path)
    while not os.path.exists(p):
        out.append(p)
        p = os.path.dirname(p)
    return out
