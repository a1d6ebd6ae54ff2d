"""Issue #14 items 2–4: the engine refuses layers whose rows are not the examples (sequence-first layouts, also
when T == B; torch's batch_first=False attention modules are read batch-first instead: test_engine_seqfirst.py), never
splits a tensor shared by the batch, and refuses Embedding(scale_grad_by_freq=True) — in
both pass modes. Exactness where it accepts (a shared table of another size) against the float64 reference."""

import pytest
import torch
from torch import nn

from dptrain.privacy import CoverageError, PrivacyEngine
from dptrain.testing import check, step

PASSES = [1, 2]


class SeqFirst(nn.Module):
    """(B, T, d) → a Linear applied after a transpose to (T, B, d): per-row = per-time-step."""

    def __init__(self, d=4, frozen_head=False):
        super().__init__()
        self.fc, self.head = nn.Linear(d, d), nn.Linear(d, 3)
        self.head.requires_grad_(not frozen_head)

    def forward(self, x):
        h = torch.tanh(self.fc(x.transpose(0, 1)))  # (T, B, d)
        return self.head(h.mean(0))


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("T", [3, 4], ids=["T==B", "T!=B"])
@pytest.mark.parametrize("frozen_head", [False, True], ids=["head", "frozen_head"])
def test_sequence_first_linear_is_refused(T, frozen_head, passes):
    torch.manual_seed(0)
    x, y = torch.randn(3, T, 4), torch.tensor([0, 1, 2])
    with pytest.raises(CoverageError, match="fc .*not the examples"):
        step(SeqFirst(frozen_head=frozen_head), x, y, passes=passes)


class MHA(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.head = nn.Linear(4, 3)
        self.batch_first = batch_first

    def forward(self, x):  # x: (B, T, d)
        h = x if self.batch_first else x.transpose(0, 1)
        out = self.attn(h, h, h, need_weights=False)[0]
        return self.head((out if self.batch_first else out.transpose(0, 1)).mean(1))


@pytest.mark.parametrize("passes", PASSES)
def test_multihead_attention_sequence_first_is_exact_when_T_equals_B(passes):
    """batch_first=False (refused until the second half of item 2): read batch-first from its attribute, confirmed by
    the probe, exact (tests/privacy/test_engine_seqfirst.py has the modes, T != B and the Transformer layers)."""
    torch.manual_seed(0)
    data = [(torch.randn(3, 3, 4), torch.tensor([0, 1, 2])), (torch.randn(2, 3, 4), torch.tensor([2, 0]))]
    err, engine = check(MHA(batch_first=False), data, mode="mixed_ghost", max_grad_norm=0.5, passes=passes)
    assert err < 1e-12 and engine.per_sample_norms.shape == (2,)


@pytest.mark.parametrize("passes", PASSES)
def test_multihead_attention_batch_first_is_exact(passes):
    torch.manual_seed(0)
    data = [(torch.randn(3, 3, 4), torch.tensor([0, 1, 2])), (torch.randn(2, 3, 4), torch.tensor([2, 0]))]
    err, _ = check(MHA(batch_first=True), data, mode="mixed_ghost", max_grad_norm=0.5, passes=passes)
    assert err < 1e-12


class WithTable(nn.Module):
    """A fallback unit that takes a (T, d) table shared by every example as an argument."""

    def __init__(self, T):
        super().__init__()
        self.table = nn.Parameter(torch.randn(T, 4), requires_grad=False)
        self.mix = Mix()
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x: (B, T, d)
        return self.head(self.mix(x, self.table).mean(1))


class Mix(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x, table):
        return torch.tanh(x * self.w + table)  # table (T, d) broadcast over the batch


@pytest.mark.parametrize("passes", PASSES)
def test_fallback_never_splits_a_shared_table(passes):
    """T == B: the table would be split across examples — refused as ambiguous. T != B: exact."""
    torch.manual_seed(0)
    with pytest.raises(CoverageError, match="mix .*do not depend on the examples"):
        step(WithTable(T=3), torch.randn(3, 3, 4), torch.tensor([0, 1, 2]), passes=passes)
    data = [(torch.randn(3, 5, 4), torch.tensor([0, 1, 2])), (torch.randn(2, 5, 4), torch.tensor([2, 0]))]
    err, engine = check(WithTable(T=5), data, mode="mixed_ghost", max_grad_norm=0.3, passes=passes)
    assert err < 1e-12 and 0 < engine.fallback_share < 1
    # the probe (on the first 3 rows) saw the table as shared, so a later batch of 4 = T leaves it whole
    data = [(torch.randn(3, 4, 4), torch.tensor([0, 1, 2])), (torch.randn(4, 4, 4), torch.tensor([2, 0, 1, 1]))]
    err, _ = check(WithTable(T=4), data, mode="mixed_ghost", max_grad_norm=0.3, passes=passes)
    assert err < 1e-12


@pytest.mark.parametrize("passes", PASSES)
def test_embedding_scale_grad_by_freq_is_refused(passes):
    model = nn.Sequential(nn.Embedding(10, 4, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(CoverageError, match="scale_grad_by_freq"):
        PrivacyEngine(model, passes=passes)


def test_probe_leaves_training_state_and_random_stream_alone():
    """The probe runs in eval mode on a forked random state: the training forward sees what it would without it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    x = torch.randn(5, 4)
    torch.manual_seed(1)
    want = model(x)
    engine = PrivacyEngine(model)
    torch.manual_seed(1)
    got = model(x)
    assert model.training and torch.equal(got, want)
    engine.detach()


class SeqMix(nn.Module):
    """A fallback unit (own parameter, no rule) the user applies to (T, B, d): nothing says it is sequence-first."""

    def __init__(self):
        super().__init__()
        self.mix = Mix()
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x: (B, T, d)
        return self.head(self.mix(x.transpose(0, 1), 0.0).mean(0))


@pytest.mark.parametrize("passes", PASSES)
def test_sequence_first_with_a_multiple_of_the_batch_is_refused_as_sequence_first(passes):
    """T = 2B through a fallback unit after the user's transpose: every row moves with example 0 — sequence-first,
    not two rows per example. (nn.MultiheadAttention(batch_first=False) is now read batch-first and exact.)"""
    torch.manual_seed(0)
    with pytest.raises(CoverageError, match=r"mix \(Mix\): rows \[0, 1, 2, 3, 4, 5\] .*moved with "
                                            r"example 0.*batch_first=True"):
        step(SeqMix(), torch.randn(3, 6, 4), torch.tensor([0, 1, 2]), passes=passes)


@pytest.mark.parametrize("passes", PASSES)
def test_window_attention_on_the_fallback_is_refused_as_needing_a_rule(passes):
    """Swin V2's WindowAttention has no rule: on the fallback it sees B·nW window rows, each example's consecutive.
    Refused naming the module and what it needs, not as a sequence-first layout (issue #15 item 2)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("swinv2_tiny_window8_256", img_size=16, patch_size=2, window_size=4, embed_dim=8,
                              depths=(2, 2), num_heads=(2, 2), num_classes=3)
    with pytest.raises(CoverageError, match=r"^layers\.0\.blocks\.0\.attn \(WindowAttention\): its \(12, 16, 8\) "
                                            r"input has 4 rows per example .*needs a rule of its own"):
        step(model, torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2]), passes=passes)
