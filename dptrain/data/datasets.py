"""create_dataset: digits (scikit-learn), cifar10/cifar100 (torchvision), folder (ImageFolder), fake.

Small image sets are decoded once into memory as normalised float tensors (TensorDataset, indexed a
whole physical batch at a time); large inputs (e.g. 224×224 for pretrained ViT/BEiT) are decoded and
resized per example by a DataLoader.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import transforms as T

from dptrain import keys as key
from dptrain.config import DatasetConfig
from dptrain.data.features import FEATURES
from dptrain.data.store import CACHE_MAX_SIZE, Features
from dptrain.errors import UserError, check_name, lookup
from dptrain.privacy.streams import Streams, os_normal

log = logging.getLogger("dptrain.data")

# DATASETS (name → loader) follows the loaders, below; FEATURES (name → feature map): features.py
STATS = {  # per-channel mean/std of the training split, for from-scratch models
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class Data:
    train: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    name: str
    # mechanisms already run on the training examples, (σ, q, steps) each: dataset.normalize=dp's statistics.
    # The budget composes them with training (budget.py)
    prior: tuple = ()
    # fixed views stored per training example: train's inputs are (N, views, ...) when > 1 (features of the image
    # and of its mirror image, dataset.features + dataset.augment); the loop feeds an example's views as consecutive
    # rows, clipped as one example (augmentation multiplicity)
    views: int = 1
    # dataset.tta (test-time augmentation: `evaluate` averages the model's softmax over an evaluation example's views):
    # test_views = 2 stores the features of the image and of its mirror image, (N, 2, ...); test_flip: images,
    # flipped left-right on the fly
    test_views: int = 1
    test_flip: bool = False


def create_dataset(ds: DatasetConfig | str, *, seed: int = 0, data_dir: str = "data", mean=None, std=None,
                   streams: Streams | None = None, **fields) -> Data:
    """ds: the dataset settings (cfg.dataset), or a dataset name; `fields` set or replace DatasetConfig's fields (e.g.
    image_size: the model's input size where the config gives none). Each loader takes what it needs.
    seed: the run's seed; fake data and the validation split use its "data" and "split" streams.
    mean, std: the normalisation a pretrained model expects (default: the dataset's own statistics).
    normalize=dp: per-channel statistics of the training examples by the Gaussian mechanism (_dp_normalize), its
    noise from `streams`' "norm" stream (OS entropy in secure mode); recorded in Data.prior.
    augment with features: the features of each training image's mirror image too, as a second view (Data.views).
    tta: evaluate on each held-out example and its mirror image, averaging the softmax (Data.test_views / test_flip);
    with features it needs `augment` (the held-out part of a validation split has its mirror image's features then)."""
    ds = DatasetConfig(name=ds, **fields) if isinstance(ds, str) else replace(_settings(ds), **fields)
    load = lookup("dataset", ds.name, DATASETS)
    if ds.name == "folder" and not ds.root:  # not the data_dir default: a path the user never gave
        raise UserError("dataset=folder needs dataset.root=<a folder with train/<class>/*.jpg and test/<class>/*.jpg>")
    featurize = lookup("dataset.features", ds.features, FEATURES)
    check_name("dataset.normalize", ds.normalize, NORMALIZE)
    data = load(root=ds.root or os.path.join(data_dir, ds.name), image_size=ds.image_size, mean=mean, std=std,
                download=ds.download, cache=ds.cache, seed=Streams(seed).seed_for("data"), size=ds.size,
                num_classes=ds.num_classes, channels=ds.channels)
    if ds.tta and ds.features != "none" and not ds.augment:
        raise UserError(f"dataset.tta=true with dataset.features={ds.features} evaluates on the mirror images' "
                        "features, computed with the training images': set dataset.augment=true (and "
                        "privacy.augmult=2)")
    data = featurize(data, cache_dir=os.path.join(data_dir, "features"), flips=ds.augment, tta=ds.tta)
    data.test_flip = ds.tta and ds.features == "none"  # images: flipped on the fly by `evaluate`
    if ds.val_fraction > 0:
        data = _validation_split(data, ds.val_fraction, Streams(seed).seed_for("split"))
    if ds.normalize == "dp":  # after the split: the statistics read the examples trained on, never the held-out ones
        streams = streams if streams is not None else Streams(seed)
        data = _dp_normalize(data, noise=ds.normalize_noise, clip=ds.normalize_clip, normal=_normals(streams))
    return data


def _settings(ds) -> DatasetConfig:
    """cfg.dataset (an OmegaConf node) as a DatasetConfig."""
    return ds if isinstance(ds, DatasetConfig) else DatasetConfig(**OmegaConf.to_container(ds, resolve=True))


def _normals(streams: Streams):
    """n → n draws of N(0, 1), float64: the "norm" stream, or the OS's CSPRNG in secure mode."""
    if streams.secure:
        return os_normal
    g = streams.generator("norm")
    return lambda n: torch.randn(n, generator=g, dtype=torch.float64)


def _dp_normalize(data: Data, *, noise: float, clip: float, normal) -> Data:
    """Standardise every channel by a DP estimate of its mean and variance over the training examples (Tramèr &
    Boneh 2021's data normalisation for ScatterNet features), for both splits.

    Two Gaussian mechanisms on the training set (q = 1, one step each; add/remove adjacency, n public as
    everywhere in the budget): each example's per-channel spatial means m_i ∈ R^C and mean squares s_i ∈ R^C,
    each clipped to L2 norm `clip`, summed, plus N(0, (noise·clip)²) per coordinate, ÷ n. Both enter the
    budget as (noise, 1, 2) and the training σ is calibrated to the rest of ε. `clip` is set without looking at
    the data (the guarantee holds for any value; a bad one only biases the estimate): the default 2 is above
    what a constant ±1 image gives through the ScatterNet (√3 for 3 channels; uniform noise: 0.7), for images
    in [-1, 1]; at n = 50,000 the noise per coordinate is then noise·clip/n ≈ 3e-4.
    Variance estimates below three noise standard deviations are floored there: a channel whose variance
    cannot be told from the noise is not amplified by it."""
    if not isinstance(data.train, (TensorDataset, Features)):
        raise UserError("dataset.normalize=dp needs the examples in memory: image size ≤ "
                        f"{CACHE_MAX_SIZE} and dataset.cache=true")
    n, C = len(data.train), data.in_chans
    # an example's statistics over all its views (one clipped vector per example: the sensitivity is unchanged)
    flat = (lambda v: v.transpose(1, 2).flatten(2)) if data.views > 1 else (lambda v: v.flatten(2))

    def estimate(per_example: torch.Tensor) -> torch.Tensor:  # (n, C) → (C,)
        scale = (clip / per_example.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)  # min(1, clip/‖v_i‖)
        total = (per_example * scale[:, None]).sum(0)
        return (total + noise * clip * normal(C)) / n

    def per_example() -> tuple[torch.Tensor, torch.Tensor]:
        """Each example's per-channel mean and mean square, (n, C) each in float64, in one pass over the (possibly
        stored, store.py) examples, 1024 at a time: ~0.8 GB of buffers for CIFAR's two feature views (all at
        once: 25 GB). The same values for any chunk size: each row's own reduction."""
        means, squares = [], []
        for i in range(0, n, 1024):
            v = flat(data.train[i : i + 1024][0]).double()  # (b, C, views·H·W)
            means.append(v.mean(2))
            squares.append((v ** 2).mean(2))
        return torch.cat(means), torch.cat(squares)

    with torch.no_grad():
        m_i, s_i = per_example()
        mean, sq = estimate(m_i), estimate(s_i)
        floor = 3 * noise * clip / n * (1 + 2 * mean.abs())  # the std of sq - mean², to first order
        var = torch.maximum(sq - mean ** 2, floor)
        # (C, 1, ..., 1): broadcast from the right, over an example's (C, ...) and (views, C, ...) alike
        shape = (C,) + (1,) * (data.test[0][0].dim() - 1 - (data.test_views > 1))
        m, inv = mean.float().view(shape), var.rsqrt().float().view(shape)
        data.train, data.test = _affine(data.train, m, inv), _affine(data.test, m, inv)
    log.info("dataset.normalize=dp: per-channel mean/variance of %d examples, noise %g x clip %g (eps composed "
             "into the budget)", n, noise, clip)
    data.prior = data.prior + ((float(noise), 1.0, 2),)
    return data


def _affine(ds: Dataset, m: torch.Tensor, inv: torch.Tensor) -> Dataset:
    """x ↦ (x - m)·inv per channel: stored features at each read (no normalised copy), images in memory in place."""
    if isinstance(ds, Features):
        return ds.normalized(m, inv)
    x, y = ds.tensors
    return TensorDataset(x.sub_(m).mul_(inv), y)


NORMALIZE = ("none", "dp")




def _digits(*, image_size: int | None, **_) -> Data:
    # scikit-learn and torchvision (below): loaded only for the dataset that needs them
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8), values 0..16
    y = torch.tensor(d.target)
    idx_tr, idx_te = train_test_split(range(len(y)), test_size=0.2, random_state=0, stratify=d.target)
    mean, std = x[idx_tr].mean(), x[idx_tr].std()
    x = (x - mean) / std
    if image_size and image_size != 8:
        x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
    return Data(TensorDataset(x[idx_tr], y[idx_tr]), TensorDataset(x[idx_te], y[idx_te]), 10, 1, x.shape[-1],
                "digits")


def _fake(*, size: int | None, num_classes: int | None, channels: int | None, image_size: int | None, seed: int,
          **_) -> Data:
    # None: dataset.name=fake without conf/dataset/fake.yaml's values (create_dataset's defaults)
    size, num_classes, channels, image_size = size or 512, num_classes or 10, channels or 3, image_size or 32
    g = torch.Generator().manual_seed(seed)
    n_test = max(1, size // 4)
    x = torch.randn(size + n_test, channels, image_size, image_size, generator=g)
    y = torch.randint(0, num_classes, (size + n_test,), generator=g)
    return Data(TensorDataset(x[:size], y[:size]), TensorDataset(x[size:], y[size:]), num_classes, channels,
                image_size, "fake")


def _transform(image_size: int | None, mean, std):
    steps = [T.Resize(image_size), T.CenterCrop(image_size)] if image_size else []
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def _images(name: str, splits, *, root, image_size, mean, std, download, cache, **_) -> Data:
    """Image files decoded by torchvision; `splits(root, transform, name=, download=)` → (train, test)."""
    default_mean, default_std = STATS.get(name, ((0.5,) * 3, (0.5,) * 3))
    tf = _transform(image_size, mean or default_mean, std or default_std)
    train, test = splits(root, tf, name=name, download=download)
    x0 = train[0][0]
    data = Data(train, test, len(train.classes), x0.shape[0], x0.shape[-1], name)
    if cache and data.image_size <= CACHE_MAX_SIZE:
        log.info("decoding %s into memory (%d + %d images)", name, len(train), len(test))
        data.train, data.test = _materialise(train), _materialise(test)
    return data


def _materialise(ds: Dataset) -> TensorDataset:
    xs, ys = [], []
    for x, y in DataLoader(ds, batch_size=512, num_workers=min(4, os.cpu_count() or 1)):
        xs.append(x)
        ys.append(y)
    return TensorDataset(torch.cat(xs), torch.cat(ys))


class BadImage(UserError):
    """An image file that does not decode. Raised in a DataLoader worker, it reaches the main process re-created
    from one message that holds the worker's whole traceback (torch's ExceptionWrapper.reraise): keep our line."""

    def __init__(self, msg: str):
        if msg.startswith("Caught "):
            msg = msg.rstrip().splitlines()[-1].partition(f"{type(self).__name__}: ")[2] or msg
        super().__init__(msg)


def _load_image(path: str):
    """ImageFolder's loader (PIL, RGB), with a file that does not decode (truncated, corrupt, not an image) as a
    one-line error naming it instead of PIL's traceback from inside a DataLoader worker."""
    from torchvision.datasets.folder import default_loader  # torchvision: loaded for image datasets only

    try:
        return default_loader(path)
    except Exception as e:  # PIL: OSError (truncated), UnidentifiedImageError, SyntaxError, DecompressionBombError
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise BadImage(f"cannot decode image '{path}' ({type(e).__name__}: {first}): remove the file from "
                       "dataset.root or replace it with a re-encoded copy") from None


def _folder(root: str, tf, **_):
    from torchvision.datasets import ImageFolder  # torchvision: loaded for image datasets only

    dirs = [os.path.join(root, s) for s in ("train", "test")]
    for d in dirs:
        if not os.path.isdir(d):
            raise UserError(f"dataset folder '{d}' not found: dataset.root must hold train/<class>/* and "
                            "test/<class>/* image folders")
    try:
        train, test = (ImageFolder(d, transform=tf, loader=_load_image) for d in dirs)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"cannot read image folder under '{root}': {e}") from None
    if train.classes != test.classes:
        raise UserError(f"train/ and test/ under '{root}' have different classes: {train.classes} vs {test.classes}")
    return train, test


def _cifar_splits(torchvision_class: str, root: str, tf, *, name: str, download: bool):
    import torchvision.datasets  # torchvision's datasets: loaded for image datasets only

    base = getattr(torchvision.datasets, torchvision_class)
    return tuple(_cifar(base, name, root, train, tf, download) for train in (True, False))


def _cifar(base, name: str, root: str, train: bool, tf, download: bool):
    class Local(base):
        """torchvision's loader; integrity = the batch files are present (a partial or foreign copy fails
        at load with a clear message instead of a checksum error)."""

        def _check_integrity(self) -> bool:
            folder = os.path.join(self.root, self.base_folder)
            files = [f for f, _ in self.train_list + self.test_list] + [self.meta["filename"]]
            return all(os.path.isfile(os.path.join(folder, f)) for f in files)

        def _load_meta(self) -> None:
            with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    present = Local.__new__(Local)
    present.root = os.path.expanduser(root)
    if not present._check_integrity():
        if not download:
            raise UserError(f"{name} not found under '{root}' and dataset.download=false")
        try:
            base(root, train=train, download=True)
        except Exception as e:  # URLError, socket errors, …
            raise UserError(f"{name} not found under '{root}' and the download failed ({type(e).__name__}); "
                            f"put {base.base_folder}/ there or set data_dir") from None
    try:
        return Local(root, train=train, transform=tf, download=False)
    except Exception as e:
        raise UserError(f"corrupt {name} files under '{root}': {type(e).__name__}: {e}") from None


DATASETS = {
    "digits": _digits,
    "cifar10": partial(_images, "cifar10", partial(_cifar_splits, "CIFAR10")),
    "cifar100": partial(_images, "cifar100", partial(_cifar_splits, "CIFAR100")),
    "folder": partial(_images, "folder", _folder),
    "fake": _fake,
}


def _validation_split(data: Data, fraction: float, seed: int) -> Data:
    """Hold out part of the training set as the evaluation split, so hyperparameters are never tuned on
    the test split. The private training set shrinks accordingly (n, q and δ follow)."""
    n = len(data.train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, int(n * fraction))
    data.test, data.train = _subset(data.train, perm[:k]), _subset(data.train, perm[k:])
    if data.views > 1 and data.test_views == 1:  # held out: evaluated as the test split is, on the first view
        if isinstance(data.test, Features):
            data.test = data.test.first_view()
        else:
            xv, yv = data.test.tensors
            data.test = TensorDataset(xv[:, 0], yv)
    data.name += key.VAL_SUFFIX
    return data


def _subset(ds: Dataset, idx: list[int]) -> Dataset:
    if isinstance(ds, Features):
        return ds.subset(idx)  # an index into the stored rows, not a copy
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(t[idx] for t in ds.tensors))
    return Subset(ds, idx)


