"""Data sources for `--data`: the bundled digits set, an .npz file, or a folder of IDX files.

    digits          scikit-learn's 8x8 digits (1797 images, values 0..16), shipped inside
                    edgeprop so a device needs neither scikit-learn nor a download; a fixed
                    stratified 75/25 train/test split
    FILE.npz        arrays x (N, ...) and y (N,), or x_train/y_train/x_test/y_test
    FOLDER/         MNIST / Fashion-MNIST IDX files, gzipped or not:
                    {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
"""
from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .storage import open_arrays

SPLITS = ("train", "test")
DIGITS_FILE = Path(__file__).parent / "data" / "digits.npz"


@dataclass
class Dataset:
    x: np.ndarray  # (N, ...) as stored (uint8 images stay uint8: 4x less memory than float32);
                   # the bundle's normalisation is applied a batch at a time
    y: np.ndarray  # (N,) int64
    name: str

    def __len__(self) -> int:
        return len(self.y)

    @property
    def nbytes(self) -> int:
        """What the data set holds in RAM."""
        return self.x.nbytes + self.y.nbytes


def load(source: str, split: str) -> Dataset:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    if source == "digits":
        x, y = _digits(split)
    else:
        path = Path(source)
        if path.is_dir():
            x, y = _idx_folder(path, split)
        elif path.suffix == ".npz" and path.is_file():
            x, y = _npz(path, split)
        elif not path.exists():
            raise DataError(f"--data {source}: no such file or folder (use 'digits', an .npz file or an IDX folder)")
        else:
            raise DataError(f"--data {source}: not an .npz file or an IDX folder")
    x = np.asarray(x)
    if x.dtype.kind not in "buif" or x.ndim < 1:
        raise DataError(f"{source}: x must be a numeric array of samples, got dtype {x.dtype} shape {x.shape}")
    return Dataset(x, _labels(y, source), f"{source}:{split}")


def stratified_split(y: np.ndarray, test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): the same share of every class goes to test, fixed by `seed`."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _digits(split: str):
    with np.load(DIGITS_FILE, allow_pickle=False) as f:
        x, y = f["x"], f["y"]
    train, test = stratified_split(y)
    idx = train if split == "train" else test
    return x[idx], y[idx]


def _npz(path: Path, split: str):
    # Only the two members this split uses are read, each after its header was checked
    # against what the archive stores (storage.open_arrays): no pickle, no decompression bomb.
    with open_arrays(path) as (arrays, _):
        for xk, yk in ((f"x_{split}", f"y_{split}"), ("x", "y")):
            if xk in arrays and yk in arrays:
                x, y = arrays[xk], arrays[yk]
                rows = [a.shape[0] if a.ndim else 0 for a in (x, y)]
                if rows[0] != rows[1]:
                    raise DataError(f"{path}: {xk} has {rows[0]} rows but {yk} has {rows[1]}")
                return x, y
        raise DataError(f"{path}: expected arrays x and y, or x_{split} and y_{split}; found {sorted(arrays)}")


