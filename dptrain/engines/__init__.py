"""Engines behind one protocol (`base.Engine`): the built-in engine (mixed_ghost, ghost, per_sample), the Opacus
baselines (opacus: hooks; opacus_ghost: fast gradient clipping, two backward passes) and nonprivate."""

from __future__ import annotations

from functools import partial

from dptrain.engines.base import FP16_LOSS_SCALE, PRECISIONS, Engine
from dptrain.engines.builtin import BuiltIn
from dptrain.engines.nonprivate import NonPrivate
from dptrain.engines.opacus import Opacus
from dptrain.errors import UserError, lookup
from dptrain.privacy import MODES
from dptrain.privacy.streams import Streams

__all__ = ["ENGINES", "FP16_LOSS_SCALE", "PRECISIONS", "BuiltIn", "Engine", "NonPrivate", "Opacus", "create_engine"]


# name → factory; every factory takes create_engine's keyword arguments and ignores those it has no use for
ENGINES = {
    **{mode: partial(BuiltIn, mode=mode) for mode in MODES},
    "opacus": partial(Opacus, ghost=False),
    "opacus_ghost": partial(Opacus, ghost=True),
    "nonprivate": NonPrivate,
}


def create_engine(name: str, model, optimizer, *, noise_multiplier, max_grad_norm, expected_batch_size,
                  clipping="abadi", gamma=0.01, seed=0, secure=False, streams=None, augmult=1, passes=1,
                  precision="fp32", dist=None) -> Engine:
    """streams: the run's random streams (privacy/streams.py); default: Streams(seed, secure=secure).
    dist: this process's place in a data-parallel run (distributed.py); None: one process."""
    factory = lookup("engine", name, ENGINES)
    if passes not in (1, 2) or (passes == 2 and name not in MODES):
        raise UserError(f"engine.passes={passes}: 1, or 2 with a built-in engine ({', '.join(MODES)})")
    return factory(model, optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                   expected_batch_size=expected_batch_size, clipping=clipping, gamma=gamma,
                   streams=streams if streams is not None else Streams(seed, secure=secure), augmult=augmult,
                   passes=passes, precision=precision, dist=dist)