def batches(ds: Dataset, index_batches, *, num_workers: int = 0, pin_memory: bool = False):
    """Yield (x, y) for each index tensor in `index_batches`: whole-batch indexing for in-memory data,
    a DataLoader with workers otherwise. pin_memory (CUDA): page-locked batches, so that a non_blocking copy to
    the device is asynchronous."""
    if isinstance(ds, (TensorDataset, Features)):
        for idx in index_batches:
            batch = ds[idx]  # (x[idx], y[idx]): one gather, no per-example calls
            yield tuple(t.pin_memory() if pin_memory and t.device.type == "cpu" else t for t in batch)
        return
    # generator: the loader draws its workers' base seed when it starts; from torch's global generator (dropout's)
    # that draw would shift dropout after a mid-epoch resume (checkpoint.py). The transforms are deterministic.
    loader = DataLoader(ds, batch_sampler=[i.tolist() for i in index_batches], num_workers=num_workers,
                        generator=torch.Generator(), pin_memory=pin_memory)
    yield from loader


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding `pad` and random horizontal flip, per example, on a batch."""
    B, _, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    rows = (dy.view(B, 1) + torch.arange(H)).to(x.device)  # (B, H)
    cols = (dx.view(B, 1) + torch.arange(W)).to(x.device)  # (B, W)
    b = torch.arange(B, device=x.device).view(B, 1, 1, 1)
    c = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    out = xp[b, c, rows.view(B, 1, H, 1), cols.view(B, 1, 1, W)]  # (B, C, H, W)
    flip = (torch.rand(B, generator=generator) < 0.5).to(x.device)
    return torch.where(flip.view(B, 1, 1, 1), out.flip(-1), out)
