"""create_model: timm.create_model + BatchNorm→GroupNorm + head/img_size + checkpoint loading."""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger("dptrain.models")


def fix_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace every BatchNorm by GroupNorm (opacus ModuleValidator.fix): BatchNorm mixes the examples
    of a batch, so per-example gradients are undefined under it. Returns (model, number replaced)."""
    n = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if n:
        from opacus.validators import ModuleValidator

        model = ModuleValidator.fix(model)
    return model, n
