"""Where the units' weights and optimizer state live while training runs.

In RAM (the default) the state is a plain dict {unit: {key: array}}. With --stream it is a
`StreamedState`: one .npy file per tensor in the bundle's checkpoint folder, memory-mapped
only while its unit is in use, so RAM holds one unit's state at a time and the operating
system writes the rest back to storage. Both are updated in place, so a step never leaves
a second copy of a unit's state behind.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from .bundle import STREAM_FOLDER, Bundle
from .errors import BundleError


class StreamedState(Mapping):
    """{unit: {key: memory-mapped array}}; looking a unit up maps it and unmaps the last one."""

    def __init__(self, bundle: Bundle, source: Mapping[str, np.ndarray], where: str, folder: Path | None = None):
        """Fill the stream files (in `folder`, default the bundle's checkpoints/stream) from
        `source` ("UNIT/KEY" arrays, read lazily), one unit at a time."""
        self.bundle = bundle
        self.folder = Path(folder) if folder is not None else bundle.path(STREAM_FOLDER)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.units = {u.name: u for u in bundle.units}
        self._active: str | None = None
        self._mapped: dict[str, np.ndarray] = {}
        for unit in bundle.units:
            for t in unit.state:
                key = f"{unit.name}/{t.name}"
                if key not in source:
                    raise BundleError(f"{where}: tensor '{key}' is missing")
                mm = np.lib.format.open_memmap(self._file(unit.name, t.name), mode="w+", dtype=t.dtype,
                                               shape=t.shape)
                if hasattr(source, "copy_into"):  # an archive: straight from the file, no heap copy
                    source.copy_into(key, mm)
                else:
                    mm[...] = source[key]
                t.check(mm, where)
                mm.flush()
                del mm

    def _file(self, unit: str, key: str) -> Path:
        return self.folder / f"{unit}.{key}.npy"

    def __getitem__(self, unit: str) -> dict[str, np.ndarray]:
        if unit not in self.units:
            raise KeyError(unit)
        if unit != self._active:
            self.release()
            self._mapped = {t.name: np.load(self._file(unit, t.name), mmap_mode="r+") for t in self.units[unit].state}
            self._active = unit
        return self._mapped

    def __setitem__(self, unit: str, tensors: Mapping[str, np.ndarray]) -> None:
        for key, target in self[unit].items():
            target[...] = tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.units)

    def __len__(self) -> int:
        return len(self.units)

    def release(self) -> None:
        """Write the mapped unit back and unmap it: its pages leave this process's RAM."""
        for mm in self._mapped.values():
            mm.flush()
        self._mapped, self._active = {}, None
