"""Coverage plan: which rule computes each trainable parameter's per-example gradient.

The plan walks the module tree top-down. A module with a rule (rules.RULES) owns its direct
parameters; a module with trainable direct parameters and no rule becomes a *fallback unit* that owns
every trainable parameter of its subtree (its children are not hooked separately); anything else is
descended into. Whatever cannot be covered exactly raises `CoverageError` naming the parameter and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .errors import CoverageError
from .rules import FALLBACK, TOKEN, Rule, rule_for
from .sequence_first import mark

MODES = ("mixed_ghost", "ghost", "per_sample")


@dataclass
class Entry:
    """One hooked module and the rule that clips the parameters it owns."""

    name: str
    module: nn.Module
    rule: Rule
    params: list[tuple[str, nn.Parameter]]  # (name relative to `module`, parameter)
    choice: str = ""  # last decision: ghost / instantiate / fallback
    calls: int = 0
    dropouts: list[nn.Module] = field(default_factory=list)  # only for fallback units
    split: set[int] | None = None  # fallback: flat argument positions that are per example (probe.py); None: unprobed
    batch_dim: int = 0  # 1: a sequence-first call (T, B, …), recorded batch-first (sequence_first.py)

    def label(self) -> str:
        return f"{self.name or '<root>'} ({type(self.module).__name__})"


_BATCHNORM = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def _dropouts(module: nn.Module) -> list[nn.Module]:
    """Random layers a fallback replay could not reproduce (nn.Dropout*, timm DropPath, nn.MultiheadAttention's own
    attention dropout)."""
    out = []
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd | nn.MultiheadAttention) or hasattr(m, "drop_prob"):
            out.append(m)
    return out


def build_plan(model: nn.Module, *, fallback: tuple = ()) -> list[Entry]:
    """Assign every trainable parameter to exactly one Entry, or raise CoverageError.
    `fallback`: module types or qualified names to replay as a whole (fallback units)."""
    _check_shared(model)
    entries: list[Entry] = []
    forced_types = tuple(f for f in fallback if isinstance(f, type))
    forced_names = {f for f in fallback if isinstance(f, str)}

    def visit(name: str, module: nn.Module) -> None:
        if isinstance(module, _BATCHNORM) and any(p.requires_grad for p in module.parameters()):
            raise CoverageError(
                f"BatchNorm layer '{name}' mixes examples, so per-example gradients are undefined; "
                "replace it with GroupNorm (dptrain.models.factory.fix_batchnorm or opacus ModuleValidator.fix)"
            )
        _unsupported(name, module)
        inner = {id(p) for c in module.children() for p in c.parameters()}  # aliases of a child's parameter
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad and id(p) not in inner]
        forced = isinstance(module, forced_types) or name in forced_names  # the user's fallback wins over a rule
        rule = None if forced or not own else rule_for(module) or (TOKEN if TOKEN.applies(module, own) else None)
        if rule is not None:
            rule.check(module, name)
            entries.append(Entry(name, module, rule, own))
            # the rule owns only the module's direct parameters: its children keep their own rules
            for child_name, child in module.named_children():
                visit(f"{name}.{child_name}" if name else child_name, child)
            return
        if own or (forced and any(p.requires_grad for p in module.parameters())):
            sub = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
            for bn_name, m in module.named_modules():
                if isinstance(m, _BATCHNORM):
                    raise CoverageError(
                        f"BatchNorm layer '{name}.{bn_name}' mixes examples; replace it with GroupNorm "
                        "(dptrain.models.factory.fix_batchnorm or opacus ModuleValidator.fix)"
                    )
            entries.append(Entry(name, module, FALLBACK, sub, dropouts=_dropouts(module)))
            return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    covered = {id(p) for e in entries for _, p in e.params}
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in covered:  # pragma: no cover - visit() covers every module
            raise CoverageError(f"parameter '{n}' is not covered by any rule")
    mark(model, entries)  # sequence-first torch modules (batch_first=False): their calls are recorded batch-first
    return entries


def _check_shared(model: nn.Module) -> None:
    """Tied weights (one Parameter used by two modules) would need a joint per-example gradient. A parameter
    that a module also registers under an alias of its own (Opacus' DPLSTM exposes `weight_ih_l0` for its
    `l0.ih.weight`) is one use: allowed when every name lies on one line of ancestry."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            names.setdefault(id(p), []).append(n)
    for ns in names.values():
        owners = sorted((n.rpartition(".")[0] for n in ns), key=len)
        deepest = owners[-1]
        if not all(o == "" or deepest == o or deepest.startswith(o + ".") for o in owners):
            raise CoverageError(
                f"parameter '{ns[1]}' is the same tensor as '{ns[0]}' (tied weights); its per-example "
                "gradient would need both uses together. Untie the weights or freeze one use "
                "(requires_grad=False)."
            )


def _unsupported(name: str, module: nn.Module) -> None:
    """Layer types with trainable parameters that no rule covers and the fallback cannot replay: one line each."""
    if isinstance(module, nn.RNNBase) and any(p.requires_grad for p in module.parameters(recurse=False)):
        first = next(n for n, p in module.named_parameters(recurse=False) if p.requires_grad)
        dp = {"LSTM": "DPLSTM", "GRU": "DPGRU"}.get(type(module).__name__, "DPRNN")
        raise CoverageError(
            f"'{name}.{first}': {type(module).__name__}'s fused recurrent kernel has no per-example gradient here; "
            f"use opacus.layers.{dp} (same interface, built from Linear layers the engine clips exactly)")
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
        raise CoverageError(
            f"InstanceNorm '{name}' has track_running_stats=True: its running statistics are computed from the "
            "batch (they would leak the data, unnoised); set track_running_stats=False")


def describe(entries: list[Entry]) -> str:
    """One line per hooked module: the rule and, once a backward ran, the choice it made."""
    lines = []
    for e in entries:
        names = ", ".join(n for n, _ in e.params)
        lines.append(f"  {e.label():<48} {e.rule.name:<10} {e.choice or '-':<12} [{names}]")
    return "\n".join(lines)

