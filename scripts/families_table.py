"""The timm families at tiny configs × the three modes: the max relative error against the float64
one-example-at-a-time reference, or the one-line refusal. Issue #15's table.

    .venv/bin/python scripts/families_table.py > results/families.md
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # helpers
from helpers.engine_cases import MODES, batches  # noqa: E402

from dptrain.models.factory import create_model  # noqa: E402
from dptrain.privacy import CoverageError  # noqa: E402
from dptrain.testing import check  # noqa: E402

V = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2)  # a vision transformer's tiny size
FAMILIES = {  # family: (timm name, kwargs, input size) — every model through create_model (BatchNorm → GroupNorm)
    "resnet": ("resnet18", dict(), 16),
    "resnet-d": ("resnet18d", dict(), 16),
    "vgg": ("vgg11_bn", dict(mlp_ratio=0.01), 32),  # a 40-wide classifier MLP instead of 4096
    "vit": ("vit_tiny_patch16_224", dict(V, reg_tokens=1, init_values=0.1), 16),
    "deit (distilled)": ("deit_tiny_distilled_patch16_224", V, 16),
    "beit": ("beit_base_patch16_224", dict(V, init_values=0.1), 16),
    "eva": ("eva02_tiny_patch14_224", dict(V, use_rot_pos_emb=False), 16),
    "cait": ("cait_xxs24_224", dict(V, depth_token_only=1, init_values=0.1), 16),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=16, patch_size=2, window_size=4, embed_dim=8,
                                                  depths=(2, 2), num_heads=(2, 2)), 16),
    "convnext": ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 16), ls_init_value=0.1), 32),
    "efficientnet": ("efficientnet_b0", dict(), 32),
    "mobilenetv3": ("mobilenetv3_small_050", dict(), 32),
    "regnet": ("regnetx_002", dict(), 32),
    "mixer": ("MlpMixer", dict(img_size=16, patch_size=4, num_blocks=2, embed_dim=16), 16),  # the class: the
    # registered mixer_* names fix patch size and width
    "nfnet": ("nf_resnet26", dict(), 32),
    "densenet": ("densenet121", dict(), 32),
}



def build(name, kw):
    if name == "MlpMixer":
        from timm.models.mlp_mixer import MlpMixer

        return MlpMixer(num_classes=3, **kw)
    try:
        return create_model(name, num_classes=3, drop_path_rate=0.0, **kw)
    except Exception:  # noqa: BLE001 - a family without drop_path_rate
        return create_model(name, num_classes=3, **kw)


def main():
    runs = [(m, 1) for m in MODES] + [("mixed_ghost", 2)]
    heads = [m if p == 1 else f"{m}, passes=2" for m, p in runs]
    print("| family | timm model (tiny config) | params | fallback share | " + " | ".join(heads) + " | s |")
    print("|---|---|---|---|" + "---|" * len(runs) + "---|")
    for family, (name, kw, size) in FAMILIES.items():
        t = time.time()
        cells, share, params = [], "-", "-"
        for mode, passes in runs:
            torch.manual_seed(0)
            try:
                model = build(name, kw)
                params = f"{sum(p.numel() for p in model.parameters()) / 1e3:.0f}k"
                err, engine = check(model, batches((3, size, size), sizes=(2, 3)), mode=mode, max_grad_norm=0.5,
                                    passes=passes)
                share = f"{engine.fallback_share:.3f}"
                cells.append(f"{err:.1e}")
            except CoverageError as e:
                cells.append(f"refused: {str(e)[:90]}")
            except AssertionError as e:
                cells.append(f"MISMATCH {str(e)[:60]}")
            except Exception as e:  # noqa: BLE001 - a family that does not build here: say so, go on
                cells.append(f"error: {type(e).__name__}: {str(e)[:60]}")
        print(f"| {family} | {name} | {params} | {share} | " + " | ".join(cells) + f" | {time.time() - t:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
