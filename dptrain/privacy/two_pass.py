"""passes=2: the norm pass, a recomputed forward, and the clipped pass — inside the user's one `loss.backward()`.

One-pass book-keeping holds every layer's per-example gradient (or input and output gradient) until the clip
factors exist. Here the model's output is handed to the loss cut from the graph; when its gradient G (B, …)
arrives, (1) a backward from the real output computes norms only, freeing everything as it goes like a
non-private backward; (2) the forward is recomputed on the same inputs with the same random state and the same
autocast state (as activation checkpointing does); (3) that forward is backpropagated with the same G, and each
hooked layer multiplies row i of its output gradient (cast to float32, as the norm pass's was) by c_i before adding
its plain weight gradient: Σ_i c_i·g_i[p]. Examples do not mix (no BatchNorm) and a weight gradient is linear in the
output gradient, so this is exact — and it is the same float32 arithmetic as passes=1, because the second backward
repeats the first (the same ops on the same inputs; on CUDA nondeterministic kernels may differ, which the norm tripwire
bounds at 1e-4 per layer): the clip factors never enter the reduced-precision backward (scaling G by c_i there, as
this path first did, gives c_i·g_i only up to bf16 rounding of every layer below, so a clipped example could exceed
R by it). Under autocast (bf16) each example's contribution is therefore ≤ R up to float32 rounding, as with
passes=1. fp16 is refused (BuiltIn): an overflowed example's non-finite rows would reach both tripwires.
Peak memory is a non-private step's plus one layer's (chunked) norm work and one layer's scaled output gradient;
time is one more forward and backward.

Tripwires (CoverageError): a recomputed output that differs from the first (a forward with state or unseeded
randomness), and a layer whose per-row output-gradient norm in the clipped pass is not the norm pass's (a backward
that changed between the passes). Under bf16 autocast the output check's rtol 1e-5 is exactness in effect: one bf16
ulp is 2⁻⁸ relative, so any recompute that is not bit-identical on an output entry of the largest magnitude trips.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import get_device_states, set_device_states

from .errors import CoverageError
from .passes import NORMS, ONE_PASS, RECOMPUTE, SUM
from .records import Record
from .rules import is_replaying


class Host(Protocol):
    """What TwoPass may use of its engine (PrivacyEngine provides it; nothing else of the engine is touched)."""

    augmult: int  # rows per example: c (B,) is repeated to the model's rows

    @property
    def forward_id(self) -> int:
        """The number of forwards of the model so far (a backward belongs to the latest)."""

    def factors(self) -> torch.Tensor | None:
        """After a backward: run the rules on this forward's records, set per_sample_norms → the clip factors c (B,),
        or None when there is nothing to clip (an empty batch)."""

    def restart_records(self) -> None:
        """Forget this forward's records (before the recomputed forward makes them again, and when done)."""

    def clipped_sums(self) -> None:
        """After the clipped pass: the rules that waited for the whole backward add their plain weight gradients."""


