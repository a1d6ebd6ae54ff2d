"""The run's random streams from its config: `seed` and `privacy.secure` → privacy.streams.Streams. `secure` is
resolved here, once; the run and its budget read it from the streams.

`privacy.secure_noise` is a deprecated alias: true maps to `privacy.secure=true`, with a warning. Mapping never
weakens a run (secure mode gives unpredictable noise, what the flag asked for, plus an unpredictable sampler: the
batch choice is as much a secret as the noise); an error would only break old commands and sweeps."""

from __future__ import annotations

import logging

from dptrain.config import private
from dptrain.errors import UserError
from dptrain.privacy.streams import Streams

log = logging.getLogger("dptrain")


def create_streams(cfg, *, restarts: bool = False) -> Streams:
    """restarts: the run's processes may start more than once for one release (torchrun's ranks, resume=)."""
    p = cfg.privacy
    secure = bool(p.secure)
    if p.get("secure_noise") is not None:
        log.warning("privacy.secure_noise is deprecated: use privacy.secure (OS entropy for the sampler AND the "
                    "noise)%s", "; privacy.secure_noise=true → privacy.secure=true" if p.secure_noise else "")
        secure = secure or bool(p.secure_noise)
    if secure and cfg.dataset.normalize == "dp" and restarts:
        # seeded, the statistics are redrawn identically (one release); from the OS, each process or resume would
        # release another estimate that the budget does not count
        raise UserError("dataset.normalize=dp with privacy.secure draws the statistics' noise from the OS once per "
                        "process: not under torchrun or resume=; run it in one uninterrupted process, or without "
                        "privacy.secure")
    if secure and not private(cfg):
        raise UserError("privacy.secure=true needs a private engine: engine=nonprivate has no noise to secure")
    if secure and p.sampling != "poisson":
        raise UserError(f"privacy.secure=true needs privacy.sampling=poisson (got {p.sampling}): shuffled batches "
                        "are not what the accountant assumes, so there is no guarantee to secure")
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {cfg.seed}")
    return Streams(cfg.seed, secure=secure)
