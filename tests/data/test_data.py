"""Loaders on data the tests write: a CIFAR-format pickle batch and an image folder."""

import pickle

import numpy as np
import pytest
import torch
from helpers.folders import write_folder
from PIL import Image

from dptrain import keys as key
from dptrain.data.datasets import augment, create_dataset
from dptrain.errors import UserError


def write_cifar(root, n=20, classes=10):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                 "labels": [int(i % classes) for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(classes)]}, f)
    return names


@pytest.mark.parametrize("cache", [True, False])
def test_cifar_loader_reads_cifar_format(tmp_path, cache):
    write_cifar(tmp_path)
    data = create_dataset("cifar10", root=str(tmp_path), download=False, cache=cache)
    assert len(data.train) == 100 and len(data.test) == 20
    assert (data.num_classes, data.in_chans, data.image_size) == (10, 3, 32)
    x, y = data.train[3]
    assert x.shape == (3, 32, 32) and int(y) == 3
    assert abs(float(x.mean())) < 1.0  # normalised with CIFAR statistics


def test_cifar_resized_for_pretrained_models(tmp_path):
    write_cifar(tmp_path, n=4)
    data = create_dataset("cifar10", root=str(tmp_path), download=False, image_size=64, mean=(0.5,) * 3,
                          std=(0.5,) * 3)
    assert data.image_size == 64 and data.train[0][0].shape == (3, 64, 64)


def test_cifar_missing_is_one_line_error(tmp_path):
    with pytest.raises(UserError, match="cifar10 not found under"):
        create_dataset("cifar10", root=str(tmp_path / "none"), download=False)


def test_cifar_corrupt_is_one_line_error(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="corrupt cifar10"):
        create_dataset("cifar10", root=str(tmp_path), download=False)


def test_folder_loader(tmp_path):
    write_folder(tmp_path)
    data = create_dataset("folder", root=str(tmp_path), image_size=16)
    assert data.num_classes == 3 and len(data.train) == 12 and len(data.test) == 12
    assert data.train[0][0].shape == (3, 16, 16)


def test_folder_missing_split(tmp_path):
    write_folder(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "test")
    with pytest.raises(UserError, match="test.*not found"):
        create_dataset("folder", root=str(tmp_path))


def test_the_settings_are_the_dataset_config(compose):
    """create_dataset takes cfg.dataset (or a DatasetConfig, or a name and its fields); keywords replace fields, as a
    run does with the model's input size."""
    from dptrain.config import DatasetConfig

    cfg = compose("dataset=fake", "dataset.size=16", "dataset.image_size=4")
    node, by_name = create_dataset(cfg.dataset, seed=3), create_dataset("fake", size=16, image_size=4, seed=3)
    typed = create_dataset(DatasetConfig(name="fake", size=16, image_size=4), seed=3)
    assert torch.equal(node.train.tensors[0], by_name.train.tensors[0])
    assert torch.equal(node.train.tensors[0], typed.train.tensors[0])
    assert create_dataset(cfg.dataset, image_size=8).image_size == 8 and cfg.dataset.image_size == 4
    with pytest.raises(TypeError):
        create_dataset("fake", sizes=16)  # not a DatasetConfig field


def test_validation_split_holds_out_training_data():
    data = create_dataset("digits", val_fraction=0.2)
    assert len(data.train) + len(data.test) == 1437 and len(data.test) == 287
    assert data.name == "digits-val"


def test_augment_is_a_crop_and_flip():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    out = augment(x, torch.Generator().manual_seed(0), pad=0)
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    assert augment(x, torch.Generator().manual_seed(1), pad=2).shape == x.shape


@pytest.mark.slow
def test_run_on_folder_with_builtin_engine(quick, tmp_path):
    write_folder(tmp_path / "imgs", per_class=6)
    s, _ = quick("dataset=folder", f"dataset.root={tmp_path}/imgs", "dataset.image_size=8", "batch_size=6",
                 "engine=mixed_ghost")
    assert s[key.DATASET] == "folder" and s[key.SAMPLING] == "poisson"


def test_scattering_features_replace_images_per_example():
    """ScatterNet features: (C, H, W) → (81·C, H/4, W/4), each example's from its own image only."""
    data = create_dataset("fake", size=8, image_size=16, features="scattering")
    x = data.train.tensors[0]
    assert x.shape == (8, 243, 4, 4) and (data.in_chans, data.image_size) == (243, 4)
    assert data.name == "fake-scattering" and len(data.test) == 2
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    raw = create_dataset("fake", size=8, image_size=16).train.tensors[0]
    one = ScatteringTorch2D(J=2, shape=(16, 16))(raw[3:4]).flatten(1, 2)
    assert torch.allclose(x[3:4], one, atol=1e-6)
    with pytest.raises(UserError, match="unknown dataset.features 'sift'; valid: none, scattering"):
        create_dataset("fake", size=8, image_size=16, features="sift")
    with pytest.raises(UserError, match="divisible by 4, got 10"):
        create_dataset("fake", size=8, image_size=10, features="scattering")


@pytest.mark.parametrize("name", ["imagenet", "svhn", "CIFAR10", "cifar"])
def test_unknown_dataset_is_not_loaded_as_cifar(tmp_path, name):
    """Only the registry's names load; anything else is one error listing them (never CIFAR-100 by default)."""
    write_cifar(tmp_path)
    with pytest.raises(UserError, match=rf"unknown dataset '{name}'; valid: digits, cifar10, cifar100, folder, fake$"):
        create_dataset(name, root=str(tmp_path), download=False)


def test_every_conf_dataset_has_a_loader_and_every_loader_a_conf_file():
    import os

    from conftest import CONF

    from dptrain.data.datasets import DATASETS

    conf = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "dataset")))
    assert conf == sorted(DATASETS)


@pytest.mark.parametrize("cache", [True, False])
def test_truncated_jpeg_is_one_line_error_naming_the_file(tmp_path, cache):
    """A truncated JPEG fails inside PIL in a DataLoader worker: decoding into memory (cache) or per example
    (DataLoader workers, the path of large images) — either way one line that names the file and the fix."""
    from dptrain.data.datasets import batches

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.jpg")
    whole = (tmp_path / "train" / "dog" / "0.jpg").read_bytes()
    (tmp_path / "train" / "dog" / "broken.jpg").write_bytes(whole[: len(whole) // 2])  # header intact, scan cut
    with pytest.raises(UserError) as err:
        data = create_dataset("folder", root=str(tmp_path), cache=cache)
        assert not cache  # decoding into memory must have failed already
        list(batches(data.train, [torch.arange(len(data.train))], num_workers=1))
    msg = str(err.value)
    assert msg.startswith(f"cannot decode image '{tmp_path / 'train' / 'dog' / 'broken.jpg'}' (OSError: ")
    assert "\n" not in msg and "Traceback" not in msg and "remove the file" in msg