class TwoPass:
    """The passes=2 path of one PrivacyEngine (passes.py says what the engine asks of it; `Host`, what it asks of
    the engine)."""

    def __init__(self, engine: Host, model: nn.Module):
        self.engine = engine
        self.phase = ONE_PASS  # NORMS, then RECOMPUTE, then SUM, inside the user's backward
        self._rng: tuple = ()
        self._amp: tuple = ()  # (device type, enabled, dtype) of the forward's autocast, replayed by the recompute
        self._prints: dict[tuple[int, int], torch.Tensor] = {}  # (record, output) → per-row gradient norms, pass 1
        self._c: torch.Tensor | None = None  # (B,) clip factors, for the clipped pass's layers
        self.handles = (model.register_forward_hook(self._cut_output, with_kwargs=True),)

    def start(self, args, kwargs) -> None:
        """At each training forward: save the random state and the autocast state the recomputed forward replays
        (the user's backward, where the recompute runs, is outside the forward's autocast)."""
        self._amp = tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AMP_DEVICES)
        self._rng = (torch.get_rng_state(), *get_device_states(*args, *kwargs.values()))

    def _cut_output(self, module, args, kwargs, out):
        if is_replaying() or not torch.is_grad_enabled() or not self.phase.new_forward:
            return None
        if not (torch.is_tensor(out) and out.is_floating_point() and out.dim() and out.requires_grad):
            raise CoverageError(
                f"passes=2 needs the model to return one floating-point tensor whose rows are the examples, got "
                f"{type(out).__name__}; use passes=1 for this model")
        if any(torch.is_tensor(a) and a.requires_grad for a in tree_flatten((args, kwargs))[0]):
            raise CoverageError("passes=2 backpropagates twice, so an input that requires grad would collect both "
                                "passes' gradients; detach the model's inputs or use passes=1")
        cut = out.detach().requires_grad_()
        call = (self.engine.forward_id, args, kwargs, self._rng, self._amp)
        cut.register_hook(lambda G: self._run(module, out, G, call))
        return cut

    def _run(self, module: nn.Module, out: torch.Tensor, G: torch.Tensor, call: tuple) -> None:
        eng = self.engine
        fid, args, kwargs, (cpu_rng, devices, device_rngs), amp = call
        if fid != eng.forward_id:
            raise CoverageError("passes=2: call backward once after each forward of the model, before the next one")
        first = out.detach()
        try:
            self.phase = NORMS
            torch.autograd.backward(out, G)  # frees the graph as it goes, like a non-private backward
            del out
            c = eng.factors()
            if c is None:
                return
            self.phase = RECOMPUTE
            eng.restart_records()
            with torch.random.fork_rng(devices=devices), torch.enable_grad(), _autocast(amp):
                torch.set_rng_state(cpu_rng)
                set_device_states(devices, device_rngs)
                again = module(*args, **kwargs)
            if not (torch.is_tensor(again) and again.shape == first.shape and again.dtype == first.dtype
                    and torch.allclose(again.detach(), first, rtol=1e-5, atol=1e-6 * float(first.abs().max()))):
                raise CoverageError(
                    "passes=2: the recomputed forward gave a different output (a forward with internal state or "
                    "random numbers not drawn from torch's generators); use passes=1 for this model")
            self.phase, self._c = SUM, c
            torch.autograd.backward(again, G)  # the norm pass's backward again; each layer applies c (clip)
            eng.clipped_sums()
        finally:
            self.phase, self._prints, self._c = ONE_PASS, {}, None
            eng.restart_records()

    def clip(self, rec: Record) -> None:
        """The clipped pass, after `records.ready` (float32 grads): row i of each of the call's output gradients
        (k·B rows: each example's k consecutive) times c_i, out of place (the tensor may be the one autograd passes
        on), so the rule's plain weight gradient is Σ_i c_i·g_i of the very g_i whose norms gave c_i."""
        c = self._c
        rec.grads = [None if g is None else g * c.to(g.dtype).repeat_interleave(g.shape[0] // c.shape[0]).view(
            -1, *([1] * (g.dim() - 1))) for g in rec.grads]

    def compare(self, rec: Record, k: int, g: torch.Tensor) -> None:
        """Tripwire: every hooked output's per-row gradient norm in the clipped pass must be the one the norms were
        computed from (both backwards start from the same G). A forward or backward that changed between the passes
        would clip a gradient other than the one measured; this catches changed magnitudes (with the output check,
        changed forwards), not every conceivable change (a pure sign flip keeps the norms)."""
        if g.shape[0] == 0:  # an empty batch: nothing was clipped
            return
        n = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1).double()  # (rows,)
        key = (rec.place, k)
        if self.phase is NORMS:
            self._prints[key] = n
            return
        want = self._prints.pop(key, None)
        if want is None or want.shape != n.shape or not torch.allclose(n, want, rtol=1e-4,
                                                                       atol=1e-6 * float(want.max())):
            raise CoverageError(
                "passes=2: a layer's output gradient in the clipped pass is not the one its norm came from "
                "(the forward or backward changed between the passes); use passes=1 for this model")


_AMP_DEVICES = ("cpu", "cuda")


def _autocast(amp: tuple) -> contextlib.ExitStack:
    """The forward's autocast state again: entered (or explicitly disabled) per device type."""
    stack = contextlib.ExitStack()
    for device, enabled, dtype in amp:
        if enabled or torch.is_autocast_enabled(device):
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
    return stack
