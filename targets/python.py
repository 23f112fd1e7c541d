"""The python target (`edgeprop deploy`): one folder that trains on a Linux device with no
internet and no torch.

    DEPLOY/
      bundle/          the bundle (no checkpoints)
      device.toml      the device profile: `train` checks the memory plan against it again
      wheels/          edgeprop, numpy and the engine, built for the device's CPU and Python
      setup            offline: check the checksums, make .venv, install from wheels/
      train, eval      run edgeprop from .venv on bundle/ (train with --device device.toml)
      supernode        with --fleet: join a fleet as a Flower SuperNode (flwr and its
                       dependencies are in wheels/; docs/fleet.md)
      SHA256SUMS       every file above

Wheels come from `pip download --platform ... --only-binary=:all:`, so a device whose Python
or architecture has no engine wheel is an error here, on the desktop, not on the device.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edgeprop import memory
from edgeprop.bundle import Bundle
from edgeprop.device_profile import Profile
from edgeprop.errors import EdgepropError
from edgeprop.lock import LOCK_FILE
from edgeprop.runtimes import memory_model
from edgeprop.sizes import format_size as fmt
from edgeprop.storage import check_output, new_folder, sha256_of

# pip platform tags for each device architecture (glibc-based Linux).
PLATFORMS = {
    "aarch64": ["manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_27_aarch64",
                "manylinux_2_28_aarch64"],
    "x86_64": ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64"],
    "riscv64": ["manylinux_2_31_riscv64", "manylinux_2_35_riscv64", "manylinux_2_39_riscv64"],
}
PYTHON_FLOOR = (3, 9)  # edgeprop's requires-python
# The oldest engine release that runs the bundle's graphs (ONNX opset 18 arrived in onnxruntime 1.14).
ENGINE_FLOOR = {"onnxruntime": (1, 14)}

SETUP = """#!/bin/sh
# Offline set-up on the device: needs python3 with venv (Debian: apt install python3-venv).
set -e
cd "$(dirname "$0")"
sha256sum -c --quiet SHA256SUMS
python3 -m venv .venv
.venv/bin/pip install --quiet --no-index --find-links wheels '{package}'
.venv/bin/edgeprop profile bundle --device device.toml
"""

RUN = """#!/bin/sh
# {what} on the device (after ./setup). Extra options are passed on, e.g. --data my_data.npz
here="$(cd "$(dirname "$0")" && pwd)"
exec "$here/.venv/bin/edgeprop" {command} "$here/bundle" {options}"$@"
"""

SUPERNODE = """#!/bin/sh
# Join a fleet (after ./setup): ./supernode SUPERLINK_HOST:PORT DATA [flower-supernode options],
# e.g. ./supernode server:8000 my_data.npz --root-certificates ca.crt (docs/fleet.md).
# This device trains the units the server assigns on DATA, within device.toml's memory;
# the data, the memory and the SuperLink's address are checked before it joins.
set -e
here="$(cd "$(dirname "$0")" && pwd)"
[ $# -ge 2 ] || { echo "usage: $0 SUPERLINK_HOST:PORT DATA [flower-supernode options]" >&2; exit 2; }
superlink="$1"; data="$2"; shift 2
export FLWR_TELEMETRY_ENABLED=0  # nothing leaves the fleet
exec "$here/.venv/bin/edgeprop" fleet join --device "$here/device.toml" "$here/bundle" "$superlink" "$data" "$@"
"""
FLWR = "flwr>=1.42,<2"  # as edgeprop's fleet extra


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split("."))
    except ValueError:
        raise EdgepropError(f"'{text}' is not a version number like 1.20.1") from None


def engine_requirement(engine: str, version: str | None) -> str:
    floor = ENGINE_FLOOR.get(engine)
    if version and floor and _version(version) < floor:
        raise EdgepropError(f"{engine} {version} cannot run the bundle's ONNX opset 18 graphs; "
                            f"it needs {'.'.join(map(str, floor))} or newer")
    if version:
        return f"{engine}=={version}"
    return f"{engine}>={'.'.join(map(str, floor))}" if floor else engine


def fetch_wheels(dest: Path, requirements: list[str], arch: str, python: str) -> None:
    """pip download the requirements (and their dependencies) as wheels for arch/python."""
    if arch not in PLATFORMS:
        raise EdgepropError(f"no wheel platform known for arch '{arch}' (known: {', '.join(PLATFORMS)})")
    platforms = [a for p in PLATFORMS[arch] for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
           *platforms, "--python-version", python, "--implementation", "cp", "--dest", str(dest), *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.splitlines()
        reason = [line for line in lines if line.startswith("ERROR")] or lines[-1:]
        raise EdgepropError(f"no wheels of {' '.join(requirements)} for CPython {python} on {arch} Linux "
                            f"({'; '.join(reason)})")


def edgeprop_wheel(dest: Path, wheel: str | None) -> None:
    """This edgeprop as a wheel: the one given, or built from the source tree it runs from."""
    if wheel:
        if not Path(wheel).is_file():
            raise EdgepropError(f"--edgeprop-wheel {wheel}: no such file")
        shutil.copy(wheel, dest)
        return
    source = Path(__file__).resolve().parents[1]
    if not (source / "pyproject.toml").is_file():
        raise EdgepropError("edgeprop is not installed from its source tree here: pass --edgeprop-wheel PATH")
    with tempfile.TemporaryDirectory() as build:  # a private copy: the build writes build/ and *.egg-info
        tree = Path(build) / "src"
        shutil.copytree(source, tree, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "runs",
                                                                     "__pycache__", ".cache", "bench"))
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                               "--no-deps", "--no-build-isolation", "-w", str(dest), str(tree)],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise EdgepropError(f"building edgeprop's wheel failed: {proc.stderr.strip().splitlines()[-1:]}")


def write_checksums(root: Path) -> None:
    lines = [f"{sha256_of(p)}  {p.relative_to(root).as_posix()}" for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != "SHA256SUMS"]
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def check_checksums(root: Path) -> None:
    """What `setup` does with sha256sum, for tests and for devices without coreutils."""
    for line in (root / "SHA256SUMS").read_text().splitlines():
        digest, rel = line.split("  ", 1)
        if hashlib.sha256((root / rel).read_bytes()).hexdigest() != digest:
            raise EdgepropError(f"{root / rel}: checksum does not match SHA256SUMS")


class Target:
    """A folder with the bundle, wheels for the device's CPU and Python, and set-up and train
    scripts (see the module's docstring)."""

    name = "python"

    def __init__(self, engine: str = "onnxruntime", engine_version: str | None = None, python: str | None = None,
                 edgeprop_wheel: str | None = None, fleet: bool = False):
        self.engine, self.engine_version = engine, engine_version
        self.python, self.edgeprop_wheel, self.fleet = python, edgeprop_wheel, fleet

    def check(self, bundle: Bundle, device: Profile) -> dict:
        """What the folder will hold for `device`: its Python and the wheels' requirements;
        an error when the device cannot run the bundle."""
        if device.kind != "linux":
            raise EdgepropError(f"{device.name} is a {device.kind} device: deploy to it with --target c99, "
                                f"not a Python folder")
        python = self.python or device.python
        if not python:
            raise EdgepropError(f"{device.source}: the profile names no 'python' version; pass --python 3.X")
        if _version(python) < PYTHON_FLOOR:
            raise EdgepropError(f"{device.name} has Python {python}; edgeprop needs "
                                f"{'.'.join(map(str, PYTHON_FLOOR))} or newer on the device (pass --python if the "
                                f"device has a newer one installed)")
        # The same budget check the device repeats before training (without the data set, unknown here).
        why = memory.refusal(bundle, device=device, engine=memory_model(self.engine))
        if why:
            raise EdgepropError(why)
        requirements = [engine_requirement(self.engine, self.engine_version), "numpy"]  # the engine first: pip names it
        if _version(python) < (3, 11):
            requirements.append("tomli")
        if self.fleet:
            if _version(python) < (3, 10):
                raise EdgepropError(f"--fleet: Flower needs Python 3.10 or newer; {device.name} has {python}")
            requirements.append(FLWR)
        return {"python": python, "requirements": requirements}

    def write(self, bundle: Bundle, device: Profile, out: str | Path, force: bool = False) -> Path:
        out = Path(out)
        check_output(out, bundle.root, force)
        plan = self.check(bundle, device)
        with new_folder(out, mark=True) as tmp:
            shutil.copytree(bundle.root, tmp / "bundle", ignore=shutil.ignore_patterns("checkpoints", LOCK_FILE))
            shutil.copy(device.source, tmp / "device.toml")
            wheels = tmp / "wheels"
            wheels.mkdir()
            fetch_wheels(wheels, plan["requirements"], device.arch, plan["python"])
            edgeprop_wheel(wheels, self.edgeprop_wheel)
            scripts = {"setup": SETUP.format(package="edgeprop[fleet]" if self.fleet else "edgeprop"),
                       "eval": RUN.format(what="Evaluate", command="eval", options=""),
                       "train": RUN.format(what="Train", command="train", options='--device "$here/device.toml" ')}
            if self.fleet:
                scripts["supernode"] = SUPERNODE
            for name, text in scripts.items():
                (tmp / name).write_text(text)
                (tmp / name).chmod(0o755)
            write_checksums(tmp)
        return out

    def summary(self, report: Path, device: Profile, out: Path) -> str:
        """What `write` made (its report is the folder), for the person who deploys."""
        wheels = sorted(p.name for p in (report / "wheels").iterdir())
        size = sum(p.stat().st_size for p in report.rglob("*") if p.is_file())
        return (f"wrote {report} for {device.title} ({fmt(size)}; {len(wheels)} wheels: {', '.join(wheels)})\n"
                f"copy it to the device, then: ./setup && ./train --data DATA --epochs N")
