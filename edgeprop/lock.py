"""One writer per bundle: `train` (and `--resume`, `--stream`) and `deploy` hold a lock on the
bundle for their whole run; a second one refuses at once instead of racing the first for
its checkpoint and temporary files. `eval` and `info` only read (atomic renames keep what
they read whole) and take no lock.

The lock is `fcntl.flock` on BUNDLE/.edgeprop.lock: the kernel drops it when the process
exits, however it exits (kill -9 included), so a crashed run never leaves a stale lock.
"""
from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import EdgepropError

LOCK_FILE = ".edgeprop.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; runs are not guarded there
    fcntl = None


@contextlib.contextmanager
def held(bundle_root: str | Path, what: str) -> Iterator[None]:
    """Hold the bundle's lock while the block runs; refuse when another process holds it."""
    path = Path(bundle_root) / LOCK_FILE
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EROFS) and not os.access(bundle_root, os.W_OK):
            yield  # a read-only bundle: no run can write it, so there is nothing to guard
            return
        raise EdgepropError(f"{path}: cannot open the bundle's lock file ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise EdgepropError(f"{Path(bundle_root)}: in use by {owner}; wait for it to finish (or stop it) "
                                f"before you {what}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"edgeprop pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
