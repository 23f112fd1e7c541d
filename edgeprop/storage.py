"""Files on disk: atomic writes, pickle-free array archives, checksums."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import BundleError


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write `data` (bytes, or a function that writes to a file) to a temporary file in the
    same folder, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never half of either.
    Temporary files that an earlier, killed writer left behind are removed: on a device
    that loses power now and then they would otherwise fill the card.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the file from other users
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # disk full, read-only card: say which file could not be written
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, f"{e.strerror} (writing {path}; the previous file, if any, is intact)") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


OUTPUT_MARKER = ".edgeprop-output"  # in every folder deploy writes: what --force may replace


def check_output(out: Path, source: Path, force: bool) -> None:
    """May a deploy write `out` (from the bundle at `source`)? Never the bundle itself, a
    folder inside it or one holding it; an existing, non-empty `out` only with `force`, and
    only if edgeprop wrote it (it holds OUTPUT_MARKER): nothing edgeprop did not create is
    ever deleted."""
    out, source = Path(out), Path(source)
    o, s = out.resolve(), source.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise BundleError(f"--out {out}: that is the bundle {source}, a folder inside it or one holding it; "
                          f"choose a folder elsewhere")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise BundleError(f"--out {out}: exists and is not a folder; choose another --out")
        if any(out.iterdir()):
            if not force:
                raise BundleError(f"{out} exists and is not empty; pass --force to replace it")
            if not (out / OUTPUT_MARKER).is_file():
                raise BundleError(f"{out}: --force replaces only a folder edgeprop wrote (it holds {OUTPUT_MARKER}); "
                                  f"this one does not: remove it yourself or choose another --out")


@contextlib.contextmanager
def new_folder(out: Path, mark: bool = False) -> Iterator[Path]:
    """Build a folder beside `out` and move it into place only when the block succeeds: a
    failure never leaves half a folder, and the old `out` (if any) is replaced only then.
    `mark`: leave OUTPUT_MARKER in it (see check_output)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide it from other users
    try:
        yield tmp
        if mark:
            (tmp / OUTPUT_MARKER).write_text("written by edgeprop deploy; --force may replace this folder\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                meta: dict | None = None) -> None:
    """Save named arrays as an uncompressed .npz, atomically; `meta` rides along as JSON.

    Arrays are written one at a time straight to the file, so `arrays` may be a generator
    that maps each one in only while it is written (streamed training state): saving never
    needs a second copy of the state in memory."""
    items = arrays.items() if isinstance(arrays, Mapping) else arrays

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for key, value in items:
                with z.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.ascontiguousarray(value), allow_pickle=False)
            if meta is not None:
                with z.open("__meta__.npy", "w") as member:
                    np.lib.format.write_array(member, np.array(json.dumps(meta, sort_keys=True)), allow_pickle=False)

    write_atomic(path, write)


@contextlib.contextmanager
def open_arrays(path: Path) -> Iterator[tuple[Mapping[str, np.ndarray], dict]]:
    """An .npz written by save_arrays, read lazily: each array is read when it is looked up,
    never unpickled. Yields (arrays, meta)."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: file is missing")
    if not zipfile.is_zipfile(path):  # else numpy would try it as a pickle and say so
        raise BundleError(f"{path}: not a readable array archive (not an .npz file)")
    try:  # only the reading is guarded: errors of the caller's own code pass through
        npz = np.load(path, allow_pickle=False)
        meta = json.loads(str(npz["__meta__"])) if "__meta__" in npz.files else {}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise BundleError(f"{path}: not a readable array archive ({e})") from None
    with npz:
        yield _Checked(npz, path), meta


# A member whose data would inflate more than this from its stored bytes is refused before it
# is read: real arrays deflate a few times at most (MNIST's uint8 pixels about 5x), a
# decompression bomb thousands of times.
MAX_INFLATION = 200


def read_npy_header(f: BinaryIO) -> tuple[tuple[int, ...], np.dtype, bool]:
    """(shape, dtype, fortran_order) of the .npy stream `f`, positioned after the header."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return tuple(shape), dtype, fortran


class _Checked(Mapping):
    """npz members by name, with read errors reported against the file. Each member's header
    is read (and its size checked against what the archive stores) before its data."""

    def __init__(self, npz, path: Path):
        self.npz, self.path = npz, path
        self.keys_ = [k for k in npz.files if k != "__meta__"]

    def header(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) of member `key`, from its header alone: nothing is decompressed."""
        if key not in self.keys_:
            raise KeyError(key)
        try:
            info = self.npz.zip.getinfo(f"{key}.npy")
            with self.npz.zip.open(info) as f:
                shape, dtype, _ = read_npy_header(f)
        except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
            raise BundleError(f"{self.path}: not a readable array archive ('{key}': {e})") from None
        if dtype.hasobject:
            raise BundleError(f"{self.path}: '{key}' holds Python objects (pickled data); refused")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > info.file_size:
            raise BundleError(f"{self.path}: '{key}' declares {dtype}{list(shape)} ({nbytes} bytes) but holds "
                              f"{info.file_size}: truncated or forged")
        if info.file_size > MAX_INFLATION * max(info.compress_size, 1) + 4096:
            raise BundleError(f"{self.path}: '{key}' would inflate {info.compress_size} stored bytes to "
                              f"{info.file_size} (over {MAX_INFLATION}x): refused as a decompression bomb")
        return shape, dtype

    def __getitem__(self, key: str) -> np.ndarray:
        self.header(key)
        try:
            return self.npz[key]
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise BundleError(f"{self.path}: not a readable array archive ('{key}': {e})") from None

    def __iter__(self):
        return iter(self.keys_)

    def copy_into(self, key: str, out: np.ndarray, chunk: int = 1 << 16) -> None:
        """Read array `key` straight into `out` (e.g. a memory-mapped file) in small chunks:
        never a whole copy of it on the heap, where the allocator would keep it after use."""
        try:
            self.header(key)
            with self.npz.zip.open(f"{key}.npy") as f:
                shape, dtype, fortran = read_npy_header(f)
                if tuple(shape) != out.shape or dtype != out.dtype or fortran or dtype.hasobject:
                    raise BundleError(f"{self.path}: '{key}' is {dtype}{list(shape)}, "
                                      f"expected {out.dtype}{list(out.shape)}")
                target = out.reshape(-1).view(np.uint8)
                pos = 0
                while pos < target.size:
                    data = f.read(min(chunk, target.size - pos))
                    if not data:
                        raise EOFError("array data ends early")
                    target[pos:pos + len(data)] = np.frombuffer(data, np.uint8)
                    pos += len(data)
        except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
            raise BundleError(f"{self.path}: not a readable array archive ('{key}': {e})") from None

    def __len__(self):
        return len(self.keys_)


def load_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Load an .npz written by save_arrays without ever unpickling; returns (arrays, meta)."""
    with open_arrays(path) as (arrays, meta):
        return dict(arrays.items()), meta
