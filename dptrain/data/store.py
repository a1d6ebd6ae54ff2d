"""Precomputed per-example features (dataset.features) kept out of the process's memory.

CIFAR-10's ScatterNet features are 3.1 GB per view in float32 for the 50,000 training images; with the mirror
images' (dataset.augment) and the test split's (dataset.tta) they are 7.5 GB, and holding them in memory (plus a
normalised copy, plus a stacked copy of the views) took a run to 23.4 GB. Here each computed array is written, chunk
by chunk, to a .npy file in the feature cache, and a batch reads only its own rows from it (`NpyRows`): the file's
pages sit in the OS page cache — shared, evictable, not this process's resident memory — and the values are the
very float32 bytes that were computed, so training on them is bit-identical to training on the tensors.
`Features` is the dataset over them: views stay separate arrays, stacked per batch; a validation split is an index.
"""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger("dptrain.data")
CACHE_MAX_SIZE = 64  # image datasets are decoded into memory up to this image size (datasets.py)


class NpyRows:
    """The rows of an (N, ...) C-order .npy file, read on demand: `rows[i]`, `rows[i:j]` (one read), `rows[idx]`
    (an index tensor: one read per row, in the index's order). Opens the file per read, so it pickles and never
    holds a descriptor."""

    def __init__(self, path: str):
        header = np.load(path, mmap_mode="r")  # header only: shape, dtype and the data's offset in the file
        if header.ndim < 1 or not header.flags.c_contiguous:
            raise ValueError(f"{path}: not a C-order array")
        self.path, self.shape, self.offset = path, tuple(header.shape), header.offset
        self.dtype = torch.from_numpy(np.empty(0, header.dtype)).dtype
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * header.dtype.itemsize
        del header

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i):
        if isinstance(i, int):
            return self.read_into(self.rows(slice(i, i + 1 if i != -1 else None)), self._empty(1))[0]
        rows = self.rows(i)
        return self.read_into(rows, self._empty(len(rows)))

    def rows(self, i) -> range | list[int]:
        """Row numbers of a slice (a range) or an index tensor (a list), checked."""
        if isinstance(i, slice):
            return range(*i.indices(len(self)))
        idx = torch.as_tensor(i).flatten().tolist()
        if any(not -len(self) <= k < len(self) for k in idx):
            raise IndexError(f"row index out of range for {len(self)} rows")
        return [k % len(self) for k in idx]

    def _empty(self, n: int) -> torch.Tensor:
        return torch.empty((n, *self.shape[1:]), dtype=self.dtype)

    def read_into(self, rows: range | list[int], out: torch.Tensor) -> torch.Tensor:
        """Rows `rows` into `out` (len(rows), ...), each of whose rows is contiguous — e.g. x[:, k] of a (B, views,
        ...) batch, filled view by view with no stacking copy. Consecutive rows into a contiguous `out`: one read."""
        o = out.numpy()
        if isinstance(rows, range) and rows.step == 1 and out.is_contiguous():
            runs = [(rows.start, o.reshape(-1).view(np.uint8))] if len(rows) else []
        else:
            runs = [(r, o[j].reshape(-1).view(np.uint8)) for j, r in enumerate(rows)]
        with open(self.path, "rb", buffering=0) as f:
            for first, buf in runs:
                f.seek(self.offset + first * self.row_bytes)
                view, at = memoryview(buf), 0
                while at < len(view):  # a raw read may return fewer bytes than asked (large reads: ~2 GB at most)
                    got = f.readinto(view[at:])
                    if not got:
                        raise OSError(f"{self.path}: file shorter than its header says")
                    at += got
        return out


