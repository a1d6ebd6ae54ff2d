"""What the tests and the GPU check share: the one-example-at-a-time float64 reference (shared/docs/pitfalls.md:
one example at a time, float64, flat clipping) and the tiny models the exactness suites build."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from dptrain.models.factory import fix_batchnorm
from dptrain.privacy import PrivacyEngine


def reference_grads(model, batches, *, max_grad_norm, clipping="abadi", gamma=0.01, loss_fn=None):
    """Σ over all examples of all batches of c_i·g_i, where g_i is example i's full gradient."""
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y, reduction="sum"))
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for x, y in batches:
        for i in range(x.shape[0]):
            gs = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), params, allow_unused=True)
            gs = [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]
            n = torch.sqrt(sum(g.pow(2).sum() for g in gs))
            c = min(1.0, max_grad_norm / n.item()) if clipping == "abadi" else max_grad_norm / (n.item() + gamma)
            norms.append(n)
            for t, g in zip(total, gs):
                t.add_(g, alpha=c)
    return total, torch.stack(norms)


def engine_grads(model, batches, *, mode, max_grad_norm, clipping="abadi", loss_fn=None, **kw):
    """What the engine makes of the same batches: (its clipped-gradient sums, its per-example norms, the engine)."""
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y, reduction="sum"))
    engine = PrivacyEngine(model, mode=mode, max_grad_norm=max_grad_norm, clipping=clipping, **kw)
    model.zero_grad(set_to_none=True)
    norms = []
    try:
        for x, y in batches:
            loss_fn(model(x), y).backward()
            norms.append(engine.per_sample_norms)
    finally:
        engine.detach()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    return grads, torch.cat(norms), engine


def max_rel_err(a, b):
    """The largest absolute difference over all tensors, relative to the largest entry of the reference `b`."""
    num = max((x - y).abs().max().item() for x, y in zip(a, b))
    den = max(max(y.abs().max().item() for y in b), 1e-30)
    return num / den


def check(model, batches, *, mode, max_grad_norm=1.0, clipping="abadi", tol=1e-6, **kw):
    """The engine against the reference in float64: every parameter's sum and every norm within `tol` (asserted);
    (the max relative error, the engine)."""
    model = model.double()
    batches = [(x.double() if x.is_floating_point() else x, y) for x, y in batches]
    ref, ref_norms = reference_grads(model, batches, max_grad_norm=max_grad_norm, clipping=clipping)
    got, norms, engine = engine_grads(model, batches, mode=mode, max_grad_norm=max_grad_norm, clipping=clipping,
                                      **kw)
    err = max_rel_err(got, ref)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for n, g, r in zip(names, got, ref):
        assert torch.allclose(g, r, rtol=tol, atol=tol * max(1.0, r.abs().max().item())), (n, mode, err)
    assert torch.allclose(norms, ref_norms, rtol=tol), (mode, norms, ref_norms)
    return err, engine


def step(model, x, y, **kw):
    """One backward of the summed cross-entropy with a PrivacyEngine attached (detached afterwards, also when it
    raises); the engine, for its per_sample_norms and entries."""
    engine = PrivacyEngine(model, max_grad_norm=1.0, **kw)
    try:
        F.cross_entropy(model(x), y, reduction="sum").backward()
    finally:
        engine.detach()
    return engine


def tiny_resnet():
    """timm's resnet18 with GroupNorm for BatchNorm (fix_batchnorm), 3 classes."""
    return fix_batchnorm(timm.create_model("resnet18", num_classes=3, pretrained=False))[0]


def tiny_vit():
    """A 2-block ViT on 8×8 inputs: 4×4 patches, a register token, LayerScale."""
    return timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                             num_classes=3, init_values=0.1, reg_tokens=1)


def tiny_beit():
    """A 2-block BEiT on 8×8 inputs: relative position bias, layer scale (gammas)."""
    return timm.create_model("beit_base_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                             num_classes=3, init_values=0.1, drop_path_rate=0.0)


def tiny_vgg():
    """VGG-style on 16×16 inputs: 3×3 conv + norm + ReLU(inplace) + max-pool stages, then an MLP classifier."""
    layers, c = [], 3
    for out in (4, "M", 8, "M", 8):
        if out == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            c = out
    layers += [nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(inplace=True), nn.Linear(16, 3)]
    return fix_batchnorm(nn.Sequential(*layers))[0]


def tiny_convnext():
    """convnext_atto with one block per stage, layer scale."""
    return timm.create_model("convnext_atto", num_classes=3, depths=(1, 1, 1, 1), dims=(8, 8, 8, 16), ls_init_value=0.1)


def tiny_swin():
    """Two blocks per stage on 16×16 inputs: the second runs on shifted windows with timm's attention mask."""
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=16, patch_size=2, window_size=4, embed_dim=8,
                             depths=(2, 2), num_heads=(2, 2), num_classes=3, drop_path_rate=0.0)
