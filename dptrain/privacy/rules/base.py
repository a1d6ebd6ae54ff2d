"""What every rule shares: the `Rule` protocol (over `records.Record`s, one per hooked call), the mixed rule's cost
model and the small tensor helpers (Gram norms, folding augmented copies, adding into .grad).

Notation (Bu, Mao & Xu 2022): a layer sees activations a_i ∈ R^{T×d} and output gradients
g_i ∈ R^{T×p} for example i; its per-example weight gradient is g_iᵀ a_i. The ghost norm is
‖g_iᵀa_i‖² = ⟨a_i a_iᵀ, g_i g_iᵀ⟩ (two T×T Gram matrices); instantiation builds g_iᵀ a_i (p×d).
A module called several times in one forward contributes Σ_calls g_cᵀ a_c, which is the same as
concatenating the calls along T, so reuse is exact. Augmentation multiplicity is the same idea: with K
consecutive rows per example (its augmented copies), example i's gradient is the sum over its rows,
so rows are folded into T (or summed, for instantiated per-row gradients).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..records import Record

# Bound on the B·T² elements a ghost Gram matrix may hold at once (chunked over the batch).
GRAM_BUDGET = 2**25
# Bound on the elements of per-example work at once when instantiating (the vmapped weight-gradient convolution's
# im2col workspace, or per-example gradients that are not kept): chunked over the batch. Measured (CNN, batch
# 512): unchunked, one 64-channel 16×16 layer's instantiation took 216 MB above the step's other memory.
PER_EXAMPLE_BUDGET = 2**22


def choose(mode: str, T: int, p: int, d: int) -> str:
    """The mixed rule (Bu, Mao & Xu 2022, Sec. 3.2): the ghost norm costs O(B·T²·(p+d)) time and B·T²
    memory, instantiation O(B·T·p·d) time and B·p·d memory; ghost wins when 2T² < p·d."""
    if mode == "ghost":
        return "ghost"
    if mode == "per_sample":
        return "instantiate"
    return "ghost" if 2 * T * T < p * d else "instantiate"


class Rule:
    """How the per-example gradients of the parameters one module owns are normed and summed.

    The protocol (what the engine relies on; `entry` is the plan's Entry: module, owned params, choice):
      name      label in the engine's table of rules (describe()).
      eager     True: the rule may run as soon as one call's output gradients are all in (the engine then frees
                that call's inputs at once). False (the fallback): it runs after the whole backward.
      expands   False: the engine hooks the module's outputs and stores its inputs (Record.args / grads[k] is
                the gradient of output k). True: the rule's `taps` replace the owned parameters inside the
                forward by per-example stand-ins with a leading batch dimension (B, ...); grads[k] is the
                gradient of tap k, from which `per_example` reads each parameter's per-example gradient.
      serves(module)                           False: a variant left to the exact fallback.
      needs_input(entry)                       False: Record.args is () (only output gradients are needed).
      check(module, name)                      raise CoverageError for a variant not computed exactly.
      norms(entry, recs, mode, keep) → (n2, state)
                (B,) squared norms of the owned parameters' per-example gradients and what `accumulate` needs;
                keep=False: the state is discarded (the two-pass norm pass), so skip building it.
      accumulate(entry, recs, c, state)        p.grad += Σ_i c_i·g_i[p] for every owned p.
      accumulate_plain(entry, recs)            p.grad += Σ over rows (the two-pass engine's clipped pass, whose
                                               output gradients' rows the engine scaled by c_i).
    Rules raise, never approximate: whatever they cannot compute exactly is refused in `check` or `norms`.
    """

    name = "rule"
    eager = True
    expands = False

    def needs_input(self, entry) -> bool:
        """False: norms and sums come from the output gradients alone (a bias-only layer), so the engine does not
        keep the call's input (activation memory the fine-tuning of biases alone does not need)."""
        return True

    def serves(self, module: nn.Module) -> bool:
        """False: a variant of the type this rule does not compute, which goes to the exact fallback instead."""
        return True

    def check(self, module: nn.Module, name: str) -> None:
        """Raise CoverageError for a variant this rule does not compute exactly."""

    def norms(self, entry, recs: list[Record], mode: str, keep: bool = True) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def accumulate(self, entry, recs: list[Record], c: torch.Tensor, state: Any) -> None:
        raise NotImplementedError

    def accumulate_plain(self, entry, recs: list[Record]) -> None:
        """Default: the per-example route with c = 1 (cheap for small rules)."""
        choice = entry.choice
        state = self.norms(entry, recs, "per_sample")[1]
        entry.choice = choice  # describe() reports the first pass's decision
        self.accumulate(entry, recs, torch.ones(recs[0].batch, device=entry.params[0][1].device), state)


def add_grad(p: nn.Parameter, g: torch.Tensor) -> None:
    g = g.to(p.dtype).view_as(p)
    if p.grad is None:
        p.grad = g.clone() if g.data_ptr() == p.data_ptr() else g
    else:
        p.grad.add_(g)


def fold(t: torch.Tensor, B: int) -> torch.Tensor:
    """(B·K, ...) per-row quantities → (B, ...) per-example sums (K = 1: unchanged)."""
    return t if t.shape[0] == B else t.reshape(B, -1, *t.shape[1:]).sum(1)


def cat(ts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


def owned(entry, name: str) -> nn.Parameter | None:
    for n, p in entry.params:
        if n == name:
            return p
    return None


def weighted_sum(per: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Σ_i c_i · per[i]: (B, *shape), (B,) → shape."""
    return torch.einsum("b...,b->...", per, c.to(per.dtype))


def gram_norm2(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ_{t,s} (a_t·a_s)(g_t·g_s) per leading batch index; a: (N, T, d), g: (N, T, p) → (N,).
    Chunked so that at most GRAM_BUDGET Gram entries live at once."""
    N, T = a.shape[0], a.shape[1]
    if T == 1:
        return a.pow(2).sum((1, 2)) * g.pow(2).sum((1, 2))
    step = max(1, GRAM_BUDGET // (T * T))
    out = []
    for s in range(0, N, step):
        aa = torch.bmm(a[s : s + step], a[s : s + step].transpose(1, 2))  # (n, T, T)
        gg = torch.bmm(g[s : s + step], g[s : s + step].transpose(1, 2))
        out.append((aa * gg).sum((1, 2)))
    return torch.cat(out) if out else a.new_zeros(0)


def scale_smaller(a: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_i c_i·g_iᵀa_i is bilinear in (a_i, g_i): scale row i of whichever of the two is smaller by c_i
    (a copy of one tensor, e.g. a ViT qkv layer's (B, T, 192) input instead of its (B, T, 576) output gradient)."""
    if a.numel() <= g.numel():
        return a * c.view(-1, *([1] * (a.dim() - 1))).to(a.dtype), g
    return a, g * c.view(-1, *([1] * (g.dim() - 1))).to(g.dtype)
