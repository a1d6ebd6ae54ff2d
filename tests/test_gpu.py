"""Issue #18 item 3: the engine on CUDA — exactness (float64 and float32), passes=2's replay of the device's random
state with dropout, bf16 and fp16 steps, a short end-to-end run. Marked `gpu` (not in `make test`); skipped
without CUDA:

    .venv/bin/python -m pytest -m gpu tests/test_gpu.py                              # on a machine with CUDA
    DPTRAIN_TEST_DEVICE=cpu .venv/bin/python -m pytest -m gpu tests/test_gpu.py      # the same code on CPU (dry run)
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from reference import check, engine_grads, max_rel_err, reference_grads
from test_engine import MODELS, MODES, Noisy, batches, tiny_vit

from dptrain import schema as key
from dptrain.privacy import PrivacyEngine

DEVICE = torch.device(os.environ.get("DPTRAIN_TEST_DEVICE", "cuda"))
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")]
RUNS = [*((m, 1) for m in MODES), ("mixed_ghost", 2)]


@pytest.fixture
def no_tf32():
    """float32 exactness means float32: TF32 matmuls/convolutions (cuDNN's default) round to a 10-bit mantissa."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _on(data):
    return [(x.to(DEVICE), y.to(DEVICE)) for x, y in data]


@pytest.mark.parametrize(("mode", "passes"), RUNS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_exactness_float64_on_device(name, mode, passes):
    """The CPU exactness suite's models on the device: float64, rtol 1e-6 against the one-example reference."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    err, _ = check(make().to(DEVICE), _on(batches(shape, sizes=(2, 2))), mode=mode, max_grad_norm=0.5, passes=passes)
    assert err < 1e-6


@pytest.mark.parametrize(("mode", "passes"), RUNS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_exactness_float32_on_device(name, mode, passes, no_tf32):
    """float32 on the device against the float64 reference of the same weights (CPU float32: ≤ 5e-7)."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().to(DEVICE)
    data = _on(batches(shape, sizes=(2, 2)))
    ref, _ = reference_grads(copy.deepcopy(model).double(), [(x.double(), y) for x, y in data], max_grad_norm=0.5)
    got, _, _ = engine_grads(model, data, mode=mode, max_grad_norm=0.5, passes=passes)
    assert max_rel_err([g.double() for g in got], ref) < 1e-4


@pytest.mark.parametrize("make", [Noisy, lambda: tiny_vit_dropout()], ids=["linear_dropout", "vit_dropout"])
def test_two_passes_replay_device_dropout(make):
    """passes=2 recomputes the forward: its dropout masks must come from the device generator's saved state. Same
    seed, passes=1 and 2: the same clipped gradients and norms, and the device stream ends where passes=1 leaves it."""
    x = torch.randn(5, *((6,) if make is Noisy else (3, 8, 8)), dtype=torch.float64, device=DEVICE)
    y = torch.tensor([0, 1, 2, 0, 1], device=DEVICE)
    got = []
    for passes in (1, 2):
        torch.manual_seed(0)
        model = make().double().to(DEVICE)
        engine = PrivacyEngine(model, max_grad_norm=0.3, passes=passes)
        torch.manual_seed(1)  # seeds the device generator too
        F.cross_entropy(model(x), y, reduction="sum").backward()
        after = torch.rand(1, device=DEVICE).item()
        got.append(([p.grad.clone() for p in model.parameters()], engine.per_sample_norms.clone(), after))
        engine.detach()
    (g1, n1, r1), (g2, n2, r2) = got
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-13) for a, b in zip(g1, g2))
    assert torch.allclose(n1, n2, rtol=1e-10) and r1 == r2


def tiny_vit_dropout():
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                             num_classes=3, drop_rate=0.3, proj_drop_rate=0.3, attn_drop_rate=0.3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reduced_precision_step_within_the_bound(mode, dtype):
    """One example alone under autocast on the device: ‖clipped gradient‖ ≤ R·(1 + 1e-3), gradients float32; fp16
    with the runner's static loss scale (norms of the unscaled gradients: clipping the scaled ones would clip at
    R·S)."""
    from dptrain.engines import FP16_LOSS_SCALE

    S = FP16_LOSS_SCALE if dtype == torch.float16 else 1.0
    torch.manual_seed(0)
    model = tiny_vit().to(DEVICE)
    R = 1e-3
    engine = PrivacyEngine(model, mode=mode, max_grad_norm=R)
    engine.loss_scale = S
    with torch.autocast(DEVICE.type, dtype=dtype):
        out = model(torch.randn(1, 3, 8, 8, device=DEVICE))
    (S * F.cross_entropy(out.float(), torch.tensor([1], device=DEVICE), reduction="sum")).backward()
    total = torch.sqrt(sum((p.grad.double() / S).pow(2).sum() for p in model.parameters())).item()
    assert engine.per_sample_norms.item() > 100 * R and engine.dropped == 0
    assert total <= R * (1 + 1e-3)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    engine.detach()


@pytest.mark.parametrize(("engine", "precision"), [
    ("mixed_ghost", "fp32"), ("mixed_ghost", "bf16"), ("mixed_ghost", "fp16"), ("mixed_ghost_2pass", "fp32"),
    ("nonprivate", "bf16"),
])
def test_short_end_to_end_run_on_device(quick, engine, precision):
    """A tiny real run through the runner on the device: finite loss, ε spent as calibrated."""
    over = ["engine=mixed_ghost", "engine.passes=2"] if engine == "mixed_ghost_2pass" else [f"engine={engine}"]
    s, _ = quick(f"device={DEVICE.type}", f"precision={precision}", *over)
    assert s[key.CONFIG]["precision"] == precision and s[key.TRAIN_LOSS] == s[key.TRAIN_LOSS]  # not NaN
    if engine != "nonprivate":
        assert s[key.EPS_SPENT] == pytest.approx(s[key.EPS], abs=0.01)
