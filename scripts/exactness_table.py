"""Print the max relative error (vs the float64 one-example-at-a-time reference) per model × mode, and for
mixed_ghost with passes=2 (norm pass, recomputed forward, clipped pass).

    .venv/bin/python scripts/exactness_table.py                       # float64: the table in results/exactness.md
    .venv/bin/python scripts/exactness_table.py --precision           # float32 params, fp32 / bf16 / fp16 autocast
    .venv/bin/python scripts/exactness_table.py --two-pass-bf16       # mixed_ghost bf16: passes=2 against passes=1

--precision (issue #18 item 2): the model in float32, its forward under torch.autocast(cpu, bf16 | fp16) as
precision=bf16|fp16 runs it (fp16 with the runner's static loss scale, FP16_LOSS_SCALE), passes=1, against the
float64 reference of the same weights; and, to separate the engine from the forward's rounding, against the
one-example-at-a-time reference under the same autocast (each example's float32 gradient clipped in float64).
--two-pass-bf16 (issue #18 item 1, passes=2 under autocast): mixed_ghost in bf16 with passes=1 and passes=2, each
against those references, and the max relative difference between the two.
"""

import copy
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # helpers
from helpers.engine_cases import LAYERS, MODELS, MODES, Embed, Reuse, WithCustom, batches, seq_model  # noqa: E402

from dptrain.testing import check, max_rel_err, reference_grads  # noqa: E402


def cases():
    for name, (make, shape) in sorted(MODELS.items()):
        yield name, make, batches(shape, sizes=(2, 2))
    for name in ("conv2d_depthwise", "conv2d_grouped", "conv2d_reflect", "conv2d_same_even", "conv3d"):
        make, shape, feat = LAYERS[name]
        yield name, (lambda make=make, feat=feat: seq_model(make(), feat)), batches(shape)
    yield "module_reuse", Reuse, batches((3, 6, 6))
    yield "fallback_unit", WithCustom, batches((5,))
    g = torch.Generator().manual_seed(1)
    yield "embedding", Embed, [(torch.randint(0, 10, (4, 6), generator=g), torch.randint(0, 3, (4,), generator=g))]


def _amp_reference(model, data, dtype, R):
    """Σ_i c_i g_i one example at a time, each forward under the same autocast, norms and sum in float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for x, y in data:
        for i in range(x.shape[0]):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                out = model(x[i : i + 1])
            gs = torch.autograd.grad(F.cross_entropy(out.float(), y[i : i + 1], reduction="sum"), params,
                                     allow_unused=True)
            gs = [torch.zeros_like(t) if g is None else g.double() for g, t in zip(gs, total)]
            c = min(1.0, R / torch.sqrt(sum(g.pow(2).sum() for g in gs)).item())
            for t, g in zip(total, gs):
                t.add_(g, alpha=c)
    return total


def reduced(make, data, mode, precision, R=0.5, passes=1, grads=False):
    """(error vs the float64 reference, error vs the same-autocast reference) of the engine at `precision`
    (grads: and the engine's clipped sum)."""
    from dptrain.engines import FP16_LOSS_SCALE, PRECISIONS
    from dptrain.privacy import PrivacyEngine

    dtype = PRECISIONS[precision]
    torch.manual_seed(0)
    model = make().float()
    ref64, _ = reference_grads(copy.deepcopy(model).double(),
                               [(x.double() if x.is_floating_point() else x, y) for x, y in data], max_grad_norm=R)
    ref_amp = _amp_reference(model, data, dtype, R)
    S = FP16_LOSS_SCALE if precision == "fp16" else 1.0
    engine = PrivacyEngine(model, mode=mode, max_grad_norm=R, passes=passes)
    engine.loss_scale = S
    model.zero_grad(set_to_none=True)
    try:
        for x, y in data:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                out = model(x)
            (S * F.cross_entropy(out.float(), y, reduction="sum")).backward()
    finally:
        engine.detach()
    got = [torch.zeros_like(r) if p.grad is None else p.grad.double() / S
           for p, r in zip((p for p in model.parameters() if p.requires_grad), ref64)]
    return (max_rel_err(got, ref64), max_rel_err(got, ref_amp)) + ((got,) if grads else ())


def main_precision():
    precisions = ("fp32", "bf16", "fp16")
    heads = [f"{m}, {p}" for p in precisions for m in MODES]
    print("vs the float64 reference (and, in brackets, vs the one-example reference under the same autocast)\n")
    print("| model / layer | " + " | ".join(heads) + " |\n|---|" + "---|" * len(heads))
    for name, make, data in cases():
        errs = []
        for precision in precisions:
            for mode in MODES:
                try:
                    e64, eamp = reduced(make, data, mode, precision)
                    errs.append(f"{e64:.1e} ({eamp:.0e})")
                except Exception as e:  # noqa: BLE001 - a case autocast does not support is a cell, not a stop
                    errs.append(f"{type(e).__name__}")
        print(f"| {name} | " + " | ".join(errs) + " |", flush=True)


def main_two_pass_bf16():
    print("mixed_ghost, bf16: vs the float64 reference (in brackets, vs the same-autocast reference)\n")
    print("| model / layer | passes=1 | passes=2 | max rel. diff passes=2 vs passes=1 |\n|---|---|---|---|")
    for name, make, data in cases():
        try:
            (a64, aamp, ga), (b64, bamp, gb) = (reduced(make, data, "mixed_ghost", "bf16", passes=p, grads=True)
                                                for p in (1, 2))
            cells = [f"{a64:.1e} ({aamp:.0e})", f"{b64:.1e} ({bamp:.0e})", f"{max_rel_err(gb, ga):.1e}"]
        except Exception as e:  # noqa: BLE001 - a case that refuses is a cell, not a stop
            cells = [type(e).__name__] * 3
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def main():
    if "--two-pass-bf16" in sys.argv[1:]:
        return main_two_pass_bf16()
    if "--precision" in sys.argv[1:]:
        return main_precision()
    runs = [(mode, 1) for mode in MODES] + [("mixed_ghost", 2)]
    heads = [m if p == 1 else f"{m}, passes=2" for m, p in runs]
    print("| model / layer | " + " | ".join(heads) + " |\n|---|" + "---|" * len(runs))
    for name, make, data in cases():
        errs = []
        for mode, passes in runs:
            torch.manual_seed(0)
            err, _ = check(make(), data, mode=mode, max_grad_norm=0.5, passes=passes)
            errs.append(f"{err:.1e}")
        print(f"| {name} | " + " | ".join(errs) + " |", flush=True)


if __name__ == "__main__":
    main()
