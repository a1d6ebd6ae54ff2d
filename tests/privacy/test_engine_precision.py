"""Issue #18 on the engine: under autocast the norms and the clipped sum are float32 from the same per-example
quantities, so one example's clipped contribution stays ≤ R up to float32 rounding; a scaled loss (fp16's
GradScaler) is clipped on the unscaled gradients."""

import pytest
import timm
import torch
import torch.nn.functional as F

from dptrain.privacy import PrivacyEngine
from dptrain.testing import tiny_beit, tiny_vgg, tiny_vit

MODES = ["mixed_ghost", "ghost", "per_sample"]


@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make", [tiny_vgg, tiny_vit, tiny_beit], ids=["vgg_gn", "vit", "beit"])
def test_bf16_single_example_stays_within_the_bound(make, mode, passes):
    """The bound of the issue: one example alone, ‖clipped gradient‖ ≤ R·(1 + 1e-3) under bf16 autocast on CPU
    (float32 rounding only: the contribution is c·g with c computed from ‖g‖ of that same float32 g)."""
    torch.manual_seed(0)
    model = make()
    R = 1e-3  # far below every example's norm: the example is clipped
    engine = PrivacyEngine(model, mode=mode, max_grad_norm=R, passes=passes)
    x = torch.randn(1, 3, 16 if make is tiny_vgg else 8, 16 if make is tiny_vgg else 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    F.cross_entropy(out.float(), torch.tensor([1]), reduction="sum").backward()
    total = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters()))
    assert engine.per_sample_norms.item() > 100 * R
    assert total.item() <= R * (1 + 1e-3)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    engine.detach()


@pytest.mark.parametrize("mode", MODES)
def test_bf16_batch_is_close_to_float32(mode):
    """The same batch in bf16 and in float32: gradients agree to bf16's precision (not a bound: a sanity check
    that the bf16 path clips the right examples)."""
    torch.manual_seed(0)
    model = tiny_vit()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    grads = []
    for amp in (False, True):
        engine = PrivacyEngine(model, mode=mode, max_grad_norm=0.5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        F.cross_entropy(out.float(), y, reduction="sum").backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
        engine.detach()
    rel = (grads[0] - grads[1]).norm() / grads[0].norm()
    assert rel < 5e-2


@pytest.mark.parametrize("mode", MODES)
def test_scaled_loss_is_clipped_on_unscaled_gradients(mode):
    """loss_scale = S with the loss multiplied by S (GradScaler): the norms are the unscaled ones and .grad is S
    times the unscaled clipped sum — clipping the scaled gradients at R would clip at R·S."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                              num_classes=3).double()
    x, y = torch.randn(3, 3, 8, 8).double(), torch.tensor([0, 1, 2])
    out = []
    for S in (1.0, 1024.0):
        engine = PrivacyEngine(model, mode=mode, max_grad_norm=0.05)
        engine.loss_scale = S
        (S * F.cross_entropy(model(x), y, reduction="sum")).backward()
        out.append((engine.per_sample_norms.clone(), [p.grad / S for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
        engine.detach()
    (n1, g1), (n2, g2) = out
    assert torch.allclose(n1, n2, rtol=1e-12) and (n1 > 0.05).all()
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(g1, g2))


@pytest.mark.parametrize("mode", MODES)
def test_overflowed_example_is_left_out_not_the_step(mode):
    """With a loss scale (fp16), an example whose gradient is not finite contributes nothing; the others' clipped
    sum is exactly what it is without that example (no NaN spreads, no data-dependent skipped step)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                              num_classes=3).double()
    x, y = torch.randn(4, 3, 8, 8).double(), torch.tensor([0, 1, 2, 0])
    x[1] = float("inf")  # example 1 overflows
    grads = []
    for batch, S in ((slice(None), 8.0), ([0, 2, 3], 1.0)):
        engine = PrivacyEngine(model, mode=mode, max_grad_norm=0.05)
        engine.loss_scale = S
        (S * F.cross_entropy(model(x[batch]), y[batch], reduction="sum")).backward()
        grads.append([p.grad / S for p in model.parameters()])
        dropped = engine.dropped
        model.zero_grad(set_to_none=True)
        engine.detach()
    assert dropped == 0  # the second run (no overflow)
    assert all(torch.isfinite(a).all() and torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(*grads))


def test_dropped_counts_every_overflowed_example_and_only_under_a_loss_scale():
    """engine.dropped adds up over backwards (one overflowed example each, at S = 2). Without a loss scale (float32)
    nothing is dropped: the non-finite gradient reaches .grad, where the divergence guard stops the run."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3)).double()
    x, y = torch.randn(3, 5).double(), torch.tensor([0, 1, 2])
    x[1] = float("inf")
    engine = PrivacyEngine(model, max_grad_norm=1.0)
    engine.loss_scale = 2.0
    for k in (1, 2):
        (2.0 * F.cross_entropy(model(x), y, reduction="sum")).backward()
        assert engine.dropped == k
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)
    engine.loss_scale = 1.0
    F.cross_entropy(model(x), y, reduction="sum").backward()
    assert engine.dropped == 2 and not all(torch.isfinite(p.grad).all() for p in model.parameters())
    engine.detach()


def test_an_overflowed_examples_clip_factor_is_zero_and_its_state_rows_are_zeroed():
    """Both halves of leaving an overflowed example out, each checked on its own (either alone would hide the other's
    loss in the gradient): its clip factor is 0 while the others' stay min(1, R/‖g_i‖), and every per-example state
    tensor of the rules has that example's rows (k per example) set to 0 — 0·inf would be NaN — other rows, tensors
    whose rows are not whole multiples of the examples, and non-tensors untouched."""
    from dptrain.privacy.engine import _zero_rows

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3)).double()
    x, y = torch.randn(3, 5).double(), torch.tensor([0, 1, 2])
    x[1] = float("inf")
    R, S = 0.5, 4.0
    engine = PrivacyEngine(model, max_grad_norm=R)
    engine.loss_scale = S
    seen, clip_factors = [], engine._clip_factors
    engine._clip_factors = lambda records: seen.append(clip_factors(records)) or seen[-1]
    (S * F.cross_entropy(model(x), y, reduction="sum")).backward()
    c, norms = seen[0][0], engine.per_sample_norms
    assert engine.dropped == 1 and not torch.isfinite(norms[1]) and torch.isfinite(norms[[0, 2]]).all()
    assert c[1].item() == 0.0 and torch.equal(c[[0, 2]], (R / norms[[0, 2]]).clamp(max=1.0))
    engine.detach()

    bad = torch.tensor([False, True, False])
    t = torch.arange(1.0, 13.0).view(6, 2)  # 2 rows per example
    assert torch.equal(_zero_rows(bad, t), torch.tensor([[1., 2], [3, 4], [0, 0], [0, 0], [9, 10], [11, 12]]))
    idx = torch.tensor([[4, 5], [6, 7], [8, 9]])
    assert torch.equal(_zero_rows(bad, idx), torch.tensor([[4, 5], [0, 0], [8, 9]]))
    other = torch.ones(4, 2)
    assert _zero_rows(bad, other) is other and _zero_rows(bad, 3) == 3 and _zero_rows(bad, torch.tensor(2.0)) == 2
