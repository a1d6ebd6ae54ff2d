"""PrivacyEngine: exact per-example clipping by book-keeping, in the same backward pass.

Forward (attach.py): every hooked module runs with its own parameters *detached*, so autograd never computes
the non-private weight gradient (only activation gradients flow); the call's inputs are kept and a tensor
hook on each output keeps the output gradient.

Backward: the first output gradient queues a callback on the autograd engine, which runs once the
whole backward has finished — independent of the order modules were registered or fired. It then
sums the per-layer squared norms, computes the clip factors c_i and builds Σ_i c_i·g_i[p] straight
into p.grad (accumulating across physical batches). A gradient that reaches a parameter any other way
(a functional use, a tied weight) raises instead of being silently unclipped.

passes=2 (less memory, one more forward and backward) lives in two_pass.py; the engine reads the flags of the
passes' current phase (passes.py), never which path it is on.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch import nn
from torch.autograd.profiler import record_function
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .attach import guard, unwrap, wrap
from .errors import CoverageError
from .finish import Finish, exact_fp32
from .passes import OnePass
from .plan import MODES, Entry, build_plan, describe
from .probe import probe_rows
from .records import Record, examples, pending, ready
from .rules import FALLBACK, is_replaying
from .sequence_first import grad_to_batch_first
from .trainable import refuse_changed, trainable_ids
from .two_pass import TwoPass

log = logging.getLogger("dptrain.privacy")

CLIPPING = ("abadi", "automatic")


class PrivacyEngine:
    """Attach to `model`; after `loss.backward()` (loss summed over examples) every trainable p has
    p.grad += Σ_i c_i · g_i[p], with c_i = min(1, R/‖g_i‖) (abadi) or R/(‖g_i‖ + γ) (automatic) and g_i
    example i's full gradient. Noise and averaging are `DPOptimizer`'s job, once per logical batch.

    mode: "mixed_ghost" (per-layer cheaper of ghost norm / instantiation), "ghost", "per_sample".
    fallback: extra module types or names to treat as fallback units (their whole subtree is replayed
    with torch.func), e.g. for a module that uses a child's weight functionally.
    augmult: K > 1 means each example enters as K consecutive rows (augmented copies); example i's
    gradient is the sum of its rows' gradients (scale the loss by 1/K for their mean) and is clipped
    as one (De et al. 2022, augmentation multiplicity).
    Mixed precision: a forward under torch.autocast (bf16/fp16; passes=2: bf16) is accepted; norms, clip factors
    and the clipped sum are computed in float32 from the per-example quantities the forward left. With a scaled
    loss (fp16's GradScaler) set `engine.loss_scale = S` before backward: the norms are then taken of the
    unscaled gradients and .grad holds S·Σ c_i·g_i, which the caller divides by S; an example whose scaled
    gradient overflowed contributes nothing (counted in `engine.dropped`).
    passes: 1 (book-keeping, one backward) or 2 (norm pass, recomputed forward, clipped pass: the memory of
    non-private training, about twice its time; the model must return one tensor whose rows are the examples,
    and its forward must be a function of its inputs and the random state).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mode: str = "mixed_ghost",
        max_grad_norm: float = 1.0,
        clipping: str = "abadi",
        gamma: float = 0.01,
        fallback: tuple = (),
        augmult: int = 1,
        passes: int = 1,
    ):
        _check_arguments(mode=mode, clipping=clipping, max_grad_norm=max_grad_norm, augmult=augmult, passes=passes)
        self.model, self.mode, self.max_grad_norm = model, mode, float(max_grad_norm)
        self.clipping, self.gamma = clipping, float(gamma)
        self.augmult, self.passes = int(augmult), passes
        self.entries: list[Entry] = build_plan(model, fallback=fallback)
        self.per_sample_norms: torch.Tensor | None = None
        self._records: list[tuple[Entry, Record]] = []
        self._calls: dict[int, int] = {}
        self._forward_id = 0
        self._rows = 0  # the model input's leading dimension in this forward (for taps of input-less modules)
        self.loss_scale = 1.0  # the factor the loss was multiplied by before backward (fp16's GradScaler)
        self.dropped = 0  # fp16: examples whose scaled gradient overflowed, left out of the clipped sums so far
        self._dropped: torch.Tensor | None = None
        self._probed = False  # probe.py: have the hooked calls' rows been checked against the examples
        self._probing = False
        self._queued: int | None = None  # the forward whose _finish is queued on the autograd engine
        self._late: dict[int, int] = {}  # id(entry) → its calls made inside this forward's backward (recomputes)
        self._audited = self._logged = False
        self._fallback = fallback
        self._trainable = trainable_ids(model)  # the plan's trainable set; re-planned when it changes
        self._handles: list = []
        self._guards: list = []
        self._saved_forward: list = []
        self._leaf = torch.zeros((), requires_grad=True)  # puts raw-data layers' outputs in the graph
        self._attach()
        self._handles.append(model.register_forward_pre_hook(self._new_forward, with_kwargs=True))
        if passes == 1:  # passes=2 cuts the output itself and runs the rules from its own hook
            self._handles.append(model.register_forward_hook(self._anchor_output))
        self._passes = TwoPass(self, model) if passes == 2 else OnePass()  # passes.py: what the engine asks of it
        self._handles += self._passes.handles
        self.fallback_share = _fallback_share(self.entries)

    def _attach(self) -> None:
        """Hook the plan's modules (attach.py): wrapped forwards and the guards on their parameters."""
        self._saved_forward = [wrap(e, self._keep, self._leaf, lambda: self._rows) for e in self.entries]
        self._guards = [h for e in self.entries for h in guard(e)]

    def _unattach(self) -> None:
        for h in self._guards:
            h.remove()
        for saved in self._saved_forward:
            unwrap(saved)
        self._guards, self._saved_forward = [], []

    def _replan(self, now: tuple[int, ...]) -> None:
        """The trainable set changed since the plan was built (a layer frozen or unfrozen, a head replaced): the
        plan is built again for the parameters trainable now, before this forward runs. A plan frozen at attach
        would give a newly unfrozen parameter its plain, unclipped gradient and keep clipping a frozen one."""
        before = set(self._trainable)
        self._unattach()
        self.entries = build_plan(self.model, fallback=self._fallback)  # CoverageError: the new set is uncoverable
        self._attach()
        self._trainable = now
        self._probed = self._audited = self._logged = False
        added = [n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in before]
        log.info("privacy engine: the trainable parameters changed since the plan was built (%d now, new: %s); "
                 "re-planned", len(now), ", ".join(added[:6]) + (" …" if len(added) > 6 else "") or "none")
        self.fallback_share = _fallback_share(self.entries)

    # ---------------------------------------------------------------- forward
    def _new_forward(self, module, args, kwargs):
        # a forward without gradients (evaluation between a forward and its backward) touches no step state
        if is_replaying() or not self._passes.phase.new_forward or self._probing or not torch.is_grad_enabled():
            return
        now = trainable_ids(self.model)
        if now != self._trainable:
            self._replan(now)
        if not self._probed and _rows_of(args, kwargs) >= 2:
            self._probing = True
            for e in self.entries:
                e.split = set()
            try:
                self._probed = probe_rows(self.model, self.entries, args, kwargs)
            finally:
                self._probing = False
            if not self._probed:
                for e in self.entries:
                    e.split = None
        self._forward_id += 1
        self._rows = _rows_of(args, kwargs)
        self._records = []  # a training forward whose backward never ran leaves nothing behind
        self._calls, self._late = {}, {}  # id(entry) → its calls in this forward / inside its backward
        self._passes.start(args, kwargs)

    def _anchor_output(self, module, args, out):
        """passes=1: the model's outputs pass through Finish, whose backward runs first in the user's backward and
        queues _finish on *that* backward. Queued from a layer's gradient instead, it could land on an inner backward
        (reentrant activation checkpointing backpropagates each segment separately): clipped a segment at a time."""
        if is_replaying() or not torch.is_grad_enabled() or self._probing:
            return None
        flat, spec = tree_flatten(out)
        if not any(torch.is_tensor(o) and o.requires_grad for o in flat):
            return None
        fid = self._forward_id
        flat = [Finish.apply(o, partial(self._queue, fid)) if torch.is_tensor(o) and o.requires_grad else o
                for o in flat]
        return tree_unflatten(flat, spec)

    def _queue(self, forward_id: int) -> None:
        """Queue _finish on the backward running now, once per forward. Keyed by the forward, not a flag cleared in
        _finish: a backward that raised drops its queued callback, and a stale flag would skip clipping after it."""
        if self._queued != forward_id and forward_id == self._forward_id and self._passes.phase.queue_finish:
            self._queued = forward_id
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)

    def _keep(self, entry: Entry, args: tuple, kwargs: dict, rows: int, outs: list[torch.Tensor]) -> None:
        """A training call of a hooked module (attach.py): its record, and a hook on the gradient of each output
        (or tap) its rule needs. A call made inside the backward is activation checkpointing's recomputed forward:
        non-reentrant checkpointing recomputes calls already recorded (their outputs only refill saved tensors: no
        record), reentrant checkpointing runs the segment's forward for the first time with gradients (recorded)."""
        late = torch._C._current_graph_task_id() != -1 and self._passes.phase.new_forward
        if late:
            n = self._late[id(entry)] = self._late.get(id(entry), 0) + 1
            if n <= self._calls.get(id(entry), 0):
                for o in outs:
                    o.register_hook(partial(_recomputed, entry))
                return
        rec = Record(args, kwargs, rows, self._forward_id, len(outs))
        for k, o in enumerate(outs):
            o.register_hook(partial(self._on_grad, entry, rec, k))
        rec.place = len(self._records)
        self._records.append((entry, rec))
        if not late:  # a recorded call inside the backward never runs eagerly: it waits for _finish
            self._calls[id(entry)] = self._calls.get(id(entry), 0) + 1
        entry.calls += 1

    # --------------------------------------------------------------- backward
    def _on_grad(self, entry: Entry, rec: Record, k: int, g: torch.Tensor) -> None:
        if rec.forward_id != self._forward_id or not any(r is rec for _, r in self._records):
            raise CoverageError(
                "backward reached an earlier training forward of the model: another forward with gradients ran "
                "between this one and its backward (run it under torch.no_grad(), or call backward after each "
                "training forward; do not sum the losses of several forwards or retain the graph)"
            )
        rec.grads[k] = grad_to_batch_first(entry, k, g.detach())  # a sequence-first call's (T, B, …) → (B, T, …)
        phase = self._passes.phase
        if phase.compare:
            self._passes.compare(rec, k, rec.grads[k])
        if self._queued != self._forward_id:  # a loss not computed from the model's output (no Finish ran)
            self._queue(self._forward_id)
        # A layer called once whose output gradients are all in: its norm (and, when instantiated, its
        # per-example gradient) is computed now, and its stored input and output gradient are freed, instead
        # of holding every layer's until the end of the backward. Fallback units replay autograd, which
        # waits for _finish (outside the engine's hooks).
        if self._calls.get(id(entry)) == 1 and entry.rule.eager and all(x is not None for x in rec.grads):
            B = examples(entry, rec.rows, model_rows=self._rows, augmult=self.augmult)
            if B:
                self._run_sum(entry, [rec], B) if phase.plain_sum else self._run_rule(entry, [rec], B)

    def _run_rule(self, entry: Entry, recs: list[Record], B: int) -> None:
        ready(entry, recs, B)
        keep = self._passes.phase.keep_state  # the norm pass of passes=2 needs none: the clipped sum comes later
        with torch.no_grad(), record_function("dptrain::norms"), exact_fp32():
            n2, state = entry.rule.norms(entry, recs, self.mode, keep=keep)
        n2 = n2.to(torch.float64 if n2.dtype == torch.float64 else torch.float32)
        for r in recs:
            r.release()
        recs[0].result = (n2, state if keep else None)

    def _run_sum(self, entry: Entry, recs: list[Record], B: int) -> None:
        """Second pass: the passes scale the output gradients' rows by c_i, so the plain weight gradient is the
        clipped sum."""
        ready(entry, recs, B)
        with torch.no_grad(), record_function("dptrain::clipped_sum"), exact_fp32():
            for r in recs:
                self._passes.clip(r)  # row i of the (float32) output gradients times c_i
            entry.rule.accumulate_plain(entry, recs)
        for r in recs:
            r.release()

    def _pending(self, records) -> tuple[dict[int, tuple[Entry, list[Record]]], list[tuple[Entry, Record]], int]:
        return pending(records, model_rows=self._rows, augmult=self.augmult)

    def _clip_factors(self, records) -> tuple[torch.Tensor | None, list[tuple[Entry, Record]]]:
        """Runs the pending rules, sums the per-layer squared norms, sets per_sample_norms; → (c, done)."""
        now = trainable_ids(self.model)
        if now != self._trainable:
            refuse_changed(self.model, self._trainable, now)
        if not self._audited:
            self._audit()
        groups, done, B = self._pending(records)
        if B == 0:  # an empty batch (a Poisson batch can be): no example, no gradient to add
            self.per_sample_norms = torch.zeros(0)
            return None, []
        if not groups and not done:
            return None, done
        for e, rs in groups.values():
            self._run_rule(e, rs, B)
            done.append((e, rs[0]))
        with torch.no_grad():
            n2 = sum(r.result[0] for _, r in done)
            # with a scaled loss (fp16's GradScaler) every gradient is S times the true one: the norms are taken
            # of the unscaled gradients — clipping the scaled ones at R would clip at R·S (pitfalls.md)
            norms = n2.clamp_min(0).sqrt() / self.loss_scale
            if self.clipping == "abadi":
                c = (self.max_grad_norm / norms).clamp(max=1.0)  # ‖g‖ = 0 → inf → 1
            else:
                c = self.max_grad_norm / (norms + self.gamma)
            self._dropped = None
            if self.loss_scale != 1.0 and not torch.isfinite(norms).all():
                # fp16: an example whose scaled gradient overflowed contributes nothing — still a function of that
                # example alone with norm ≤ R, so the sensitivity and the step's accounting are unchanged (a
                # skipped step, as GradScaler does, would be a data-dependent event the accountant never saw)
                self._dropped = ~torch.isfinite(norms)
                c = c.masked_fill(self._dropped, 0.0)
                self.dropped += int(self._dropped.sum())
        assert norms.shape[0] == B
        self.per_sample_norms = norms
        if not self._logged:
            self._logged = True
            # the table matters when a layer is on the slow fallback; otherwise it is detail (DEBUG)
            level = logging.INFO if any(e.rule is FALLBACK for e in self.entries) else logging.DEBUG
            log.log(level, "privacy engine (%s), per-layer rules chosen:\n%s", self.mode, describe(self.entries))
        return c, done

    def _finish(self) -> None:
        records, self._records = self._records, []
        c, done = self._clip_factors(records)
        with torch.no_grad(), record_function("dptrain::clipped_sum"), exact_fp32():
            for e, r in done:
                state = r.result[1] if self._dropped is None else tree_map(partial(_zero_rows, self._dropped),
                                                                            r.result[1])
                e.rule.accumulate(e, [r], c, state)
                r.result = None

    def _audit(self) -> None:
        self._audited = True
        unused = [f"{e.name}.{n}" if e.name else n for e in self.entries if e.calls == 0 for n, _ in e.params]
        if unused:
            raise CoverageError(
                f"parameters used by no hooked call in the first forward: {', '.join(unused[:8])}"
                f"{' …' if len(unused) > 8 else ''}. If a parent module uses them functionally, "
                "pass fallback=['<parent module name>']; if they are unused, freeze them (requires_grad=False)"
            )

    # ------------------------------------------------ for the passes (two_pass.Host: all TwoPass may use)
    @property
    def forward_id(self) -> int:
        return self._forward_id

    def factors(self) -> torch.Tensor | None:
        return self._clip_factors(self._records)[0]

    def restart_records(self) -> None:
        self._records, self._calls, self._late = [], {}, {}

    def clipped_sums(self) -> None:
        groups, _, B = self._pending(self._records)
        for e, rs in groups.values():
            self._run_sum(e, rs, B)

    # ---------------------------------------------------------------- public
    def describe(self) -> str:
        return describe(self.entries)

    def detach(self) -> nn.Module:
        """Remove every hook; the model is a plain module again."""
        for h in self._handles:
            h.remove()
        self._unattach()
        self._handles, self._records = [], []
        return self.model


