"""Fine-tuning as users do it (issue 28): the trainable set changing after attach, subclassed layers, layers called
with different rows per example, activation checkpointing, and an engine that survives an exception — each against
the one-example-at-a-time float64 reference."""

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dptrain.privacy import CoverageError, DPOptimizer, PrivacyEngine
from dptrain.testing import check, engine_grads, max_rel_err, reference_grads, tiny_beit, tiny_convnext, tiny_resnet

MODES = ["mixed_ghost", "ghost", "per_sample"]
MODES_PASSES = [*((m, 1) for m in MODES), ("mixed_ghost", 2)]


def data(shape, n=3, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y, reduction="sum")


def small_r(model, x, y):
    """A clipping bound between the smallest and the largest per-example norm: some examples clipped, some not."""
    _, norms = reference_grads(model, [(x, y)], max_grad_norm=1e9)
    return float(norms.median())


def assert_exact(model, x, y, R, norms=None):
    """The trainable parameters' .grad (and, given, the engine's per-example norms) equal the float64
    one-example-at-a-time reference's at clipping bound R."""
    ref, ref_norms = reference_grads(model, [(x, y)], max_grad_norm=R)
    assert max_rel_err([p.grad for p in model.parameters() if p.requires_grad], ref) < 1e-9
    if norms is not None:
        assert torch.allclose(norms, ref_norms, rtol=1e-9)


# ------------------------------------------------------------------ 1, 2: the trainable set changes after attach
@pytest.mark.parametrize(("mode", "passes"), MODES_PASSES)
def test_a_layer_unfrozen_after_attach_is_clipped_with_the_rest(mode, passes):
    model = mlp()
    x, y = data((6,))
    R = small_r(model, x, y)
    model[2].requires_grad_(False)
    engine = PrivacyEngine(model, mode=mode, max_grad_norm=R, passes=passes)
    model[2].requires_grad_(True)  # unfrozen after attach: on c3a7581 it got its plain gradient, 106·R for one example
    loss_of(model, x, y).backward()
    engine.detach()
    ref, ref_norms = reference_grads(model, [(x, y)], max_grad_norm=R)
    for p, r in zip(model.parameters(), ref):
        assert torch.allclose(p.grad, r, rtol=1e-9, atol=1e-12)
    assert torch.allclose(engine.per_sample_norms, ref_norms, rtol=1e-9)


@pytest.mark.parametrize(("mode", "passes"), MODES_PASSES)
def test_a_layer_frozen_after_attach_gets_no_gradient_and_leaves_the_norm(mode, passes):
    model = mlp()
    x, y = data((6,))
    model[2].requires_grad_(False)
    R = small_r(model, x, y)
    model[2].requires_grad_(True)
    engine = PrivacyEngine(model, mode=mode, max_grad_norm=R, passes=passes)
    model[2].requires_grad_(False)
    loss_of(model, x, y).backward()
    engine.detach()
    assert model[2].weight.grad is None and model[2].bias.grad is None
    assert_exact(model, x, y, R, engine.per_sample_norms)  # the trainable parameters only


@pytest.mark.parametrize("passes", [1, 2])
def test_requires_grad_changed_between_forward_and_backward_is_refused(passes):
    model = mlp()
    x, y = data((6,))
    engine = PrivacyEngine(model, max_grad_norm=1.0, passes=passes)
    loss = loss_of(model, x, y)
    model[2].requires_grad_(False)
    with pytest.raises(CoverageError, match=r"frozen: 2\.weight, 2\.bias.*before the forward"):
        loss.backward()
    model[2].requires_grad_(True)
    model.zero_grad()
    loss_of(model, x, y).backward()  # the next step is exact again
    engine.detach()
    assert_exact(model, x, y, 1.0)


def test_a_replaced_head_is_covered():
    model = mlp()
    x, y = data((6,))
    engine = PrivacyEngine(model, max_grad_norm=1.0)
    loss_of(model, x, y).backward()
    model.zero_grad(set_to_none=True)
    model[4] = nn.Linear(8, 3).double()  # a new head after attach
    loss_of(model, x, y).backward()
    engine.detach()
    assert_exact(model, x, y, 1.0)


