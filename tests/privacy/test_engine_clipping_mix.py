"""Issue #21 item 2: reference tests where some examples are clipped and some are not (R between the smallest and
largest per-example norm, so a lost `min(1, ·)` or a clip applied to the wrong example shows), and every chunked
path forced (tiny Gram and per-example budgets) against the float64 reference."""

import pytest
import torch
from helpers.engine_cases import LAYERS, MODELS, MODES, Mean1, batches, seq_model
from torch import nn

from dptrain.privacy.rules import base, conv
from dptrain.testing import check, reference_grads


def median_R(model, data):
    """R between the smallest and the largest per-example norm (no clipping at R = inf)."""
    _, norms = reference_grads(model.double(), [(x.double(), y) for x, y in data], max_grad_norm=float("inf"))
    R = norms.median().item()
    assert (norms < R).any() and (norms > R).any(), norms
    return R


@pytest.mark.parametrize(("mode", "passes"), [*((m, 1) for m in MODES), ("mixed_ghost", 2)])
@pytest.mark.parametrize("name", ["beit_tiny", "vgg_gn", "vit_tiny"])  # resnet18_gn: the chunked test below
def test_models_with_clipped_and_unclipped_examples(name, mode, passes):
    torch.manual_seed(0)
    make, shape = MODELS[name]
    data = batches(shape, sizes=(3, 4))
    model = make()
    err, _ = check(model, data, mode=mode, max_grad_norm=median_R(model, data), passes=passes)
    assert err < 1e-12


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layers_with_clipped_and_unclipped_examples(layer, mode):
    torch.manual_seed(0)
    make, shape, feat = LAYERS[layer]
    data = batches(shape, sizes=(4, 3))
    body = make()
    if feat is None:  # as in test_engine.test_layer_matches_reference
        feat = {"linear3d": 20, "layernorm": 6}[layer]
        body = nn.Sequential(body, Mean1()) if layer == "layernorm" else body
    model = seq_model(body, feat)
    err, _ = check(model, data, mode=mode, max_grad_norm=median_R(model, data))
    assert err < 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("route", [True, False], ids=["input_gram", "im2col"])
@pytest.mark.parametrize("name", ["resnet18_gn", "vit_tiny", "beit_tiny"])
def test_every_chunked_path_matches_reference(name, route, passes, monkeypatch):
    """GRAM_BUDGET = 1: every ghost Gram (linear, im2col conv, input-Gram conv) one example (and group) at a
    time; PER_EXAMPLE_BUDGET = 1: every instantiation one example at a time. With more than one chunk, a chunk
    that reused another's tensors would give wrong norms for all but the first example."""
    monkeypatch.setattr(base, "GRAM_BUDGET", 1)
    monkeypatch.setattr(base, "PER_EXAMPLE_BUDGET", 1)
    monkeypatch.setattr(conv, "_input_gram_pays", lambda m, xs, K: route)
    torch.manual_seed(0)
    make, shape = MODELS[name]
    data = batches(shape, sizes=(3, 4))
    model = make()
    R = median_R(model, data)
    for mode in ("ghost", "per_sample"):
        err, _ = check(model, data, mode=mode, max_grad_norm=R, passes=passes)
        assert err < 1e-12
