"""The run's random streams from its config: `seed` and `privacy.secure` → privacy.streams.Streams.

`privacy.secure_noise` (before issue #14) is a deprecated alias: true maps to `privacy.secure=true`, with a
warning. It is mapped rather than refused because every config that set it asked for unpredictable noise,
and secure mode gives exactly that plus an unpredictable sampler — what the old flag was assumed to give
(the sampler stayed seeded from `seed`, which summary.json records). Mapping never weakens a run; an error
would only break old commands and sweeps. There is no way left to secure the noise alone: the batch choice
is as much a secret as the noise.
"""

from __future__ import annotations

import logging

from dptrain.errors import UserError
from dptrain.privacy.streams import Streams

log = logging.getLogger("dptrain")


def create_streams(cfg) -> Streams:
    p = cfg.privacy
    secure = bool(p.secure)
    if p.get("secure_noise") is not None:
        log.warning("privacy.secure_noise is deprecated: use privacy.secure (OS entropy for the sampler AND the "
                    "noise)%s", "; privacy.secure_noise=true → privacy.secure=true" if p.secure_noise else "")
        secure = secure or bool(p.secure_noise)
    if secure and cfg.engine.name == "nonprivate":
        raise UserError("privacy.secure=true needs a private engine: engine=nonprivate has no noise to secure")
    if secure and p.sampling != "poisson":
        raise UserError(f"privacy.secure=true needs privacy.sampling=poisson (got {p.sampling}): shuffled batches "
                        "are not what the accountant assumes, so there is no guarantee to secure")
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {cfg.seed}")
    return Streams(cfg.seed, secure=secure)