def test_the_optimizer_refuses_a_parameter_with_a_gradient_but_no_noise():
    model = mlp()
    x, y = data((6,))
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=100.0, max_grad_norm=1.0,
                      expected_batch_size=4, seed=0)
    engine = PrivacyEngine(model, max_grad_norm=1.0)
    loss_of(model, x, y).backward()
    model[2].requires_grad_(False)  # frozen after its gradient was built: it would be stepped without noise
    before = model[2].weight.detach().clone()
    with pytest.raises(CoverageError, match=r"requires_grad=False.*no noise"):
        opt.step()
    assert torch.equal(model[2].weight, before)
    engine.detach()


# --------------------------------------------------------------------------------------- 3: subclassed layers
class WSConv(nn.Conv2d):
    """Weight standardisation inside `_conv_forward` (the pattern of weight-standardised and NF convs); `forward` is
    nn.Conv2d's, so a check of `forward` alone takes it for a plain conv."""

    def _conv_forward(self, x, weight, bias):
        w = weight - weight.mean((1, 2, 3), keepdim=True)
        w = w / (w.pow(2).mean((1, 2, 3), keepdim=True) + 1e-5).sqrt()
        return super()._conv_forward(x, w, bias)


class Pool(nn.Module):
    def __init__(self, body, feat):
        super().__init__()
        self.body, self.fc = body, nn.Linear(feat, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.body(x)).flatten(2).mean(-1))


CONVS = {
    "user_conv_forward": lambda: WSConv(3, 4, 3, padding=1),
    "timm_std_conv": lambda: timm.layers.StdConv2d(3, 4, 3, padding=1),
    "timm_std_conv_same": lambda: timm.layers.StdConv2dSame(3, 4, 3, stride=2, padding="SAME"),
    "timm_scaled_std_conv": lambda: timm.layers.ScaledStdConv2d(3, 4, 3, padding=1),
}


@pytest.mark.parametrize(("mode", "passes"), MODES_PASSES)
@pytest.mark.parametrize("conv", sorted(CONVS))  # timm_std_conv_same: stride 2, dynamic 'SAME' padding
def test_weight_standardised_convs_are_exact(conv, mode, passes):
    torch.manual_seed(0)
    model = Pool(CONVS[conv](), 4)
    x, y = data((3, 6, 6), n=4)
    R = small_r(model.double(), x, y)
    _, engine = check(model, [(x, y)], mode=mode, max_grad_norm=R, passes=passes, tol=1e-8)
    rule = engine.entries[0].rule.name
    assert rule == ("fallback" if conv in ("user_conv_forward", "timm_std_conv_same") else "std_conv")  # never "conv"


