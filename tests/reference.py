"""The reference test (shared/docs/pitfalls.md): one example at a time, float64, flat clipping."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    from dptrain.privacy import PrivacyEngine

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
    num = max((x - y).abs().max().item() for x, y in zip(a, b))
    den = max(max(y.abs().max().item() for y in b), 1e-30)
    return num / den


def check(model, batches, *, mode, max_grad_norm=1.0, clipping="abadi", tol=1e-6, **kw):
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
    from dptrain.privacy import PrivacyEngine

    engine = PrivacyEngine(model, max_grad_norm=1.0, **kw)
    try:
        F.cross_entropy(model(x), y, reduction="sum").backward()
    finally:
        engine.detach()
    return engine