class Features(Dataset):
    """(x, y) for precomputed features. views: one (N, C, H, W) array per view (NpyRows or tensors); an example is
    (C, H, W) for one view, (views, C, H, W) for several, stacked per read. index: the rows this set holds (a
    validation split's part), None for all. affine: (m, inv), the map x ↦ (x - m)·inv per channel applied to every
    read (dataset.normalize=dp's), (C, 1, 1) tensors. Indexed by an int, a slice or an index tensor of examples."""

    def __init__(self, views: list, labels: torch.Tensor, index: torch.Tensor | None = None, affine=None):
        self.views, self.labels, self.index, self.affine = list(views), labels, index, affine

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        rows = i if self.index is None else self.index[i]
        if isinstance(rows, torch.Tensor) and rows.dim() == 0:
            rows = int(rows)
        x = self.views[0][rows] if len(self.views) == 1 else self._stacked(rows)
        if self.affine is not None:
            m, inv = self.affine
            x = x.sub(m).mul_(inv)  # the float32 operations of normalising the whole array; never the stored rows
        return x, self.labels[i]

    def _stacked(self, rows) -> torch.Tensor:
        """(B, views, ...) for a slice or index tensor of rows, (views, ...) for an int: each view read into its
        place."""
        one = isinstance(rows, int)
        n = 1 if one else len(range(*rows.indices(len(self.views[0])))) if isinstance(rows, slice) else len(rows)
        x = torch.empty((n, len(self.views), *self.views[0].shape[1:]), dtype=self.views[0].dtype)
        for k, v in enumerate(self.views):
            r = slice(rows, rows + 1 if rows != -1 else None) if one else rows
            if isinstance(v, NpyRows):
                v.read_into(v.rows(r), x[:, k])
            else:
                x[:, k] = v[r]
        return x[0] if one else x

    def subset(self, idx) -> Features:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Features(self.views, self.labels[idx], idx if self.index is None else self.index[idx], self.affine)

    def first_view(self) -> Features:
        return Features(self.views[:1], self.labels, self.index, self.affine)

    def normalized(self, m: torch.Tensor, inv: torch.Tensor) -> Features:
        if self.affine is not None:
            raise ValueError("features normalised twice")
        return Features(self.views, self.labels, self.index, (m, inv))

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole set in memory, as TensorDataset's: for tests and small sets only."""
        return self[slice(None)]


def cached(cache_dir: str | None, what: str, images: torch.Tensor, blocks) -> NpyRows | torch.Tensor:
    """The features of `images`, computed once: `blocks()` yields consecutive (n_k, ...) blocks of them, len(images)
    rows in all. Saved as <cache_dir>/<what>-<SHA-256 of `what` and the images' shape, dtype and bytes>.npy (a changed
    image or transform never hits a stale entry), written block by block and renamed into place (atomic), read back
    as NpyRows. Without a cache_dir, or with one that cannot be written, a tensor in memory."""
    if cache_dir is None:
        return torch.cat(list(blocks()))
    h = hashlib.sha256(what.encode())
    h.update(str((tuple(images.shape), images.dtype)).encode())
    h.update(images.contiguous().numpy())  # the buffer itself, not a copy
    path = os.path.join(cache_dir, f"{what}-{h.hexdigest()[:20]}.npy")
    if os.path.isfile(path):
        try:
            rows = NpyRows(path)
            if len(rows) != len(images) or os.path.getsize(path) != rows.offset + len(rows) * rows.row_bytes:
                raise ValueError("truncated")
            log.info("features from the cache %s", path)
            return rows
        except (OSError, ValueError) as e:  # truncated or foreign file: recompute and overwrite
            log.warning("ignoring unreadable feature cache %s (%s)", path, e)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        _write_npy(path, blocks(), len(images))
    except OSError as e:  # a read-only data_dir only costs the recomputation next time (and the memory)
        log.warning("cannot write the feature cache %s (%s)", path, e)
        return torch.cat(list(blocks()))
    return NpyRows(path)


def _write_npy(path: str, blocks, n: int) -> None:
    """A .npy file of the concatenated blocks (n rows in all), one block in memory at a time."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            rows = 0
            for block in blocks:
                block = block.contiguous().numpy()
                if rows == 0:
                    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(block.dtype),
                                                             "fortran_order": False, "shape": (n, *block.shape[1:])})
                f.write(memoryview(block).cast("B"))
                rows += len(block)
        if rows != n:
            raise ValueError(f"{rows} feature rows for {n} images")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
