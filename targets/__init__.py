"""Deploy targets: everything that turns a bundle into something a device runs.

    python   a folder that sets up and trains offline on a Linux device (wheels, scripts)
    c99      firmware sources for a microcontroller: graphs compiled to C, the driver in c99/
    native   C sources, a Makefile and the data for a Linux device: trains with no Python

Every target has one shape, so `edgeprop deploy --target NAME` treats them alike:

    target = get_target("python", engine="onnxruntime")
    plan = target.check(bundle, device)          # what it will write, or an EdgepropError
    report = target.write(bundle, device, out)   # checks again, then writes the folder
    print(target.summary(report, device, out))
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

from edgeprop.bundle import Bundle
from edgeprop.device_profile import Profile
from edgeprop.errors import EdgepropError

TARGETS = ("python", "c99", "native")


class Target(Protocol):
    name: str

    def check(self, bundle: Bundle, device: Profile): ...

    def write(self, bundle: Bundle, device: Profile, out: str | Path, force: bool = False): ...

    def summary(self, report, device: Profile, out: Path) -> str: ...


def get_target(name: str, **options) -> Target:
    if name not in TARGETS:
        raise EdgepropError(f"unknown target '{name}' (known: {', '.join(TARGETS)})")
    return importlib.import_module(f"{__name__}.{name}").Target(**options)
