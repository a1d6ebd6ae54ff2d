"""Crash-safe runs: checkpoint.pt and status.json in the run directory (`Checkpointer`).

checkpoint.pt holds everything the rest of a run depends on, at a logical-batch boundary, each part asked of
its owner: the model, the optimizer, the lr schedule and the EMA (their state_dict), the engine's own state
(engines/base.Engine: noise generators, a loss scaler), the loop's `Position`, torch's global and the
augmentation generators, the sampler's generator (a tripwire), the budget and the accountant's history, the
config and the commit. Resumed from the same seeded streams, a run ends bit-identical to an uninterrupted one
(on CPU); which runs may be resumed, and with what: resume.py.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time
from dataclasses import asdict

import torch

from dptrain import keys as key
from dptrain.engines.base import checkpointable
from dptrain.errors import UserError
from dptrain.privacy.sampling import BatchSampler
from dptrain.train.budget import Budget
from dptrain.train.distributed import SINGLE, fingerprint
from dptrain.train.loop import Position
from dptrain.train.outputs import atomic_write, write_json
from dptrain.train.resume import (
    FILE,
    FORMAT,
    HARMLESS,
    STATUS_FILE,
    check_device,
    check_world_size,
    load,
    read_status,
    resume_config,
    resumed_budget,
)

# the one import path for checkpoint and resume: resume.py's names too
__all__ = ["FILE", "FORMAT", "HARMLESS", "STATUS_FILE", "Checkpointer", "Position", "check_device",
           "check_world_size", "load", "read_status", "resume_config", "resumed_budget"]

log = logging.getLogger("dptrain")
_UNSET = object()


class Checkpointer:
    """Writes a run's checkpoint.pt and status.json, and restores a resumed run's objects (`start`).

    checkpoint.pt is written (`save`) at every epoch end, after the evaluation and BEFORE the epoch's metrics.jsonl
    line (no logged value depends on a step that no checkpoint holds, so a resumed run never logs a step twice),
    and inside an epoch after the first step `checkpoint.every_s` seconds after the last write (0: never); to
    checkpoint.pt.tmp, fsynced, then renamed over checkpoint.pt (a kill at any instant leaves the previous one
    whole). Finished and failed runs delete it (model.pt holds the weights). status.json: "running" (at start and
    at every checkpoint, with its step and ε), "finished" or "failed"; a killed run keeps "running".

    A resumed run redraws its sampler from the seed up to the checkpoint's epoch and skips the steps taken, so
    every later batch, noise draw and dropout mask is the uninterrupted run's; steps lost with the process are
    replayed identically. In secure mode (OS entropy) the lost steps draw fresh batches and noise: as private,
    as nothing derived from them was logged, but not bit-identical to anything.

    Under torchrun every rank calls save() at the same steps (epoch ends, and the moments rank 0's clock
    chooses: `due`). Rank 0 writes the one file: the replicated state (model, optimizer, schedule, EMA) is its
    own, after checking every rank's weights fingerprint equals its own; what differs between ranks (torch's
    global generator, the augmentation sub-stream, the engine's noise chunks, the epoch's running sums, the step
    times) is gathered into `ranks`. The Poisson mask's stream is the same on every rank. A resumed run reads the
    checkpoint on rank 0, sends it to every rank, and each restores its own part, on the same world size."""

    def __init__(self, run_dir: str, *, every_s: float, config: dict, commit, budget: Budget, model, optimizer,
                 scheduler, ema, engine, sampler, augment, t_start: float, dist=None):
        """dist: this process's place under torchrun (distributed.Dist; None: one process). Every rank calls
        save() at the same steps (a collective); rank 0 alone writes, as it owns the run directory."""
        self.run_dir, self.every_s, self.config, self.commit, self.budget = run_dir, every_s, config, commit, budget
        self.dist = dist if dist is not None else SINGLE
        self.writes = self.dist.is_main
        self.model, self.optimizer, self.scheduler, self.ema, self.engine = model, optimizer, scheduler, ema, engine
        self.sampler, self.augment, self.t_start = sampler, augment, t_start
        # the sampler's seeded stream (sampling.BatchSampler), what a resumed run redraws; None: OS entropy
        self.sampler_gen = getattr(sampler, "generator", None)
        self.path = os.path.join(run_dir, FILE)
        self.position, self.resumed, self.drawn, self._check = Position(), [], 0, None
        self.last = time.monotonic()
        self._skip, self._checked = 0, (self.last, 1)  # due()'s schedule under torchrun: steps to skip, last check
        # status.json's last checkpoint: none yet
        self.status = {key.STEP: 0, key.STEPS: budget.steps, key.EPS_SPENT: None, "checkpoint": None}
        if every_s > 0 and not checkpointable(engine):  # fail closed: its state would be missing
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
        if not hasattr(self.sampler, "generator"):  # not a BatchSampler: it could repeat the batches drawn already
            raise UserError(f"resume={self.run_dir}: this run's sampler ({type(self.sampler).__name__}) cannot redraw "
                            "the batches drawn before its checkpoint; start it again")
        check_device(state, _device_type(self.model), self.run_dir)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        mine = state["ranks"][self.dist.rank] if "ranks" in state else state  # torchrun: this rank's own
        self.engine.load_state_dict(mine["engine"])
        _set_rng_state(mine["rng"], self.augment)
        s = mine["rng"]["sampler"]
        self._check = (s["drawn"], s["state"]) if s["state"] is not None and self.sampler_gen is not None else None
        self.position = Position.from_state_dict(state["position"])
        if "ranks" in state:  # the epoch's running sums (this rank's shards' losses, examples) and step times
            self.position.totals, self.position.times = mine["totals"], mine["times"]
        self.resumed = [*state["resumed"], {key.STEP: self.position.steps, key.COMMIT: self.commit,
                                            "at": _now()}]
        self.t_start -= self.position.wall_s
        self.status.update({key.STEP: self.position.steps, key.EPS_SPENT: state["accountant"][key.EPS_SPENT],
                            "checkpoint": FILE})
        if self.writes:
            rows = "".join(json.dumps(r) + "\n" for r in self.position.rows)
            atomic_write(os.path.join(self.run_dir, "metrics.jsonl"), lambda f: f.write(rows.encode()))
        log.info("resumed %s at step %d of %d (eps spent %s)", self.run_dir, self.position.steps, self.budget.steps,
                 state["accountant"][key.EPS_SPENT])

    def batches(self, sampler: BatchSampler):
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
        sampler = {"drawn": self.drawn, "state": self.sampler_gen.get_state() if self.sampler_gen is not None else None}
        return {"engine": self.engine.state_dict(), "rng": {**_rng_state(self.augment), "sampler": sampler},
                "totals": position.totals, "times": list(position.times)}

    def save(self, position: Position, *, eps_spent=_UNSET) -> None:
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
        eps = self.budget.eps_spent(steps) if eps_spent is _UNSET else eps_spent
        position.wall_s = time.time() - self.t_start
        b = self.budget
        state = {
            "format": FORMAT, "config": self.config, "commit": self.commit, "torch": str(torch.__version__),
            "world_size": self.dist.world_size, "device": _device_type(self.model),
            "position": position.state_dict(), "budget": asdict(b), "resumed": self.resumed,
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
        atomic_write(self.path, lambda f: torch.save(state, f))
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


def _rng_state(augment) -> dict:
    """This process's random streams outside the engine: torch's global generators (dropout, drop-path) and the
    augmentation generator."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "augment": augment.get_state() if augment is not None else None}


def _set_rng_state(rng: dict, augment) -> None:
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if augment is not None:
        augment.set_state(rng["augment"])


def _device_type(model) -> str | None:
    p = next(iter(model.parameters()), None)
    return None if p is None else p.device.type


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")
