"""Print the max relative error (vs the float64 one-example-at-a-time reference) per model × mode, and for
mixed_ghost with passes=2 (norm pass, recomputed forward, clipped pass).

    .venv/bin/python tests/exactness_table.py > results/exactness.md
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from reference import check  # noqa: E402
from test_engine import LAYERS, MODELS, MODES, Embed, Reuse, WithCustom, batches, seq_model  # noqa: E402


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


def main():
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
