"""Issue #14 item 2, second half: torch's sequence-first attention modules (batch_first=False) inside a batch-first
model train exactly (layout.py: recorded batch-first, read from their batch_first attributes, confirmed by the probe),
in all three modes and with passes=2, T == B and T != B — against the float64 one-example reference. Any layout the
module's attribute and the probe do not both confirm stays refused."""

import pytest
import torch
from torch import nn

from dptrain.privacy import CoverageError
from dptrain.testing import check, reference_grads, step

MODES = ["ghost", "per_sample", "mixed_ghost"]
PASSES = [1, 2]


class SeqMHA(nn.Module):
    """(B, T, d) → nn.MultiheadAttention at its default batch_first=False on (T, B, d) → (B, 3)."""

    def __init__(self, d=4, frozen_head=False, kwargs=False, causal=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2)
        self.head = nn.Linear(d, 3)
        self.head.requires_grad_(not frozen_head)
        self.kwargs, self.causal = kwargs, causal

    def forward(self, x):
        h = x.transpose(0, 1)  # (T, B, d)
        mask = nn.Transformer.generate_square_subsequent_mask(h.shape[0], dtype=h.dtype) if self.causal else None
        if self.kwargs:
            out = self.attn(query=h, key=h, value=h, attn_mask=mask, need_weights=False)[0]
        else:
            out = self.attn(h, h, h, attn_mask=mask)[0]  # need_weights=True: a second, batch-first output
        return self.head(out.transpose(0, 1).mean(1))


class SeqEncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer(batch_first=False): its Linear / LayerNorm children see (T, B, d) too."""

    def __init__(self, d=4, norm_first=False):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=8, dropout=0.0, norm_first=norm_first)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.layer(x.transpose(0, 1)).transpose(0, 1).mean(1))


def data(T, d=4):
    torch.manual_seed(0)
    return [(torch.randn(3, T, d), torch.tensor([0, 1, 2])), (torch.randn(2, T, d), torch.tensor([2, 0]))]


def mixed_bound(model, batches):
    """R between the smallest and the largest per-example norm: some examples clipped, some not (pitfalls.md)."""
    import copy

    m = copy.deepcopy(model).double()
    b = [(x.double(), y) for x, y in batches]
    norms = reference_grads(m, b, max_grad_norm=1.0)[1]
    return float(norms.median())


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [3, 6], ids=["T==B", "T==2B"])  # first batch B = 3, second B = 2 (T != B)
@pytest.mark.parametrize("make", [SeqMHA, SeqEncoderLayer], ids=["mha", "encoder_layer"])
def test_sequence_first_attention_is_exact(make, T, mode, passes):
    torch.manual_seed(0)
    model, batches = make(), data(T)
    R = mixed_bound(model, batches)
    err, engine = check(model, batches, mode=mode, max_grad_norm=R, passes=passes)
    assert err < 1e-12
    assert engine.per_sample_norms.shape == (2,)  # one norm per example of the last batch, not per time step
    assert {e.name for e in engine.entries if e.batch_dim == 1} == (
        {"attn"} if make is SeqMHA else {"layer.self_attn", "layer.linear1", "layer.linear2", "layer.norm1",
                                         "layer.norm2"})


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("make,T", [(lambda: SeqMHA(frozen_head=True), 3),
                                    (lambda: SeqMHA(kwargs=True, causal=True), 5),
                                    (lambda: SeqEncoderLayer(norm_first=True), 3)],
                         ids=["frozen_head", "kwargs_causal_mask", "norm_first"])
def test_sequence_first_attention_variants_are_exact(make, T, passes):
    """Every trainable layer sequence-first (frozen head: no batch-first layer to compare rows with), the attention
    called with keywords and a (T, T) mask (T != B: at T == B the mask is refused as ambiguous, below), the pre-norm
    layer."""
    model, batches = make(), data(T)
    err, _ = check(model, batches, mode="mixed_ghost", max_grad_norm=mixed_bound(model, batches), passes=passes)
    assert err < 1e-12


class SeqTransformer(nn.Module):
    """nn.Transformer(batch_first=False): encoder and decoder layers, their final norms, cross-attention over a memory
    of S ≠ T steps."""

    def __init__(self, d=4):
        super().__init__()
        self.t = nn.Transformer(d, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=8, dropout=0.0)
        self.head = nn.Linear(d, 3)

    def forward(self, x):  # x: (B, S + 2, d): source the first S steps, target the last 2
        src, tgt = x[:, :-2].transpose(0, 1), x[:, -2:].transpose(0, 1)
        return self.head(self.t(src, tgt).transpose(0, 1).mean(1))


class SeqEncoder(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=8, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.enc(x.transpose(0, 1)).transpose(0, 1).mean(1))


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("make,T", [(SeqTransformer, 5), (SeqEncoder, 3)], ids=["transformer", "encoder"])
def test_sequence_first_transformer_is_exact(make, T, passes):
    torch.manual_seed(0)
    model, batches = make(), data(T)
    err, engine = check(model, batches, mode="mixed_ghost", max_grad_norm=mixed_bound(model, batches), passes=passes)
    assert err < 1e-12
    assert all(e.batch_dim == 1 for e in engine.entries if e.name != "head")


class EncoderPooled(nn.Module):
    """A batch_first=False encoder layer, then mean over dim `pool` and a head. pool=1: the layer is fed (B, T, d),
    so its attention mixes the examples — refused, not re-read; pool=0: the model itself is sequence-first, its input
    (T, B, d) has no batch-first rows."""

    def __init__(self, pool):
        super().__init__()
        self.pool = pool
        self.layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(self.pool))


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("pool,shape", [(1, (3, 3, 4)), (1, (3, 5, 4)), (0, (3, 3, 4)), (0, (5, 3, 4))],
                         ids=["fed_batch_first-T==B", "fed_batch_first-T!=B", "seq_first_model-T==B",
                              "seq_first_model-T!=B"])
def test_a_layout_the_probe_does_not_confirm_is_refused(pool, shape, passes):
    torch.manual_seed(0)
    with pytest.raises(CoverageError, match=r"layer\.self_attn \(MultiheadAttention\).*not the examples.*"
                                            r"batch_first=False says"):
        step(EncoderPooled(pool), torch.randn(*shape), torch.tensor([0, 1, 2]), passes=passes)


class UserSeqMix(nn.Module):
    """A module with its own parameter (a fallback unit) applied after the user's own transpose to (T, B, d)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.tanh(x * self.w)


class UserTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix, self.fc, self.head = UserSeqMix(), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(self.mix(x.transpose(0, 1)))  # (T, B, d): no batch_first attribute tells the engine
        return self.head(h.mean(0))


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("T", [3, 6], ids=["T==B", "T==2B"])
def test_a_users_own_transpose_stays_refused(T, passes):
    torch.manual_seed(0)
    with pytest.raises(CoverageError, match=r"mix \(UserSeqMix\): rows \[0, 1, 2.*moved with example 0"):
        step(UserTranspose(), torch.randn(3, T, 4), torch.tensor([0, 1, 2]), passes=passes)


@pytest.mark.parametrize("passes", PASSES)
def test_a_mask_with_as_many_rows_as_the_batch_stays_refused(passes):
    """A (T, T) mask at T == B: the fallback cannot tell it from per-example rows — refused as ambiguous, as it is
    for batch_first=True."""
    torch.manual_seed(0)
    with pytest.raises(CoverageError, match=r"attn \(MultiheadAttention\): argument \d has 3 rows .*ambiguous"):
        step(SeqMHA(kwargs=True, causal=True), torch.randn(3, 3, 4), torch.tensor([0, 1, 2]), passes=passes)


class DefaultLayer(nn.Module):
    """nn.TransformerEncoderLayer at its defaults (dropout=0.1) in a batch-first model."""

    def __init__(self, batch_first):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, batch_first=batch_first)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.layer(x) if self.layer.self_attn.batch_first else self.layer(x.transpose(0, 1)).transpose(0, 1)
        return self.head(h.mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_dropout_on_the_fallback_is_refused_by_name(batch_first):
    """The default dropout=0.1 reaches the attention (a float, not a Dropout module), which the fallback cannot
    replay: a CoverageError naming the module, not vmap's RuntimeError."""
    with pytest.raises(CoverageError, match=r"^layer\.self_attn \(MultiheadAttention\) .*\(MultiheadAttention, "
                                            r"p=0\.1\); set that dropout"):
        step(DefaultLayer(batch_first).train(), torch.randn(3, 3, 4), torch.tensor([0, 1, 2]))
