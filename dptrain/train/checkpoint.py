"""Crash-safe runs: checkpoint.pt and status.json in the run directory, and `dptrain resume=<run dir>`.

checkpoint.pt holds everything the rest of a run depends on, at a logical-batch boundary (after engine.step(),
the EMA update and the scheduler step): the model, the optimizer, the lr schedule, the EMA, the engine's own
state (the built-in engine's noise chunk generators, Opacus' noise generator, nonprivate fp16's loss scaler),
torch's global generator (dropout, drop-path) and the augmentation generator, the sampler's position (the
number of logical batches drawn, and its generator's state as a tripwire), the position in the epoch with the
epoch's running loss, the metrics rows so far, the budget (σ, q, δ, steps, accountant) with the accountant's
history (σ, q, steps taken), the resolved config and the commit. It is written (`Checkpointer.save`)

- at every epoch end, after the evaluation and BEFORE the epoch's metrics.jsonl line (and wandb log): no logged
  value depends on a step that no checkpoint holds, so a resumed run never logs a step's outcome twice;
- inside an epoch, after the first step that ends at least `checkpoint.every_s` seconds after the last write
  (0: no checkpoints at all);

to checkpoint.pt.tmp, flushed and fsynced, then renamed over checkpoint.pt: a kill at any instant leaves the
previous checkpoint whole. Finished and failed runs delete it (model.pt holds the weights).

Under torchrun (distributed.py) every rank calls save() at the same steps: the epoch ends, and the mid-epoch
moments rank 0's clock chooses (`due`, broadcast). Rank 0 alone writes the one checkpoint.pt: the replicated
state (model, optimizer, schedule, EMA) is its own — after checking that every rank's weights fingerprint equals
its own — and what differs between the ranks (torch's global generator: dropout, seeded per rank; the
augmentation sub-stream; the noise chunk generators that rank draws; the epoch's running sums over its shards; its
step times) is gathered from every rank into `ranks`. The Poisson mask's stream is the same on every rank (each
draws the whole mask, then takes its shard), so every rank redraws it on resume as one process does. A resumed
run reads the checkpoint on rank 0, sends it to every rank, and each restores its own part; it must run on the
world size that wrote it (`check_world_size`: another one is refused in one line).

status.json says where the run stands: "running" (written at start and at every checkpoint, with the step and
ε of the last checkpoint), "finished" (after summary.json) or "failed" (after failed.json). A killed run keeps
"running" and no summary.json: dptrain-report lists it as unfinished.

Resume (`resume=<run dir>`; `resume_config`, then `load` in run.py) runs the saved config; overrides other than
HARMLESS ones are refused unless they equal the saved value. The run continues in the same directory:
metrics.jsonl is rewritten from the checkpoint's rows (a line logged after the checkpoint is dropped, then
logged again by the replay), so it has no duplicate lines. The sampler is redrawn from its seed up to the
epoch the checkpoint is in (PoissonSampler and ShuffleSampler alike; the epoch's batches are drawn up front,
and the steps already taken are skipped), so every later batch, noise draw and dropout mask is the one the
uninterrupted run draws: on CPU the weights end bit-identical, and ε is the accountant's for all the steps,
before and after the crash, each counted once. Steps taken after the last checkpoint and lost with the
process are replayed identically (same seeded streams), so they are the same mechanism output, not a second
one. In secure mode (privacy.secure) the sampler and the noise come from OS entropy and cannot be replayed: the
resumed run draws fresh batches and noise for the lost steps. That is as private — each step is a fresh
Poisson-subsampled Gaussian step, and nothing derived from the lost steps was logged (see above) — but not
bit-identical to anything.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field

import torch
from omegaconf import OmegaConf

from dptrain import keys as key
from dptrain.errors import UserError
from dptrain.train.budget import Budget
from dptrain.train.distributed import SINGLE, fingerprint
from dptrain.train.outputs import write_json

log = logging.getLogger("dptrain")

FILE, STATUS_FILE = "checkpoint.pt", "status.json"
FORMAT = 1  # checkpoint.pt's layout; a checkpoint of another format is refused
# overrides that `resume=` accepts with a new value (a key, or a group whose keys all qualify): they change
# neither the privacy nor the result. Any other override must equal the saved value.
HARMLESS = ("resume", "progress", "logger", "checkpoint", "dataset.num_workers", "keep_freed_memory")


@dataclass
class Position:
    """Where training stands: _train's counters at the start of the epoch in progress, and that epoch's steps
    already taken (`totals`: train_one_epoch's running sums). At an epoch boundary `totals` is empty."""

    epoch: int = 0  # epochs completed
    done: int = 0  # optimizer steps before the epoch in progress
    seen: int = 0  # examples trained on before it
    times: list = field(default_factory=list)  # seconds of each of those steps
    totals: dict = field(default_factory=dict)  # the epoch in progress: {"loss", "examples", "step_times"}
    rows: list = field(default_factory=list)  # metrics.jsonl's lines so far
    train_s: float = 0.0  # seconds of training so far (summary's samples/s)
    wall_s: float = 0.0  # seconds of the run so far (summary's wall_s)

    @property
    def steps(self) -> int:
        return self.done + len(self.totals.get("step_times", ()))


def resume_config(cfg, overrides: list[str]):
    """The config of the run in `cfg.resume` (its checkpoint's), with the command line's HARMLESS overrides
    applied; any other override that would change a saved value is refused in one line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from dptrain.config import TrainConfig

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
    from dptrain.train.outputs import git_commit

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


def _device_type(model) -> str | None:
    p = next(iter(model.parameters()), None)
    return None if p is None else p.device.type


_MISSING = object()


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


def _engine_state(engine) -> dict:
    """An engine's own state: the noise generators (built-in: one per chunk and device; Opacus: one), and
    nonprivate fp16's loss scaler. Nothing in secure mode: OS entropy."""
    from dptrain.privacy import DPOptimizer

    opt, out = getattr(engine, "optimizer", None), {}
    if isinstance(opt, DPOptimizer):
        out["noise"] = opt.generator_states()
    elif isinstance(getattr(opt, "generator", None), torch.Generator):  # Opacus
        out["opacus"] = opt.generator.get_state()
    if getattr(engine, "scaler", None) is not None:
        out["scaler"] = engine.scaler.state_dict()
    return out


def _set_engine_state(engine, state: dict) -> None:
    if "noise" in state:
        engine.optimizer.set_generator_states(state["noise"])
    if "opacus" in state:
        engine.optimizer.generator.set_state(state["opacus"])
    if "scaler" in state:
        engine.scaler.load_state_dict(state["scaler"])


# engines whose whole state _engine_state captures; another engine's run is not checkpointed (fail closed)
def _supported(engine) -> bool:
    from dptrain.engines import BuiltIn, NonPrivate, Opacus

    return isinstance(engine, (BuiltIn, NonPrivate, Opacus))


class Checkpointer:
    """Writes a run's checkpoint.pt and status.json, and restores a resumed run's objects (`start`)."""

    def __init__(self, run_dir: str, *, every_s: float, config: dict, commit, budget: Budget, model, optimizer,
                 scheduler, ema, engine, sampler, augment, t_start: float, dist=None):
        """dist: this process's place under torchrun (distributed.Dist; None: one process). Every rank calls
        save() at the same steps (a collective); rank 0 alone writes, as it owns the run directory."""
        self.run_dir, self.every_s, self.config, self.commit, self.budget = run_dir, every_s, config, commit, budget
        self.dist = dist if dist is not None else SINGLE
        self.writes = self.dist.is_main
        self.model, self.optimizer, self.scheduler, self.ema, self.engine = model, optimizer, scheduler, ema, engine
        self.sampler_gen, self.augment, self.t_start = getattr(sampler, "generator", None), augment, t_start
        self.path = os.path.join(run_dir, FILE)
        self.position, self.resumed, self.drawn, self._check = Position(), [], 0, None
        self.last = time.monotonic()
        self._skip, self._checked = 0, (self.last, 1)  # due()'s schedule under torchrun: steps to skip, last check
        # status.json's last checkpoint: none yet
        self.status = {key.STEP: 0, key.STEPS: budget.steps, key.EPS_SPENT: None, "checkpoint": None}
        if every_s > 0 and not _supported(engine):
            log.warning("checkpoints: engine %s has no checkpoint support; this run cannot be resumed",
                        type(engine).__name__)
            self.every_s = 0

    # --- start, resume -------------------------------------------------------------------------------------------
    def start(self, state: dict | None) -> Position:
        """status.json "running"; a resumed run's objects restored from `state` (load's) and metrics.jsonl
        rewritten from its rows. Returns where training continues."""
        if state is not None:
            self._restore(state)
        self._write_status("running")
        self.last = time.monotonic()
        self._checked = (self.last, 1)
        return self.position

    def _restore(self, state: dict) -> None:
        """The replicated state (model, optimizer, schedule, EMA: rank 0's, equal on every rank) from the
        checkpoint; the rank-local state (random streams, the engine's noise generators, the epoch's running sums)
        from this rank's own part of it."""
        check_device(state, _device_type(self.model), self.run_dir)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        mine = state["ranks"][self.dist.rank] if "ranks" in state else state  # torchrun: this rank's own
        _set_engine_state(self.engine, mine["engine"])
        rng = mine["rng"]
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if self.augment is not None:
            self.augment.set_state(rng["augment"])
        s = rng["sampler"]
        self._check = (s["drawn"], s["state"]) if s["state"] is not None and self.sampler_gen is not None else None
        self.position = Position(**state["position"])
        if "ranks" in state:  # the epoch's running sums (this rank's shards' losses, examples) and step times
            self.position.totals, self.position.times = mine["totals"], mine["times"]
        self.resumed = [*state["resumed"], {key.STEP: self.position.steps, key.COMMIT: self.commit,
                                            "at": _now()}]
        self.t_start -= self.position.wall_s
        self.status.update({key.STEP: self.position.steps, key.EPS_SPENT: state["accountant"][key.EPS_SPENT],
                            "checkpoint": FILE})
        if self.writes:
            rows = "".join(json.dumps(r) + "\n" for r in self.position.rows)
            _atomic(os.path.join(self.run_dir, "metrics.jsonl"), lambda f: f.write(rows.encode()))
        log.info("resumed %s at step %d of %d (eps spent %s)", self.run_dir, self.position.steps, self.budget.steps,
                 state["accountant"][key.EPS_SPENT])

    def batches(self, sampler):
        """The sampler's logical batches. A resumed run first redraws and drops those drawn before the epoch its
        checkpoint is in (secure mode: nothing to redraw, OS entropy), and checks that the sampler's generator
        then stands where the checkpoint saw it."""
        it = iter(sampler)
        self.drawn = 0
        if self.sampler_gen is not None:
            for _ in range(self.position.done):
                next(it)
            self.drawn = self.position.done
        self._verify()
        for batch in it:
            self.drawn += 1
            self._verify()
            yield batch

    def _verify(self) -> None:
        if self._check is not None and self.drawn == self._check[0]:
            if not torch.equal(self.sampler_gen.get_state(), self._check[1]):
                raise RuntimeError(f"resume: the sampler does not redraw the batches of {self.path} (after "
                                   f"{self.drawn} batches its generator is elsewhere)")
            self._check = None

    # --- saving ----------------------------------------------------------------------------------------------
    def due(self) -> bool:
        """A checkpoint inside the epoch now: `every_s` seconds since the last write (called after each step).

        Under torchrun by rank 0's clock, which every rank must follow (all save at the same step). Rank 0 sends
        (save now?, steps to skip before the next check) in one 16-byte broadcast; it skips half the steps its
        clock says are left until the interval ends (at its recent seconds per step), so an interval of S steps
        costs about log2(S) broadcasts rather than S. A save can come late only if the steps slow down more than
        twofold within an interval."""
        if self.every_s <= 0:
            return False
        now = time.monotonic()
        if not self.dist.enabled:
            return now - self.last >= self.every_s
        if self._skip > 0:  # the same count on every rank: due() is called at the same steps everywhere
            self._skip -= 1
            return False
        save = skip = 0
        if self.dist.is_main:
            left = self.every_s - (now - self.last)
            step_s = (now - self._checked[0]) / self._checked[1]  # since the last check
            save = int(left <= 0)
            skip = 0 if save else int(left / max(step_s, 1e-9) / 2)
        save, skip = self.dist.decide(save, skip)
        self._skip, self._checked = skip, (now, skip + 1)
        return bool(save)

    def _local(self, position: Position) -> dict:
        """What differs between torchrun ranks: each rank's random streams (dropout: torch's global generator,
        seeded per rank; augmentation: its own sub-stream; the sampler's shared stream, saved per rank as each
        rank's tripwire), its engine's noise generators (the chunks it draws), the epoch's running sums over its
        shards and its step times — and a fingerprint of its weights, which must equal rank 0's."""
        return {
            "engine": _engine_state(self.engine),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
                    "augment": self.augment.get_state() if self.augment is not None else None,
                    "sampler": {"drawn": self.drawn, "state": self.sampler_gen.get_state()
                                if self.sampler_gen is not None else None}},
            "totals": position.totals, "times": list(position.times),
        }

    def save(self, position: Position, *, eps_spent=_MISSING) -> None:
        """checkpoint.pt ← the run's state at `position`, atomically; then status.json. eps_spent: the accountant's ε
        for position.steps when the caller has it (the epoch's metrics row), else computed (rank 0).

        Under torchrun every rank calls it at the same step: the ranks' own states are gathered to rank 0 (one
        gather_object), which checks that every replica's weights equal its own and writes the one checkpoint.pt."""
        if self.every_s <= 0:
            return
        local = self._local(position)
        if self.dist.enabled:
            local["weights"] = fingerprint(self.model)
        ranks = self.dist.gather(local)
        if not self.writes:
            return
        if self.dist.enabled:
            ref = local["weights"]
            for r, theirs in enumerate(ranks):
                if not torch.equal(theirs.pop("weights"), ref):
                    raise RuntimeError(f"checkpoint: rank {r}'s weights differ from rank 0's at step {position.steps} "
                                       "(the ranks desynchronised); no checkpoint written")
        steps = position.steps
        eps = self.budget.eps_spent(steps) if eps_spent is _MISSING else eps_spent
        position.wall_s = time.time() - self.t_start
        b = self.budget
        state = {
            "format": FORMAT, "config": self.config, "commit": self.commit, "torch": str(torch.__version__),
            "world_size": self.dist.world_size, "device": _device_type(self.model),
            "position": asdict(position), "budget": asdict(b), "resumed": self.resumed,
            "accountant": {"history": [(b.noise_multiplier, b.sample_rate, steps)] if b.noise_multiplier else [],
                           key.EPS_SPENT: eps},
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "engine": local["engine"], "rng": local["rng"],  # rank 0's (one process: the only one)
        }
        if self.dist.enabled:
            state["ranks"] = ranks  # every rank's own state, by rank
        t0 = time.perf_counter()
        _atomic(self.path, lambda f: torch.save(state, f))
        log.debug("checkpoint at step %d: %.1f MB written in %.2f s", steps, os.path.getsize(self.path) / 2**20,
                 time.perf_counter() - t0)
        self.last = time.monotonic()
        self._write_status("running", step=steps, eps=eps, checkpoint=FILE)

    def finished(self) -> None:
        self._remove()
        self._write_status("finished")

    def failed(self) -> None:
        self._remove()
        self._write_status("failed")

    def _remove(self) -> None:
        """No checkpoint after the end: model.pt holds the weights, and the run cannot be resumed."""
        if not self.writes:
            return
        for p in (self.path, self.path + ".tmp"):
            if os.path.exists(p):
                os.remove(p)
        self.status["checkpoint"] = None

    def _write_status(self, status: str, **last) -> None:
        """status.json: the run's state, and its last checkpoint's step and ε (kept until the next)."""
        if not self.writes:
            return
        if last:
            self.status.update({key.STEP: last["step"], key.EPS_SPENT: last["eps"], "checkpoint": last["checkpoint"]})
        write_json(os.path.join(self.run_dir, STATUS_FILE), {
            key.STATUS: status, **self.status, "resumed": self.resumed, key.COMMIT: self.commit,
            "host": socket.gethostname(), "pid": os.getpid(), "updated": _now()})


def _atomic(path: str, write) -> None:
    """write(file) into path.tmp, flushed to disk, then renamed over `path`: readers see the old file or the new
    one, never a part."""
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


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")
