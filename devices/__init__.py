"""Device profiles: what a target has (RAM, flash, arch, cores, engines), as TOML data files.

    profile = load_profile("rpi-zero-2w")          # a shipped profile, by name
    profile = load_profile("boards/my-board.toml")  # or a user's own file
    profile.budget                                   # bytes a training process may take

A profile file (see rpi4.toml for a commented example):

    name = "my-board"
    title = "My Board"
    kind = "linux"            # "linux" (runs Python) or "mcu" (bare metal: TFLM or generated C)
    arch = "aarch64"
    cores = 4
    ram = "2 GiB"             # sizes: bytes, or "N B/KB/MB/GB" (powers of 1000) / "KiB/MiB/GiB"
    flash = "32 GB"           # on-board flash or the storage card the profile assumes
    train_share = 0.5         # share of RAM a training process may take; the OS and other
                              # programs need the rest
    float_formats = ["fp32"]
    engines = ["onnxruntime"]
    psram = "8 MiB"           # optional: external RAM (MCUs), where weights may live
    python = "3.11"           # optional: the device's Python (linux), for deploy
    vector_width = 16         # optional, x86 only: floats per vector (16 with AVX-512, 8 with
                              # AVX2), the block onnxruntime's NCHWc layout pads conv channels to;
                              # ARM profiles leave it out (no NCHWc there)
    cflags = "-mcpu=cortex-a72"  # optional: the CPU flags `deploy --target native` builds with

Sources for every shipped figure are comments in each file. The Profile type itself is the
core's (edgeprop.device_profile): the memory planner checks plans against it.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from edgeprop.device_profile import KINDS, Profile
from edgeprop.errors import EdgepropError
from edgeprop.sizes import parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - older Pythons on devices
    import tomli as tomllib

HERE = Path(__file__).resolve().parent

REQUIRED = ("name", "title", "kind", "arch", "cores", "ram", "flash", "train_share", "float_formats", "engines")
OPTIONAL = ("psram", "python", "vector_width", "cflags")


def _profile(data: dict, where: str) -> Profile:
    missing = [f for f in REQUIRED if f not in data]
    if missing:
        raise EdgepropError(f"{where}: device profile lacks field(s) {', '.join(missing)}")
    unknown = sorted(set(data) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise EdgepropError(f"{where}: unknown field(s) {', '.join(unknown)} (known: "
                            f"{', '.join(REQUIRED + OPTIONAL)})")

    def text(field):
        if not isinstance(data[field], str) or not data[field]:
            raise EdgepropError(f"{where}: field '{field}' must be a non-empty string")
        return data[field]

    def names(field):
        v = data[field]
        if not isinstance(v, list) or not v or not all(isinstance(s, str) and s for s in v):
            raise EdgepropError(f"{where}: field '{field}' must be a non-empty list of strings")
        return tuple(v)

    if text("kind") not in KINDS:
        raise EdgepropError(f"{where}: field 'kind' must be one of {', '.join(KINDS)}, got {data['kind']!r}")
    cores = data["cores"]
    if not isinstance(cores, int) or isinstance(cores, bool) or cores < 1:
        raise EdgepropError(f"{where}: field 'cores' must be a positive integer, got {cores!r}")
    share = data["train_share"]
    if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 < share <= 1:
        raise EdgepropError(f"{where}: field 'train_share' must be a number in (0, 1], got {share!r}")
    python = data.get("python")
    if python is not None and not (isinstance(python, str) and re.fullmatch(r"3\.\d+", python)):
        raise EdgepropError(f"{where}: field 'python' must look like \"3.11\", got {python!r}")
    width = data.get("vector_width")
    if width is not None and (not isinstance(width, int) or isinstance(width, bool) or width not in (4, 8, 16)):
        raise EdgepropError(f"{where}: field 'vector_width' must be 4, 8 or 16 (floats per vector), got {width!r}")
    cflags = data.get("cflags")
    if cflags is not None and not (isinstance(cflags, str) and re.fullmatch(r"(-m[\w=.+-]+ ?)+", cflags)):
        raise EdgepropError(f"{where}: field 'cflags' must be compiler flags like \"-mcpu=cortex-a53\", got {cflags!r}")
    return Profile(name=text("name"), title=text("title"), kind=data["kind"], arch=text("arch"), cores=cores,
                   ram=parse_size(data["ram"], f"{where}: field 'ram'"),
                   flash=parse_size(data["flash"], f"{where}: field 'flash'"),
                   train_share=float(share), float_formats=names("float_formats"), engines=names("engines"),
                   psram=parse_size(data["psram"], f"{where}: field 'psram'") if "psram" in data else 0,
                   python=python, vector_width=width, cflags=cflags, source=where)


MAX_PROFILE = 1 << 20  # bytes: a profile is a few hundred; /dev/zero is endless


def read_profile(path: str | Path) -> Profile:
    path = Path(path)
    if path.exists() and (not path.is_file() or path.stat().st_size > MAX_PROFILE):
        raise EdgepropError(f"{path}: not a device profile (a .toml file under {MAX_PROFILE} bytes)")
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise EdgepropError(f"{path}: cannot read device profile ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise EdgepropError(f"{path}: not a valid TOML device profile ({e})") from None
    return _profile(data, str(path))


def shipped() -> list[Path]:
    return sorted(HERE.glob("*.toml"))


def profiles() -> list[Profile]:
    return [read_profile(p) for p in shipped()]


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name (e.g. "rpi4"), or a profile file of the user's."""
    text = str(name_or_path)
    if text.endswith(".toml") or "/" in text:
        return read_profile(text)
    path = HERE / f"{text}.toml"
    if not path.is_file():
        known = ", ".join(p.stem for p in shipped())
        raise EdgepropError(f"unknown device '{text}' (known: {known}; or give a path to your own .toml profile)")
    return read_profile(path)
