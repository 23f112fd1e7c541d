"""An emulated arm64 Linux (Raspberry Pi / Jetson class) to run deployed folders on.

A minimal Debian bookworm arm64 root filesystem, built once with `debootstrap --foreign`
and cached in .cache/aarch64/ (ignored by git). This sandbox has no binfmt_misc, so there is
no chroot and no second debootstrap stage: the downloaded packages are unpacked with
`dpkg -x`, and the arm64 Python runs directly under `qemu-aarch64-static -L ROOT`. Anything
that would spawn a new arm64 process (`python -m venv`, pip building a package) cannot run,
so `setup`'s install step is done in-process: pip `--target`, offline, from the wheelhouse.
Tools: scripts/install-emulators.sh (Debian packages debootstrap, qemu-user-static).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "aarch64"
SUITE = "bookworm"
PYTHON = "usr/bin/python3.11"


def missing_tools() -> str | None:
    """Why the emulated device cannot run here, or None."""
    absent = [t for t in ("debootstrap", "qemu-aarch64-static", "dpkg") if shutil.which(t) is None]
    if absent:
        return f"{', '.join(absent)} not installed (run scripts/install-emulators.sh, or `make aarch64`)"
    if os.geteuid() != 0:
        return "debootstrap needs root to build the arm64 root filesystem"
    return None


def root_filesystem() -> Path:
    """The cached arm64 root with python3, built on first use (about 30 s and 235 MB)."""
    root = CACHE / f"{SUITE}-root"
    if (root / PYTHON).is_file():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".root.", dir=CACHE))
    try:
        subprocess.run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase",
                        "--include=python3,python3-venv", SUITE, str(tmp), "http://deb.debian.org/debian"],
                       check=True, capture_output=True)
        for deb in sorted((tmp / "var/cache/apt/archives").glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True, capture_output=True)
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)  # only a finished root is ever cached
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root


def python(root: Path, *args, cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the arm64 Python under qemu-user, in `cwd` (never the source tree: `python -m`
    would import edgeprop from there instead of from what was installed)."""
    return subprocess.run(["qemu-aarch64-static", "-L", str(root), str(root / PYTHON), *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout, cwd=cwd)


def install(root: Path, deploy: Path, target: Path) -> None:
    """`setup`'s install step, in-process and offline: pip --target from deploy/wheels."""
    pip = next((root / "usr/share/python-wheels").glob("pip-*.whl"), None)
    if pip is None:  # python3-pip-whl comes with python3-venv
        raise RuntimeError(f"{root}: no pip wheel in usr/share/python-wheels")
    proc = python(root, pip / "pip", "install", "--quiet", "--no-index", "--no-compile", "--find-links",
                  deploy / "wheels", "--target", target, "edgeprop", cwd=deploy)
    if proc.returncode != 0:
        raise RuntimeError(f"pip under qemu failed:\n{proc.stderr}")
