"""Unit state <-> Flower records. What travels: each unit's weights ("UNIT/param") and
BatchNorm running statistics ("UNIT/stats"); optimizer slots stay on the device."""
from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from edgeprop.bundle import STATS, Bundle

SHARED = ("param", STATS)  # the state buffers a fleet averages


def unit_of(key: str) -> str:
    return key.rsplit("/", 1)[0]


def shared_arrays(bundle: Bundle, state: dict, units: list[str] | None = None) -> dict[str, np.ndarray]:
    """{"UNIT/param": ..., "UNIT/stats": ...} of `units` (default: all) from a unit state."""
    names = [u.name for u in bundle.units] if units is None else units
    return {f"{n}/{k}": state[n][k] for n in names for k in SHARED if k in state[n]}


def shared_keys(bundle: Bundle) -> list[str]:
    """Every unit's shared buffers' names, in shared_arrays' order."""
    return [f"{u.name}/{k}" for u in bundle.units for k in SHARED if k in {t.name for t in u.state}]


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v, np.float32)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def check_arrays(bundle: Bundle, arrays: dict[str, np.ndarray], where: str) -> None:
    """Every key names a unit's shared buffer, with the manifest's shape and finite values."""
    from edgeprop.errors import BundleError
    tensors = {f"{u.name}/{t.name}": t for u in bundle.units for t in u.state if t.name in SHARED}
    for key, value in arrays.items():
        if key not in tensors:
            raise BundleError(f"{where}: '{key}' is not a unit's weights or statistics in this bundle")
        tensors[key].check(np.asarray(value), where)
