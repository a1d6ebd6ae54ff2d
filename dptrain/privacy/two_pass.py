"""passes=2: the norm pass, a recomputed forward, and the clipped pass — inside the user's one `loss.backward()`.

One-pass book-keeping holds every layer's per-example gradient (or input and output gradient) until the clip
factors exist. Here the model's output is handed to the loss cut from the graph; when its gradient G (B, …)
arrives, (1) a backward from the real output computes norms only, freeing everything as it goes like a
non-private backward; (2) the forward is recomputed on the same inputs with the same random state (as
activation checkpointing does); (3) that forward is backpropagated with row i of G scaled by c_i. A backward
pass is linear in its output gradient and examples do not mix (no BatchNorm), so every layer then receives
c_i·g_i and its plain weight gradient is exactly Σ_i c_i·g_i[p]. Peak memory is a non-private step's plus one
layer's (chunked) norm work; time is one more forward and backward.

Tripwires (CoverageError): a recomputed output that differs from the first (a forward with state or unseeded
randomness), and a layer whose per-row output-gradient norm in the clipped pass is not c_i times the norm
pass's (a backward that changed between the passes).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import get_device_states, set_device_states

from .errors import CoverageError
from .passes import NORMS, ONE_PASS, RECOMPUTE, SUM
from .rules import Record, is_replaying


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
        self._prints: dict[tuple[int, int], torch.Tensor] = {}  # (record, output) → per-row gradient norms, pass 1
        self._c_rows: torch.Tensor | None = None
        self.handles = (model.register_forward_hook(self._cut_output, with_kwargs=True),)

    def start(self, args, kwargs) -> None:
        """At each training forward: refuse autocast; save the random state the recomputed forward replays."""
        if _autocast_on():
            raise CoverageError(
                "passes=2 under autocast (precision=bf16/fp16): the clipped pass relies on the backward being linear "
                "in its output gradient, which reduced-precision rounding breaks (each example's contribution would "
                "exceed c_i·g_i by the rounding); use passes=1 with mixed precision")
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
        call = (self.engine.forward_id, args, kwargs, self._rng)
        cut.register_hook(lambda G: self._run(module, out, G, call))
        return cut

    def _run(self, module: nn.Module, out: torch.Tensor, G: torch.Tensor, call: tuple) -> None:
        eng = self.engine
        fid, args, kwargs, (cpu_rng, devices, device_rngs) = call
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
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                torch.set_rng_state(cpu_rng)
                set_device_states(devices, device_rngs)
                again = module(*args, **kwargs)
            if not (torch.is_tensor(again) and again.shape == first.shape and torch.allclose(
                    again.detach(), first, rtol=1e-5, atol=1e-6 * float(first.abs().max()))):
                raise CoverageError(
                    "passes=2: the recomputed forward gave a different output (a forward with internal state or "
                    "random numbers not drawn from torch's generators); use passes=1 for this model")
            self.phase, self._c_rows = SUM, c.repeat_interleave(eng.augmult).double()
            torch.autograd.backward(again, G * self._c_rows.to(G.dtype).view(-1, *([1] * (G.dim() - 1))))
            eng.clipped_sums()
        finally:
            self.phase, self._prints = ONE_PASS, {}
            eng.restart_records()

    def compare(self, rec: Record, k: int, g: torch.Tensor) -> None:
        """Tripwire: every hooked output's per-row gradient norm in the clipped pass must be c_i times the one
        the norms were computed from. A forward or backward that changed between the passes would clip a
        gradient other than the one measured; this catches changed magnitudes (with the output check, changed
        forwards), not every conceivable change (a pure sign flip keeps the norms)."""
        if g.shape[0] == 0:  # an empty batch: nothing was clipped
            return
        n = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1).double()  # (rows,)
        key = (rec.place, k)
        if self.phase is NORMS:
            self._prints[key] = n
            return
        want = self._prints.pop(key, None)
        c = self._c_rows  # (model rows,); a call of k·B rows (Swin's windows) has each example's k consecutive
        c = c.repeat_interleave(n.shape[0] // c.shape[0]) if n.shape[0] % c.shape[0] == 0 else None
        want = None if want is None or c is None or want.shape != n.shape else want * c
        if want is None or not torch.allclose(n, want, rtol=1e-4, atol=1e-6 * float(want.max())):
            raise CoverageError(
                "passes=2: a layer's output gradient in the clipped pass is not c_i times the one its norm came from "
                "(the forward or backward changed between the passes); use passes=1 for this model")


def _autocast_on() -> bool:
    return any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))
