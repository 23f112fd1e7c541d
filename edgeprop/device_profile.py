"""What a device has (RAM, flash, arch, cores, engines): the type the memory planner checks
against. The shipped profiles are TOML files, read by edgeprop.devices."""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("linux", "mcu")  # runs Python, or bare metal (TFLM or generated C)


@dataclass(frozen=True)
class Profile:
    name: str
    title: str
    kind: str
    arch: str
    cores: int
    ram: int
    flash: int
    train_share: float
    float_formats: tuple[str, ...]
    engines: tuple[str, ...]
    psram: int = 0
    python: str | None = None
    vector_width: int | None = None  # x86: floats per vector, onnxruntime's NCHWc block (edgeprop.cpu)
    cflags: str | None = None  # the C compiler's CPU flags (deploy --target native), e.g. -mcpu=cortex-a53
    source: str = ""

    @property
    def budget(self) -> int:
        """Bytes of RAM a training process may take on this device."""
        return int(self.ram * self.train_share)
