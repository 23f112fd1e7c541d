"""Export time with one torch.onnx export per graph (any_batch: traced once at the sentinel
batch, rewritten to B and B + 1) against the previous way (traced and exported at B and at
B + 1), in one process, on bench/real_models.py's models and inputs. Both bundles must hold
the same graphs (node for node) and the same memory facts.

    .venv/bin/python bench/export_speed.py [MODEL/METHOD ...]

CPU seconds (this process's, so other jobs on a shared machine count less) and wall seconds.
Writes bench/results/export_speed.json (entries kept across runs).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from unittest import mock

import onnx
import torch

sys.path.insert(0, str(Path(__file__).parent))
import real_models  # noqa: E402

from edgeprop.exporters import any_batch, bundle_export, export  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "export_speed.json"


def _export(name: str, method: str, folder: Path, out: Path) -> tuple[float, float]:
    build, blocks = real_models.MODELS[name]
    torch.manual_seed(0)
    kw = dict(real_models.METHODS[method])
    if kw["rule"] == "local":
        kw["blocks"] = blocks
    cpu, wall = time.process_time(), time.perf_counter()
    export(build(), out=out, data=str(folder / "rgb32.npz"), batch_size=8, optimizer="sgd", lr=0.01, force=True,
           progress=False, **kw)
    return time.process_time() - cpu, time.perf_counter() - wall


def _same_graphs(a: Path, b: Path) -> bool:
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    if ma["graphs"] != mb["graphs"]:  # files, inputs, outputs, memory facts
        return False
    for g in ma["graphs"].values():
        ga, gb = (onnx.load(str(p / g["file"])).graph for p in (a, b))
        if [n.op_type for n in ga.node] != [n.op_type for n in gb.node] or \
                [onnx.numpy_helper.to_array(t).tolist() for t in ga.initializer] != \
                [onnx.numpy_helper.to_array(t).tolist() for t in gb.initializer]:
            return False
    return True


def _old_way(*_args, **_kw):
    raise any_batch.NotBatchGeneric("measuring the export at B and B + 1")


def main() -> None:
    entries = sys.argv[1:] or ["mobilenet_v2_0.35/backprop+bias", "resnet18/backprop+last:2"]
    folder = Path("/tmp/edgeprop-export-speed")
    folder.mkdir(parents=True, exist_ok=True)
    real_models.data(folder)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for entry in entries:
        name, method = entry.split("/")
        with mock.patch.object(bundle_export, "sentinel_inputs", _old_way):
            before = _export(name, method, folder, folder / "before")
        after = _export(name, method, folder, folder / "after")
        results[entry] = {"before_cpu_s": round(before[0], 1), "after_cpu_s": round(after[0], 1),
                          "before_wall_s": round(before[1], 1), "after_wall_s": round(after[1], 1),
                          "cpu_ratio": round(before[0] / after[0], 2),
                          "same_graphs": _same_graphs(folder / "before", folder / "after")}
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        print(entry, json.dumps(results[entry]), flush=True)


if __name__ == "__main__":
    main()
