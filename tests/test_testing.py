"""dptrain.testing: the reference the exactness suites trust, checked against plain autograd; the shared tiny models."""

import pytest
import torch
import torch.nn.functional as F

from dptrain import testing


def test_the_reference_is_autograd_clipped_per_example():
    """Two examples: each one's autograd gradient, scaled by min(1, R/‖g‖), summed; the norms are the ‖g‖."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x, y = torch.randn(2, 4, dtype=torch.float64), torch.tensor([0, 2])
    per = []
    for i in range(2):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        per.append([p.grad.clone() for p in model.parameters()])
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in per])
    R = norms.min().item() * 1.5  # one example clipped, the other not
    want = [sum(min(1.0, R / n.item()) * gs[k] for gs, n in zip(per, norms)) for k in range(len(per[0]))]
    got, got_norms = testing.reference_grads(model, [(x, y)], max_grad_norm=R)
    assert torch.allclose(got_norms, norms, rtol=1e-12)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-15) for a, b in zip(got, want))
    assert testing.max_rel_err(got, want) < 1e-12


@pytest.mark.parametrize(("make", "size"), [(testing.tiny_vit, 8), (testing.tiny_beit, 8), (testing.tiny_vgg, 16),
                                            (testing.tiny_resnet, 16), (testing.tiny_swin, 16),
                                            (testing.tiny_convnext, 32)])
def test_tiny_models_classify_three_ways(make, size):
    torch.manual_seed(0)
    assert make()(torch.randn(2, 3, size, size)).shape == (2, 3)