def _check_arguments(*, mode, clipping, max_grad_norm, augmult, passes) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}'; valid: {', '.join(MODES)}")
    if clipping not in CLIPPING:
        raise ValueError(f"unknown clipping '{clipping}'; valid: {', '.join(CLIPPING)}")
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    if int(augmult) < 1:
        raise ValueError(f"augmult must be >= 1, got {augmult}")
    if passes not in (1, 2):
        raise ValueError(f"passes must be 1 or 2, got {passes}")


def _rows_of(args, kwargs) -> int:
    return next((a.shape[0] for a in tree_flatten((args, kwargs))[0] if torch.is_tensor(a) and a.dim()), 0)


def _recomputed(entry: Entry, grad: torch.Tensor) -> None:
    raise CoverageError(
        f"{entry.label()} is called both inside a reentrant activation-checkpoint segment and outside it, so its "
        "recomputed call cannot be told apart from its first; use use_reentrant=False for that checkpoint")


def _fallback_share(entries: list[Entry]) -> float:
    """The fraction of trainable parameters on the generic (slow) fallback, logged with the modules behind it."""
    total = sum(p.numel() for e in entries for _, p in e.params)
    slow = [e for e in entries if e.rule is FALLBACK]
    share = sum(p.numel() for e in slow for _, p in e.params) / total if total else 0.0
    if slow:
        names = ", ".join(e.label() for e in slow[:6]) + (" …" if len(slow) > 6 else "")
        log.warning("privacy engine: %.1f%% of the trainable parameters are on the generic (slow) fallback: %s",
                    100 * share, names)
    else:
        log.debug("privacy engine: fallback share 0% (every trainable parameter on a ghost/instantiation rule)")
    return share


def _zero_rows(bad: torch.Tensor, t):
    """A rule's per-example state with the rows of `bad` examples (B,) zeroed (k rows per example: k·B rows)."""
    if not (torch.is_tensor(t) and t.dim() and t.shape[0] % bad.shape[0] == 0):
        return t
    rows = bad.repeat_interleave(t.shape[0] // bad.shape[0]).view(-1, *([1] * (t.dim() - 1)))
    return t.masked_fill(rows, 0)
