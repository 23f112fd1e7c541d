"""The host CPU's vector width, as onnxruntime's NCHWc layout uses it.

At its LAYOUT and ALL optimisation levels onnxruntime reorders convolution activations
into blocks of channels as wide as the CPU's float vectors, padding the channel count up
to a whole block: 16 floats with AVX-512, 8 with AVX2 or older x86 (MLAS's NchwcBlockSize).
The ARM builds on PyPI have no NCHWc kernels, so there is no block there (None). The
planner pads conv activations by this width only when the engine will (see
exporters/liveness.py and docs/memory.md).
"""
from __future__ import annotations

import platform
from pathlib import Path


def vector_width(flags: set[str], machine: str) -> int | None:
    """Floats per NCHWc block for a CPU with these /proc/cpuinfo `flags`, or None (no NCHWc)."""
    if machine.lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    return 16 if "avx512f" in flags else 8


def host_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags to read (macOS, Windows)
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def host_vector_width() -> int | None:
    return vector_width(host_flags(), platform.machine())
