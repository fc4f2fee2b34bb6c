"""Datasets as in-memory tensors, with a validation split held out of the training set.

* ``digits``: scikit-learn's bundled 8x8 digits, the embedded default that always works.
* ``fashion-mnist``, ``mnist``, ``kmnist``: IDX files (gzipped or raw) from ``data_dir``,
  ``$SPARSE_LTH_DATA``, or a default folder (Debian's ``dataset-fashion-mnist`` package puts
  Fashion-MNIST in /usr/share/datasets/fashion-mnist). Nothing is ever downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATA_ENV = "SPARSE_LTH_DATA"
IDX_DATASETS = {
    "fashion-mnist": ["/usr/share/datasets/fashion-mnist"],
    "mnist": ["/usr/share/datasets/mnist"],
    "kmnist": ["/usr/share/datasets/kmnist"],
}
DATASETS = ("digits", *IDX_DATASETS)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class Split:
    """Inputs ``x`` (float32, N x C x H x W) and integer labels ``y`` (int64, N)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def fingerprint(self) -> str:
        """A hash of every split's bytes: equal on two machines exactly when the data is (ranks
        of a distributed search compare it before they train; ~0.2 s for Fashion-MNIST)."""
        digest = hashlib.blake2b(f"{self.name}/{self.num_classes}".encode(), digest_size=16)
        for split in (self.train, self.val, self.test):
            for t in (split.x, split.y):
                digest.update(str((tuple(t.shape), t.dtype)).encode())
                digest.update(t.contiguous().numpy())  # the buffer itself, no copy
        return digest.hexdigest()


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (raw or gzipped) into a numpy array.

    >>> import gzip, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.gz")
    >>> with gzip.open(p, "wb") as f: _ = f.write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
    >>> read_idx(p).tolist()
    [7, 8, 9]
    """
    path = Path(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read IDX file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes), file has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem, folder / stem.replace("-idx", ".idx")):
        if candidate.is_file():
            return candidate
    return None


def _idx_folders(name: str, data_dir: str | Path | None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir)]
    folders = []
    if os.environ.get(DATA_ENV):
        env = Path(os.environ[DATA_ENV])
        folders += [env / name, env]
    return folders + [Path(p) for p in IDX_DATASETS[name]]


def _load_idx_dataset(name: str, data_dir: str | Path | None) -> tuple[Split, Split]:
    tried = _idx_folders(name, data_dir)
    for folder in tried:
        files = {part: [_find_idx(folder, stem) for stem in stems] for part, stems in _IDX_FILES.items()}
        if all(p is not None for paths in files.values() for p in paths):
            splits = []
            for part in ("train", "test"):
                images, labels = (read_idx(p) for p in files[part])
                if len(images) != len(labels):
                    raise ValueError(f"{folder}: {part} has {len(images)} images but {len(labels)} labels")
                pixels = images.astype(np.float32)
                pixels /= 255.0  # in place: one pass over 188 MB, not two
                x = torch.from_numpy(pixels).unsqueeze(1)
                splits.append(Split(x, torch.from_numpy(labels.astype(np.int64))))
            return splits[0], splits[1]
    hint = (
        "install Debian's package 'dataset-fashion-mnist'" if name == "fashion-mnist"
        else f"put the four {name} IDX files (train-images-idx3-ubyte[.gz], ...) in a folder"
    )
    raise FileNotFoundError(
        f"dataset {name!r} not found; tried {', '.join(map(str, tried))}. "
        f"To get it: {hint}, then pass --data-dir or set ${DATA_ENV}. "
        "The embedded dataset 'digits' always works."
    )


def _load_digits() -> tuple[Split, Split]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    n_test = 360  # fixed test split of the 1,797 images, independent of the run's seed
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train]), Split(x[test], y[test])


def default_val_size(name: str) -> int:
    """The paper holds out 5,000 training examples; digits is small, so it holds out 300."""
    return 300 if name == "digits" else 5000


def load_dataset(name: str, data_dir: str | Path | None = None, val_size: int | None = None,
                 seed: int = 0) -> Dataset:
    """Load a dataset and hold ``val_size`` training examples out for validation.

    The split depends only on ``seed``: the same seed always holds out the same examples.

    >>> ds = load_dataset("digits")
    >>> len(ds.train), len(ds.val), len(ds.test), ds.input_shape
    (1137, 300, 360, (1, 8, 8))
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    train, test = _load_digits() if name == "digits" else _load_idx_dataset(name, data_dir)
    val_size = default_val_size(name) if val_size is None else val_size
    if not 0 < val_size < len(train):
        raise ValueError(f"val_size must be between 1 and {len(train) - 1} for {name!r}, got {val_size}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size], order[val_size:]
    return Dataset(
        name=name,
        train=Split(train.x[train_idx], train.y[train_idx]),
        val=Split(train.x[val_idx], train.y[val_idx]),
        test=test,
        num_classes=int(torch.cat([train.y, test.y]).max()) + 1,
    )
