"""Per-layer rules, one module per family, and the registry that maps a module's exact type to its rule.

    base.py       the Rule protocol, Record, the mixed rule's cost model, shared tensor helpers
    linear.py     nn.Linear                     conv.py       nn.Conv1d/2d/3d
    std_conv.py   timm's weight-standardised convs (BiT ResNet-V2, NFNet), by the chain rule through f(w)
    norm.py       LayerNorm, GroupNorm, InstanceNorm, timm LayerNorm2d, LayerScale(2d)
    embedding.py  nn.Embedding                  expand.py     tokens / position embeddings, block layer scale
    beit.py       timm BEiT attention (functional qkv, q/v biases, relative-position table), shared rel-pos bias,
                  Swin's window attention
    fallback.py   any other module with parameters (torch.func replay; slow, reported)

To support a new layer type: write a Rule (base.Rule's docstring says what it must provide) and add its type
to RULES below (or to `_timm_rules`). A subclass of a listed type gets its parent's rule only if it overrides
nothing the parent defines (`rule_for`).
"""

from __future__ import annotations

from timm.layers import LayerNorm as TimmLN
from timm.layers import LayerNorm2d as TimmLN2d
from timm.layers import LayerScale, LayerScale2d, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from timm.layers import Linear as TimmLinear
from timm.models import beit, cait, convnext, eva, swin_transformer
from torch import nn

from ..records import Record
from .attention import AttentionRule, SharedBiasRule, WindowAttentionRule
from .base import Rule, choose
from .conv import ConvRule
from .embedding import EmbeddingRule
from .expand import ConvNeXtGammaRule, ExpandRule, GammaRule, TokenRule
from .fallback import FALLBACK, FallbackRule, is_replaying, replaying
from .linear import LinearRule
from .norm import GroupNormRule, InstanceNormRule, LayerNormRule, ScaleRule
from .std_conv import StdConvRule

TOKEN = TokenRule()


def _timm_rules() -> dict[type, Rule]:
    gamma, std = GammaRule(), StdConvRule()
    # timm's Linear overrides forward only to cast dtypes under torchscript: the same function as nn.Linear
    return {TimmLinear: LinearRule(), TimmLN: LayerNormRule(), TimmLN2d: LayerNormRule(channels_first=True),
            LayerScale: ScaleRule(-1), LayerScale2d: ScaleRule(1), beit.Block: gamma, cait.LayerScaleBlock: gamma,
            cait.LayerScaleBlockClassAttn: gamma, eva.EvaBlock: gamma, beit.Attention: AttentionRule(),
            beit.RelativePositionBias: SharedBiasRule(), convnext.ConvNeXtBlock: ConvNeXtGammaRule(),
            swin_transformer.WindowAttention: WindowAttentionRule(), StdConv2d: std, StdConv2dSame: std,
            ScaledStdConv2d: std, ScaledStdConv2dSame: std}


# Exact type → rule. Subclasses that override forward are not assumed to compute the same thing:
# they go to the fallback (exact) unless listed here.
RULES: dict[type, Rule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Conv3d: ConvRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.GroupNorm: GroupNormRule(),
    nn.InstanceNorm1d: InstanceNormRule(),
    nn.InstanceNorm2d: InstanceNormRule(),
    nn.InstanceNorm3d: InstanceNormRule(),
    nn.Embedding: EmbeddingRule(),
    **_timm_rules(),
}


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for `module`, or None (the exact fallback). A rule replaces the whole computation of its type —
    `forward` and every method it calls (Conv2d.forward calls `_conv_forward`, which a weight-standardised conv
    overrides) — so a subclass gets its parent's rule only if it overrides nothing the parent defines."""
    if "forward" in vars(module):  # a forward set on the instance
        return None
    rule = RULES.get(type(module))
    if rule is None:
        rule = next((r for b, r in RULES.items() if isinstance(module, b) and _computes_as(type(module), b)), None)
    return rule if rule is not None and rule.serves(module) else None


# Methods a subclass may define without changing what the module computes
_HARMLESS = {"__init__", "extra_repr", "reset_parameters", "__repr__", "__setstate__", "__getstate__",
             "_load_from_state_dict", "__init_subclass__", "__class_getitem__"}


def _computes_as(cls: type, base: type) -> bool:
    """Whether every class between `cls` and `base` leaves the parent's behaviour alone: it may add new methods
    and class constants, but not override a method or attribute that `base` (or nn.Module) defines, and not
    define a property or other descriptor (a `weight` property, as parametrizations install, changes the
    forward's weight)."""
    for klass in cls.__mro__:
        if klass is base:
            return True
        for name, value in vars(klass).items():
            if name in _HARMLESS or (name.startswith("__") and name.endswith("__") and not callable(value)):
                continue
            if hasattr(base, name) or isinstance(value, property) or hasattr(value, "__get__") and hasattr(
                    value, "__set__"):
                return False
    return False


__all__ = ["FALLBACK", "RULES", "TOKEN", "ExpandRule", "FallbackRule", "Record", "Rule", "choose", "is_replaying",
           "replaying", "rule_for"]
