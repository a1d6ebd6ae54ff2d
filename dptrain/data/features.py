"""Fixed, data-independent feature maps (dataset.features), computed once before training: name → map of a
datasets.Data."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import TensorDataset

from dptrain.data.store import CACHE_MAX_SIZE, Features, cached
from dptrain.errors import UserError

log = logging.getLogger("dptrain.data")


def scattering(data, *, cache_dir: str | None = None, flips: bool = False, tta: bool = False):
    """Replace the images by a fixed, data-independent feature map, computed once for both splits:
    the ScatterNet of Tramèr & Boneh 2021 (kymatio Scattering2D, J=2, 8 angles): (C, H, W) →
    (81·C, H/4, W/4). It has no parameters and reads no other example, so precomputing it costs no privacy
    and the per-example gradients of the model on top stay exact; it only rules out per-step augmentation.
    flips: also the features of each training image flipped left-right (another fixed, per-example map), as a
    second view: train's examples become (2, 81·C, H/4, W/4), and both views of an example are trained on as one
    example (privacy.augmult=2). The flip changes the ScatterNet's angles, not only the map's columns, so the
    flipped features are computed, not derived.
    tta: the test split's likewise, (2, 81·C, H/4, W/4), for test-time augmentation (datasets.Data.test_views).
    Each array is computed 1024 images at a time into its own .npy file under cache_dir and read a batch at a time
    (store.py): the features never sit in memory whole."""
    if not isinstance(data.train, TensorDataset):
        raise UserError(f"dataset.features=scattering needs the images in memory: image size ≤ {CACHE_MAX_SIZE} "
                        "and dataset.cache=true")
    if data.image_size % 4:
        raise UserError(f"dataset.features=scattering needs an image size divisible by 4, got {data.image_size}")
    # kymatio.torch also imports its 3-D frontend, which needs scipy.special.sph_harm (gone from recent SciPy)
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    scatter = ScatteringTorch2D(J=2, shape=(data.image_size, data.image_size))
    log.info("scattering features for %d + %d images", len(data.train), len(data.test))

    def features(x: torch.Tensor, flip: bool):  # (N, C, H, W) images → (N, 81·C, H/4, W/4), cached
        def blocks():
            with torch.no_grad():
                for i in range(0, len(x), 1024):
                    chunk = x[i : i + 1024]
                    yield scatter(chunk.flip(-1) if flip else chunk).flatten(1, 2)

        # the cache key: the unflipped images and the transform's name
        return cached(cache_dir, "scattering-J2-L8" + ("-hflip" if flip else ""), x, blocks)

    (x, y), (xt, yt) = data.train.tensors, data.test.tensors
    train = [features(x, False)] + ([features(x, True)] if flips else [])
    test = [features(xt, False)] + ([features(xt, True)] if tta else [])
    data.views, data.test_views = len(train), len(test)
    data.in_chans, data.image_size = test[0].shape[1], test[0].shape[-1]
    data.train, data.test = Features(train, y), Features(test, yt)
    data.name += "-scattering"
    return data


FEATURES = {"none": lambda data, **_: data, "scattering": scattering}
