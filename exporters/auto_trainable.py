"""`--trainable auto --device D`: the largest trainable set whose memory plan fits the device.

Candidates grow from the output backwards, as the fine-tuning literature orders them: the
biases of the last 1, 2, 4, ... layers that have one, then every bias and the whole last 1,
2, 4, ... layers (doubling keeps the exports few: a plan needs an exported bundle). Memory
grows along the list, so a binary search exports about 2 + log2(len) candidates. Each is
planned by the device-side planner (edgeprop.memory) exactly as `edgeprop profile --device`
would plan it, with the training data held in memory.
"""
from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from edgeprop import memory
from edgeprop.bundle import load as load_bundle
from edgeprop.errors import EdgepropError
from edgeprop.runtimes import memory_model
from edgeprop.sizes import format_size as fmt
from edgeprop.storage import new_folder

from .capture import execution_order


def _doubling(n: int) -> list[int]:
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return out + [n]


def _last(k: int) -> str:
    return "the last layer" if k == 1 else f"the last {k} layers"


def candidates(model: nn.Module, shape: list[int]) -> list[tuple[str, list[str]]]:
    """(description, parameter names) from the smallest set to every parameter."""
    order = execution_order(copy.deepcopy(model).eval(), torch.zeros(2, *shape))
    layers = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in order))[::-1]  # from the output back
    params = {layer: [n for n in order if n.rsplit(".", 1)[0] == layer] for layer in layers}
    biased = [layer for layer in layers if f"{layer}.bias" in params[layer]]
    out = [(f"the bias of {_last(k)} with one" if k == 1 else f"the biases of {_last(k)} with one",
            [f"{layer}.bias" for layer in biased[:k]]) for k in _doubling(len(biased))]
    biases = [f"{layer}.bias" for layer in biased]
    for k in _doubling(len(layers)):
        whole = [n for layer in layers[:k] for n in params[layer]]
        names = [n for n in order if n in set(whole) | set(biases)]
        what = "every parameter" if k == len(layers) else f"{_last(k)} whole" + (" and every bias" if biases else "")
        out.append((what, names))
    return out


def _plan_need(bundle_path: Path, device, data_bytes: int) -> tuple[bool, int, int, list[str]]:
    bundle = load_bundle(bundle_path)
    engine = "onnxruntime" if "onnxruntime" in device.engines else device.engines[0]
    p = memory.plan(bundle, None, device.kind == "mcu", engine=memory_model(engine), data_bytes=data_bytes)
    v = memory.check(p, None, device)
    return v.fits, v.need, v.budget, v.problems


def export_auto(export_with, model: nn.Module, shape: list[int], device, data_bytes: int, out: Path) -> dict:
    """Export the largest candidate that fits `device` to `out`; `export_with(names, folder)`
    exports one candidate. Returns what was chosen (for the manifest and the user)."""
    options = candidates(model, shape)
    work = Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.auto.", dir=Path(out).parent))
    tried: dict[int, tuple[bool, int, int, list[str]]] = {}

    def fits(i: int) -> bool:
        if i not in tried:
            folder = work / f"candidate{i}"
            export_with(options[i][1], folder)
            tried[i] = _plan_need(folder, device, data_bytes)
        return tried[i][0]

    try:
        if not fits(0):
            raise EdgepropError(f"--trainable auto: even {options[0][0]} alone does not fit {device.name}: "
                                f"{'; '.join(tried[0][3])}; choose a larger device or a smaller batch size")
        lo, hi = 0, len(options) - 1
        if fits(hi):
            lo = hi
        while hi - lo > 1:  # fits(lo), not fits(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        with new_folder(Path(out)) as tmp:
            shutil.copytree(work / f"candidate{lo}", tmp, dirs_exist_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    what, names = options[lo]
    _, need, budget, _ = tried[lo]
    sizes = dict(model.named_parameters())
    count = sum(sizes[n].numel() for n in names)
    larger = f"; the next larger set needs {fmt(tried[hi][1])}" if hi != lo and hi in tried else ""
    message = (f"--trainable auto on {device.name}: {what} ({count:,} parameters); the plan needs {fmt(need)} of "
               f"{fmt(budget)}{larger}")
    return {"device": device.name, "chose": what, "parameters": names, "trainable_parameters": count, "need": need,
            "budget": budget, "message": message}