_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not), read straight into its array: the data are in memory
    once, never also as a bytes object (47 MB for Fashion-MNIST's training images)."""
    try:
        return _read_idx(path)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: not a readable IDX file ({e})") from None


MAX_IDX_BYTES = (1 << 32) - 1  # a gzip records its data's size mod 2^32; no IDX data set is near it


def _stored_bytes(path: Path) -> int:
    """What the file holds once decompressed: its size, or a gzip's ISIZE trailer: a header
    claiming more than that is refused before anything is allocated."""
    size = path.stat().st_size
    if path.suffix != ".gz":
        return size
    with open(path, "rb") as f:
        f.seek(max(size - 4, 0))
        return int.from_bytes(f.read(4), "little") if size >= 18 else 0


def _read_idx(path: Path) -> np.ndarray:
    stored = _stored_bytes(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_TYPES:
            raise DataError(f"{path}: not an IDX file (bad magic number)")
        dims = f.read(4 * head[3])
        if len(dims) != 4 * head[3]:
            raise DataError(f"{path}: IDX header ends early")
        shape = tuple(int(d) for d in np.frombuffer(dims, ">u4"))
        dtype = np.dtype(_IDX_TYPES[head[2]])
        if not shape:
            raise DataError(f"{path}: IDX file with 0 dimensions; expected images or labels")
        need = math.prod(shape) * dtype.itemsize
        if need + 4 + 4 * len(shape) > min(stored, MAX_IDX_BYTES):
            raise DataError(f"{path}: header says shape {shape} ({need} bytes), more than the file holds")
        out = np.empty(shape, dtype)
        view, got = memoryview(out.reshape(-1).view(np.uint8)), 0
        while got < len(view):  # in 1 MiB pieces: gzip's readinto would build the whole as bytes first
            n = f.readinto(view[got:got + (1 << 20)])
            if not n:
                break
            got += n
        extra = len(f.read(1))
    expected = out.nbytes
    if got != expected or extra:
        follows = f"{got} bytes" if got != expected else "more bytes"
        raise DataError(f"{path}: header says shape {shape} ({expected} bytes) but {follows} follow")
    return out.astype(dtype.newbyteorder("="), copy=False)


def _idx_folder(folder: Path, split: str):
    prefix = "train" if split == "train" else "t10k"

    def find(kind: str) -> Path:
        hits = sorted(folder.glob(f"{prefix}-{kind}*ubyte*"))
        if not hits:
            raise DataError(f"{folder}: no {prefix}-{kind}-ubyte[.gz] file for the {split} split")
        return hits[0]

    x, y = read_idx(find("images")), read_idx(find("labels"))
    if len(x) != len(y):
        raise DataError(f"{folder}: {len(x)} images but {len(y)} labels in the {split} split")
    return x, y


def _labels(y: np.ndarray, source: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{source}: labels must be a 1-D array of class indices, got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"{source}: labels must be whole class indices")
    elif y.dtype.kind not in "iu":
        raise DataError(f"{source}: labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64)


def check(data: Dataset, input_shape: list[int], num_classes: int) -> None:
    """Reject data the model cannot train on, before any work starts."""
    n_features = int(np.prod(input_shape))
    if len(data) == 0:
        raise DataError(f"{data.name}: no samples")
    got = int(np.prod(data.x.shape[1:]))
    if got != n_features:
        raise DataError(f"{data.name}: samples have {got} features (shape {list(data.x.shape[1:])}); "
                        f"the model expects {n_features} (input shape {list(input_shape)})")
    if data.x.dtype.kind == "f":  # integer samples cannot hold NaN or inf
        if data.x.dtype.itemsize > 4 and np.abs(data.x).max(initial=0) > np.finfo(np.float32).max:
            raise DataError(f"{data.name}: values up to {float(np.abs(data.x).max()):.3g} overflow float32, "
                            f"which the model computes in")
        bad = ~np.isfinite(data.x.reshape(len(data), -1))
        if bad.any():
            row = int(np.flatnonzero(bad.any(axis=1))[0])
            raise DataError(f"{data.name}: {int(np.isnan(data.x).sum())} NaN and {int(np.isinf(data.x).sum())} "
                            f"inf values in x (first in sample {row})")
    out = (data.y < 0) | (data.y >= num_classes)
    if out.any():
        row = int(np.flatnonzero(out)[0])
        raise DataError(f"{data.name}: label {int(data.y[row])} in sample {row} is outside the model's "
                        f"{num_classes} classes (0..{num_classes - 1})")


SCALE_FACTOR = 4.0  # how far the data's spread may stray from the export's before train/eval refuse


def check_scale(data: Dataset, mean: float, std: float) -> None:
    """The bundle normalises inputs with the export data's mean and std. Data on another scale
    (pixels 0-16 at export, 0-1 here) would train and score silently wrong (measured: 53%
    instead of 97% on digits), so refuse when the spread differs by more than SCALE_FACTOR
    or the mean lies more than two export stds away."""
    x = data.x.reshape(len(data), -1)[:4096].astype(np.float64)  # a sample is enough to see the scale
    m, s = float(x.mean()), float(x.std())
    if not (std / SCALE_FACTOR <= s <= std * SCALE_FACTOR) or abs(m - mean) > 2 * std:
        raise DataError(f"{data.name}: values have mean {m:.3g} and std {s:.3g}, but the bundle was exported on "
                        f"data with mean {mean:.3g} and std {std:.3g}; scale the data like the export's "
                        f"(or export again from this data)")
