"""Stored features (feature_store.py): read a batch at a time from the cache, never held whole in memory, and
bit-identical to the in-memory tensors they replace — through the validation split, the DP normalisation and the
loop's batches."""

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from dptrain.data.datasets import _dp_normalize, _validation_split, batches, create_dataset
from dptrain.data.store import Features, NpyRows


def test_rows_are_read_by_int_slice_and_index(tmp_path):
    a = np.random.default_rng(0).standard_normal((7, 3, 2, 2)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    rows, t = NpyRows(str(tmp_path / "a.npy")), torch.from_numpy(a)
    assert len(rows) == 7 and rows.shape == (7, 3, 2, 2) and rows.dtype == torch.float32
    assert torch.equal(rows[2], t[2]) and torch.equal(rows[-1], t[-1])
    assert torch.equal(rows[1:5], t[1:5]) and torch.equal(rows[:], t) and rows[5:2].shape == (0, 3, 2, 2)
    idx = torch.tensor([6, 0, 3, 3])
    assert torch.equal(rows[idx], t[idx]) and torch.equal(rows[::3], t[::3])
    with pytest.raises(IndexError):
        rows[torch.tensor([7])]


def stored_and_in_memory(tmp_path, **kw):
    """The same features twice: read from the cache (Features over NpyRows), and as the one in-memory tensor of
    (N, views, ...) that the stored form replaces."""
    data = create_dataset("fake", size=24, image_size=8, features="scattering", augment=True, tta=True,
                          data_dir=str(tmp_path), **kw)
    assert isinstance(data.train, Features) and all(isinstance(v, NpyRows) for v in data.train.views)
    memory = create_dataset("fake", size=24, image_size=8, features="scattering", augment=True, tta=True,
                            data_dir=str(tmp_path), **kw)
    memory.train, memory.test = TensorDataset(*memory.train.tensors), TensorDataset(*memory.test.tensors)
    return data, memory


def same_batches(a, b, index_batches) -> bool:
    return all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in
               zip(batches(a, index_batches), batches(b, index_batches), strict=True))


def test_stored_features_read_as_the_in_memory_tensors_through_split_and_normalisation(tmp_path):
    """Bit for bit: the validation split (an index, not a copy), the DP statistics (the same noise draws, the same
    float64 sums) and the affine map applied per batch (the same float32 operations as in place on the whole)."""
    data, memory = stored_and_in_memory(tmp_path)
    assert data.train.tensors[0].shape == (24, 2, 243, 2, 2) and data.test.tensors[0].shape == (6, 2, 243, 2, 2)
    idx = [torch.tensor([5, 0, 17]), torch.arange(24), torch.tensor([], dtype=torch.long)]
    assert same_batches(data.train, memory.train, idx)
    for i in (0, 3, -1):  # one example: (views, C, H, W)
        assert torch.equal(data.train[i][0], memory.train[i][0]) and torch.equal(data.test[i][0], memory.test[i][0])
    assert torch.equal(data.train[1:20:4][0], memory.train[1:20:4][0])
    split, msplit = (_validation_split(d, 0.25, seed=3) for d in (data, memory))
    assert isinstance(split.train, Features) and split.train.index is not None
    ones = lambda k: torch.ones(k, dtype=torch.float64)  # noqa: E731 — the noise draws, fixed
    norm, mnorm = (_dp_normalize(d, noise=8.0, clip=2.0, normal=ones) for d in (split, msplit))
    assert norm.prior == mnorm.prior
    for a, b in ((norm.train, mnorm.train), (norm.test, mnorm.test)):
        assert len(a) == len(b) and same_batches(a, b, [torch.arange(len(a)), torch.tensor([2, 1])])


def test_held_out_part_without_tta_reads_the_first_view_only(tmp_path):
    data = create_dataset("fake", size=24, image_size=8, features="scattering", augment=True, data_dir=str(tmp_path))
    full = data.train.tensors[0]
    split = _validation_split(data, 0.25, seed=1)
    xv, yv = split.test.tensors
    assert xv.shape == (6, 243, 2, 2) and split.test_views == 1
    assert torch.equal(xv, full[split.test.index, 0]) and torch.equal(split.train.tensors[0], full[split.train.index])


def test_reads_never_change_the_stored_or_in_memory_rows():
    x, x2 = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    ds = Features([x, x2], torch.arange(4)).normalized(torch.ones(3, 1, 1), torch.full((3, 1, 1), 2.0))
    before = x.clone()
    for _ in range(2):
        got = ds[1:3][0]
        assert torch.equal(got, torch.stack([(x[1:3] - 1) * 2, (x2[1:3] - 1) * 2], 1))
    assert torch.equal(x, before)


def test_cifar10_scatter_table_sweeps_one_experiment_file_per_eps(compose):
    """table=cifar10_scatter: the best recipe's file at each ε, each the ε = 3 file with only ε, the name and what was
    re-tuned on the validation split at that ε changed (ε = 1 and 2: the epochs; ε = 8 is not re-tuned and says so)."""
    sweep = compose("table=cifar10_scatter", return_hydra_config=True).hydra.sweeper.params.experiment.split(",")
    assert sweep == [f"cifar10_scatter_flips_tta_eps{e}" for e in (1, 2, 3, 8)]
    base = compose("experiment=cifar10_scatter_flips_tta_eps3")
    for e, name in zip((1, 2, 3, 8), sweep, strict=True):
        cfg = compose(f"experiment={name}")
        assert (cfg.eps, cfg.name) == (e, name)
        retuned = {1: {"epochs"}, 2: {"epochs"}}.get(e, set())
        assert {k for k in base if base[k] != cfg[k]} <= {"eps", "name", *retuned}
    assert [compose(f"experiment={n}").epochs for n in sweep] == [30, 60, 90, 90]
