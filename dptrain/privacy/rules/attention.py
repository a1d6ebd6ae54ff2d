"""timm attention blocks on the fast path: BEiT's attention and shared relative-position bias, Swin's window attention.

BEiT's attention calls `F.linear(x, self.qkv.weight, bias=cat(q_bias, k_bias, v_bias))`, so hooks on `qkv`
never fire, and it owns the q/v biases and a relative-position bias table (num_rel, heads) that it gathers into
a (heads, N, N) bias on the attention logits. `AttentionRule` runs the same computation with `qkv` and `proj`
called as modules (their Linear rules, ghost or instantiated, apply) and two per-example stand-ins (taps):
    bias  (B, 1, 3d)        added to qkv(x)'s output;      q/v biases' gradient = its q and v thirds
    rel   (B, heads, N, N)  added to the attention logits;  the table's gradient = index_add over the N² pairs
`SharedBiasRule` does the same for `RelativePositionBias` (one table used by every block): its (heads, N, N)
output becomes a (B, heads, N, N) tap. The adapter's output is compared with timm's own forward once per module
at attach (`ExpandRule.verify`), so a timm release that changes the attention fails closed instead of clipping
a different function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import CoverageError
from .expand import ExpandRule


def _table_grad(g: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """(B, heads, N, N) gradient of the gathered bias → (B, rows, heads) gradient of the table. The index_add runs
    along the last, contiguous dimension of (B·heads, N²): 5× faster on CPU than along dim 1 of (B, N², heads)."""
    B, H = g.shape[:2]
    out = g.new_zeros(B * H, rows)
    out.index_add_(1, index.reshape(-1), g.reshape(B * H, -1))
    return out.view(B, H, rows).transpose(1, 2).contiguous()


def _gathered(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table (num_rel, heads) gathered to the (heads, N, N) bias, as timm does."""
    N = index.shape[0]
    return table[index.reshape(-1)].view(N, N, -1).permute(2, 0, 1)


class AttentionRule(ExpandRule):
    """timm.models.beit.Attention: owns q_bias, v_bias (optional) and relative_position_bias_table (optional)."""

    name = "beit_attn"

    def check(self, module, name):
        own = {n for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        unknown = own - {"q_bias", "v_bias", "relative_position_bias_table"}
        if unknown:
            raise CoverageError(f"BEiT attention '{name}' owns parameters the adapter does not know: {sorted(unknown)}")
        N = (module.window_size[0] * module.window_size[1] + 1) if module.window_size is not None else 5
        x = torch.randn(2, N, module.qkv.in_features, generator=torch.Generator().manual_seed(0))
        self.verify(module, name, x.to(next(module.parameters())))

    def _tap_names(self, module) -> list[str]:
        return (["bias"] if module.q_bias is not None else []) + (
            ["rel"] if module.relative_position_bias_table is not None else [])

    def taps(self, module, params, rows):
        out = []
        if module.q_bias is not None:
            b = torch.cat((module.q_bias, module.k_bias, module.v_bias)).detach()
            out.append(b.view(1, 1, -1).expand(rows, 1, b.shape[0]))
        if module.relative_position_bias_table is not None:
            rel = _gathered(module.relative_position_bias_table.detach(), module.relative_position_index)
            out.append(rel.unsqueeze(0).expand(rows, *rel.shape))
        return out

    def run(self, module, forward, params, taps, args, kwargs):
        return _attention(module, dict(zip(self._tap_names(module), taps)), *args, **kwargs)

    def per_example(self, entry, k, g):
        m = entry.module
        index = {n: i for i, (n, _) in enumerate(entry.params)}
        if self._tap_names(m)[k] == "bias":
            d = g.shape[-1] // 3
            g = g.reshape(g.shape[0], -1)
            return [(index[n], part) for n, part in (("q_bias", g[:, :d]), ("v_bias", g[:, 2 * d :])) if n in index]
        if "relative_position_bias_table" not in index:
            return []
        table = m.relative_position_bias_table
        return [(index["relative_position_bias_table"], _table_grad(g, m.relative_position_index, table.shape[0]))]


def _attention(m, taps: dict, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
    """timm 1.0's Beit Attention.forward with qkv/proj called as modules and the biases from the taps."""
    B, N, C = x.shape
    qkv = m.qkv(x)  # (B, N, 3·heads·hd)
    if "bias" in taps:
        qkv = qkv + taps["bias"]
    q, k, v = qkv.reshape(B, N, 3, m.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, hd)
    bias = taps.get("rel")
    if shared_rel_pos_bias is not None:
        bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
    if m.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=m.attn_drop.p if m.training else 0.0)
    else:
        attn = (q * m.scale) @ k.transpose(-2, -1)
        if bias is not None:
            attn = attn + bias
        x = m.attn_drop(attn.softmax(dim=-1)) @ v
    return m.proj_drop(m.proj(x.transpose(1, 2).reshape(B, N, -1)))


class SharedBiasRule(ExpandRule):
    """timm.models.beit.RelativePositionBias (use_shared_rel_pos_bias): forward() → (heads, N, N), shared by all
    blocks; the engine's tap gives each example its own copy, (B, heads, N, N)."""

    name = "beit_relpos"

    def taps(self, module, params, rows):
        rel = _gathered(module.relative_position_bias_table.detach(), module.relative_position_index)
        return [rel.unsqueeze(0).expand(rows, *rel.shape)]

    def run(self, module, forward, params, taps, args, kwargs):
        return taps[0]

    def per_example(self, entry, k, g):
        m = entry.module
        return [(0, _table_grad(g, m.relative_position_index, m.relative_position_bias_table.shape[0]))]


class WindowAttentionRule(ExpandRule):
    """timm Swin's WindowAttention: runs on B·nW window rows (each example's nW windows consecutive, as timm's
    window_partition lays them out and the engine's probe checks); owns the relative-position table, read through
    `_get_rel_pos_bias()` → (1, heads, N, N). The tap is that bias per window row, (B·nW, heads, N, N): folded
    over an example's windows it is the example's gradient of the gathered bias. qkv/proj keep their Linear rules."""

    name = "swin_attn"

    def check(self, module, name):
        own = {n for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if own != {"relative_position_bias_table"}:
            raise CoverageError(f"Swin attention '{name}' owns parameters the rule does not know: {sorted(own)}")
        x = torch.randn(2, module.window_area, module.qkv.in_features, generator=torch.Generator().manual_seed(0))
        self.verify(module, name, x.to(next(module.parameters())))

    def taps(self, module, params, rows):
        rel = _gathered(module.relative_position_bias_table.detach(), module.relative_position_index)
        return [rel.unsqueeze(0).expand(rows, *rel.shape)]

    def run(self, module, forward, params, taps, args, kwargs):
        module._get_rel_pos_bias = lambda: taps[0]  # the instance attribute shadows the method for this call
        try:
            return forward(*args, **kwargs)
        finally:
            del module._get_rel_pos_bias

    def per_example(self, entry, k, g):
        m = entry.module
        return [(0, _table_grad(g, m.relative_position_index, m.relative_position_bias_table.shape[0]))]