# ------------------------------------------------------------------------ 4: rows per example differ by call
class MultiView(nn.Module):
    """One conv on each example's two views (2 rows per example, each example's consecutive), then on the example
    itself (1 row): the rows per example differ between the calls of one layer."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        views = torch.stack([x, x.flip(-1)], 1).flatten(0, 1)  # (2B, C, H, W)
        a = self.conv(views).unflatten(0, (x.shape[0], 2)).mean(1)
        return self.fc(torch.tanh(a + self.conv(x)).flatten(2).mean(-1))


@pytest.mark.parametrize(("mode", "passes"), MODES_PASSES)
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_a_layer_called_with_different_rows_per_example_is_exact(batch, mode, passes):
    torch.manual_seed(0)
    model = MultiView().double()
    x, y = data((3, 5, 5), n=max(batch, 2))
    x, y = x[:batch], y[:batch]
    R = small_r(model, *data((3, 5, 5), n=4))
    check(model, [(x, y)], mode=mode, max_grad_norm=R, passes=passes, tol=1e-8)


# --------------------------------------------------------------------------- 5: activation checkpointing
class Segments(nn.Module):
    """Three blocks, the middle ones under torch.utils.checkpoint."""

    def __init__(self, reentrant: bool | None):
        super().__init__()
        self.reentrant = reentrant
        self.inp = nn.Linear(6, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.LayerNorm(8)) for _ in range(3))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for i, b in enumerate(self.blocks):
            if self.reentrant is None or i == 0:
                h = b(h)
            else:
                h = checkpoint(b, h, use_reentrant=self.reentrant)
        return self.out(h)


@pytest.mark.parametrize(("mode", "passes"), MODES_PASSES)
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_segments_are_exact_and_clipped_once(reentrant, mode, passes):
    torch.manual_seed(0)
    plain = Segments(None).double()
    x, y = data((6,), n=4)
    R = small_r(plain, x, y)
    ref, ref_norms = reference_grads(plain, [(x, y)], max_grad_norm=R)
    model = Segments(reentrant).double()
    model.load_state_dict(plain.state_dict())
    got, norms, engine = engine_grads(model, [(x, y)], mode=mode, max_grad_norm=R, passes=passes)
    assert max_rel_err(got, ref) < 1e-9
    assert torch.allclose(norms, ref_norms, rtol=1e-9)  # one norm per example over every segment together
    # one example: its clipped gradient is ≤ R (segments clipped separately reached 1.41·R)
    got1, _, _ = engine_grads(model, [(x[:1], y[:1])], mode=mode, max_grad_norm=R / 10, passes=passes)
    assert torch.sqrt(sum(g.pow(2).sum() for g in got1)) <= R / 10 * (1 + 1e-9)


def tiny(name):
    if name == "vit":  # no register token, unlike dptrain.testing.tiny_vit
        return timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=2,
                                 num_heads=2, init_values=0.1, num_classes=3), (3, 8, 8)
    if name == "beit":
        return tiny_beit(), (3, 8, 8)
    if name == "convnext":
        return tiny_convnext(), (3, 32, 32)
    return tiny_resnet(), (3, 16, 16)


@pytest.fixture(params=[False, True], ids=["non_reentrant", "reentrant"])
def timm_reentrant(request):
    was = timm.layers.use_reentrant_ckpt()
    timm.layers.set_reentrant_ckpt(request.param)
    yield request.param
    timm.layers.set_reentrant_ckpt(was)


@pytest.mark.parametrize(("mode", "passes"), MODES_PASSES)
@pytest.mark.parametrize("name", ["vit", "beit", "convnext", "resnet"])
def test_timm_grad_checkpointing_is_exact(name, mode, passes, timm_reentrant):
    if name == "beit" and timm_reentrant:
        pytest.skip("timm's BEiT blocks take a keyword argument, which torch's reentrant checkpoint refuses")
    torch.manual_seed(0)
    model, shape = tiny(name)
    model = model.double()
    x, y = data(shape, n=3)
    R = small_r(model, x, y)
    ref, ref_norms = reference_grads(model, [(x, y)], max_grad_norm=R)
    model.set_grad_checkpointing(True)  # timm: torch.utils.checkpoint (its default use_reentrant) per block/stage
    got, norms, engine = engine_grads(model, [(x, y)], mode=mode, max_grad_norm=R, passes=passes)
    assert max_rel_err(got, ref) < 1e-9
    assert torch.allclose(norms, ref_norms, rtol=1e-9)
    assert engine.fallback_share == 0.0


# ------------------------------------------------------------------------------------------- 6: the messages
@pytest.mark.parametrize("passes", [1, 2])
def test_an_evaluation_forward_between_forward_and_backward_changes_nothing(passes):
    model = mlp()
    x, y = data((6,))
    engine = PrivacyEngine(model, max_grad_norm=1.0, passes=passes)
    loss = loss_of(model, x, y)
    with torch.no_grad():
        model(x[:2])  # e.g. a progress bar's accuracy
    loss.backward()
    engine.detach()
    assert_exact(model, x, y, 1.0)


def test_a_second_training_forward_before_the_backward_says_so():
    model = mlp()
    x, y = data((6,))
    engine = PrivacyEngine(model, max_grad_norm=1.0)
    first = loss_of(model, x, y)
    loss_of(model, x, y)
    with pytest.raises(CoverageError, match="another forward with gradients ran between this one and its backward"):
        first.backward()
    engine.detach()


# ------------------------------------------------------------------ issue 34 item 2: exceptions mid-backward
class Boom(torch.autograd.Function):
    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if Boom.armed:
            Boom.armed = False
            raise RuntimeError("boom")
        return g


class Fragile(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(Boom.apply(torch.tanh(self.a(x))))))


@pytest.mark.parametrize("where", ["layer", "hook"])
@pytest.mark.parametrize("passes", [1, 2])
def test_after_an_exception_mid_backward_the_next_backward_is_exact(where, passes):
    torch.manual_seed(0)
    model = Fragile().double()
    x, y = data((6,))
    engine = PrivacyEngine(model, max_grad_norm=0.5, passes=passes)
    out = model(x)
    if where == "layer":
        Boom.armed = True  # a layer's backward raises after the head's output gradient (and its hook) ran
    else:
        out.register_hook(lambda g: (_ for _ in ()).throw(KeyboardInterrupt()))  # Ctrl-C inside the backward
    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        F.cross_entropy(out, y, reduction="sum").backward()
    Boom.armed = False
    model.zero_grad(set_to_none=True)
    loss_of(model, x, y).backward()
    engine.detach()
    assert_exact(model, x, y, 0.5, engine.per_sample_norms)


# ------------------------------------------------------------------------- the runner: model.grad_checkpointing
@pytest.mark.slow
def test_the_runner_trains_the_same_model_with_grad_checkpointing(compose, tmp_path):
    from dptrain.train.run import run

    def go(name, *extra):
        cfg = compose("progress=false", "dataset=fake", "dataset.size=32", "dataset.image_size=8", "model=timm",
                      "model.name=vit_tiny_patch16_224", "+model.kwargs.patch_size=4", "+model.kwargs.embed_dim=16",
                      "+model.kwargs.depth=2", "+model.kwargs.num_heads=2", "epochs=1", "batch_size=16",
                      "physical_batch_size=8", f"name={name}", *extra)
        run(cfg, str(tmp_path / name))
        return torch.load(tmp_path / name / "model.pt")

    plain, ckpt = go("plain"), go("ckpt", "model.grad_checkpointing=true")
    for k in plain:
        assert torch.allclose(plain[k], ckpt[k], atol=1e-6), k


@pytest.mark.slow
def test_grad_checkpointing_on_a_model_without_it_is_one_line(compose, tmp_path):
    from dptrain.errors import UserError
    from dptrain.train.run import run

    cfg = compose("progress=false", "dataset=fake", "dataset.size=32", "batch_size=8", "model.grad_checkpointing=true")
    with pytest.raises(UserError, match="has no set_grad_checkpointing"):
        run(cfg, str(tmp_path / "r"))


@pytest.mark.parametrize("change", ["freeze", "unfreeze"])
def test_engine_opacus_refuses_a_trainable_set_changed_after_wrapping(change):
    from dptrain.engines import create_engine
    from dptrain.errors import UserError

    model = mlp().float()
    if change == "unfreeze":
        model[2].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    eng = create_engine("opacus", model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    model[2].requires_grad_(change == "unfreeze")
    x, y = data((6,))
    with pytest.raises(UserError, match="trainable parameters changed after Opacus wrapped the model"):
        eng.backward(eng.model(x.float()), y, last=True)


@pytest.mark.parametrize(("mode", "passes"), MODES_PASSES)
def test_bias_only_layers_are_exact_and_keep_no_input(mode, passes):
    """DP-BiTFiT: a Linear or conv whose weight is frozen needs only its output gradients; its input is not kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), timm.layers.StdConv2d(4, 4, 3, bias=True),
                          nn.Flatten(1), nn.Linear(4 * 6 * 6, 3)).double()
    for m in (model[0], model[2], model[4]):
        m.weight.requires_grad_(False)
    x, y = data((3, 6, 6), n=4)
    R = small_r(model, x, y)
    engine = PrivacyEngine(model, mode=mode, max_grad_norm=R, passes=passes)
    out = model(x)
    assert all(r.args == () for _, r in engine._records)
    F.cross_entropy(out, y, reduction="sum").backward()
    engine.detach()
    assert_exact(model, x, y, R, engine.per_sample_norms)


PARTS = {
    "q_bias_alone": ["blocks.0.attn.q_bias"],
    "v_bias_and_a_table": ["blocks.0.attn.v_bias", "blocks.1.attn.relative_position_bias_table"],
    "gamma_and_cls_token": ["blocks.0.gamma_1", "cls_token"],
    "qkv_weight": ["blocks.0.attn.qkv.weight"],
}


@pytest.mark.parametrize(("mode", "passes"), MODES_PASSES)
@pytest.mark.parametrize("part", sorted(PARTS))
def test_a_partly_frozen_beit_is_exact(part, mode, passes):
    """Fine-tuning freezes any subset: a rule owning several parameters (BEiT's attention: q_bias, v_bias, the
    relative-position table) covers whichever of them still train."""
    torch.manual_seed(0)
    model, shape = tiny("beit")
    for n, p in model.named_parameters():
        if n in PARTS[part]:
            p.requires_grad_(False)
    x, y = data(shape, n=3)
    R = small_r(model.double(), x, y)
    _, engine = check(model, [(x, y)], mode=mode, max_grad_norm=R, passes=passes, tol=1e-8)
    assert engine.fallback_share == 0.0
