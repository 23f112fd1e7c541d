"""Files on disk: atomic writes, pickle-free array archives, checksums."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .errors import BundleError


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

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
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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


def save_arrays(path: Path, arrays: dict[str, np.ndarray], meta: dict | None = None) -> None:
    """Save named arrays as an uncompressed .npz, atomically; `meta` rides along as JSON."""
    buf = io.BytesIO()
    payload = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    if meta is not None:
        payload["__meta__"] = np.array(json.dumps(meta, sort_keys=True))
    np.savez(buf, **payload)
    write_atomic(path, buf.getvalue())


def load_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Load an .npz written by save_arrays without ever unpickling; returns (arrays, meta)."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: file is missing")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise BundleError(f"{path}: not a readable array archive ({e})") from None
    meta_arr = arrays.pop("__meta__", None)
    meta = json.loads(str(meta_arr)) if meta_arr is not None else {}
    return arrays, meta
