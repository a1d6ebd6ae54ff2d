"""The engine on CUDA — exactness (float64 and float32), passes=2's replay of the device's random
state with dropout, bf16 and fp16 steps, a short end-to-end run. Marked `gpu` (not in `make test`); skipped
without CUDA:

    .venv/bin/python -m pytest -m gpu tests/bench/test_gpu.py                # on a machine with CUDA
    DPTRAIN_TEST_DEVICE=cpu .venv/bin/python -m pytest -m gpu tests/bench/test_gpu.py # the same code on CPU (dry run)
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from helpers.engine_cases import MODELS, MODES, Noisy, batches

from dptrain import keys as key
from dptrain.privacy import PrivacyEngine
from dptrain.testing import check, engine_grads, max_rel_err, reference_grads, tiny_vit

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


# --- the check's rows and device placement -------------------------------------------------------------------------


@pytest.fixture
def tf32_on():
    """TF32 on for matmuls and convolutions (cuDNN's default for convolutions; users turn it on for matmuls): the
    engine must still take an example's norm and its clipped gradient from the same arithmetic."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("mode", "passes"), RUNS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_example_bound_with_tf32_on(name, mode, passes, dtype, tf32_on):
    """The one-example bound on the device with TF32 on: ‖clipped gradient‖ ≤ R·(1 + 1e-5) in float32 (a norm from
    float32 and a sum from TF32 would miss it by ~1e-3), ≤ R·(1 + 1e-3) under bf16 autocast (as on CPU)."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().to(DEVICE)
    R = 1e-3
    engine = PrivacyEngine(model, mode=mode, max_grad_norm=R, passes=passes)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = model(torch.randn(1, *shape, device=DEVICE))
    F.cross_entropy(out.float(), torch.tensor([1], device=DEVICE), reduction="sum").backward()
    total = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters())).item()
    engine.detach()
    assert engine.per_sample_norms.item() > 10 * R  # clipped
    assert total <= R * (1 + (1e-5 if dtype == torch.float32 else 1e-3))


def test_ddp_path_on_the_device(tmp_path):
    """engine=nonprivate's DistributedDataParallel (distributed.ddp) on the device, one rank in this process (NCCL on
    CUDA): built with this torch's buffer-sync keyword and device_ids; a logical batch of two physical batches
    (no_sync, then the all-reduce with the summing hook) gives the plain model's summed gradients."""
    import torch.distributed as tdist

    from dptrain.train.distributed import Dist, ddp

    backend = "nccl" if DEVICE.type == "cuda" else "gloo"
    tdist.init_process_group(backend, init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).to(DEVICE)
        plain = copy.deepcopy(model)
        wrapped = ddp(model, Dist(rank=0, world_size=1, local_rank=0, backend=backend), expected_batch_size=4)
        x, y = torch.randn(4, 6, device=DEVICE), torch.tensor([0, 1, 2, 0], device=DEVICE)
        with wrapped.no_sync():
            F.cross_entropy(wrapped(x[:2]), y[:2], reduction="sum").backward()
        F.cross_entropy(wrapped(x[2:]), y[2:], reduction="sum").backward()
        F.cross_entropy(plain(x), y, reduction="sum").backward()
        assert all(torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6)
                   for a, b in zip(model.parameters(), plain.parameters()))
    finally:
        tdist.destroy_process_group()


def test_gpu_check_rows_on_the_device(monkeypatch):
    """gpu_check on the device: every engine keeps its bench row (its memory measured, or its error), and a cuBLAS
    allocation error in a step is that probe's "does not fit", not the section's end."""
    from dptrain.bench import gpu_memory, steps

    engines = ["nonprivate", "no_such_engine", "mixed_ghost"]
    rows = gpu_memory.bench_model("cnn", 16, 4, 1, DEVICE, gpu_memory.Clock(None), engines)
    by = {r["engine"]: r for r in rows}
    assert [r["engine"] for r in rows] == engines and by["no_such_engine"]["note"].startswith("cannot build")
    assert by["mixed_ghost"]["step_ms"] > 0
    if DEVICE.type == "cuda":
        assert by["nonprivate"]["peak_mem_mb"] > 0 and by["mixed_ghost"]["peak_mem_mb"] > 0
        eng, _, _ = steps.build("cnn", 16, "mixed_ghost", 4, DEVICE)

        def one_step(*_):
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

        monkeypatch.setattr(steps, "one_step", one_step)
        notes = {}
        assert gpu_memory._cuda_peak(eng, 8, 16, DEVICE, notes) == float("inf") and "ALLOC_FAILED" in notes[8]


def test_a_cpu_checkpoint_is_not_resumed_on_the_device(monkeypatch, tmp_path):
    """A run checkpointed on the CPU (device=auto, CUDA hidden), resumed with device=auto where CUDA is: refused in
    one line (its noise generators are CPU generators; on CUDA it would draw fresh streams)."""
    from helpers.runs import EVERY_STEP, RUN, Killed, compose, interrupt

    from dptrain.errors import UserError
    from dptrain.train.run import run

    if DEVICE.type != "cuda":
        pytest.skip("needs CUDA: the resume must land on another device type")
    base = [o for o in RUN if o != "device=cpu"] + ["device=auto", EVERY_STEP]
    d = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: False)
        interrupt(m, 3)
        with pytest.raises(Killed):
            run(compose(*base), str(d))
    with pytest.raises(UserError, match="written on cpu, this run is on cuda") as err:
        run(compose(*base, f"resume={d}"), str(d))
    assert "\n" not in str(err.value) and "CUDA_VISIBLE_DEVICES=" in str(err.value)
