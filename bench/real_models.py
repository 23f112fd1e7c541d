"""Real models (exporters/zoo.py, torchvision's definitions) exported with every rule:
export time, SGD lock-step parity with torch, and a few training steps on onnxruntime.

    .venv/bin/python bench/real_models.py [MODEL ...] [--methods backprop,local,...] [--steps 3]

Inputs are 3×32×32 random images, 10 classes, batch 8 (parity needs no real data).
Writes bench/results/real_models.json (one entry per model and method, kept across runs).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from edgeprop.exporters import export, zoo
from edgeprop.exporters.validate import validate

RESULTS = Path(__file__).parent / "results" / "real_models.json"
# name -> (builder, where local's units start)
MODELS = {"mobilenet_v2_0.35": (lambda: zoo.create("mobilenet_v2", 10, width_mult=0.35),
                                ["features.7", "features.14", "classifier"]),
          "resnet18": (lambda: zoo.create("resnet18", 10), ["layer2", "layer3", "fc"]),
          "mobilenet_v3_small": (lambda: zoo.create("mobilenet_v3_small", 10),
                                 ["features.4", "features.9", "classifier"]),
          "squeezenet1_1": (lambda: zoo.create("squeezenet1_1", 10), ["features.6", "features.9", "classifier"]),
          # patch 8, dim 16, depth 1, 2 heads, MLP 32: the ViT design at its smallest
          "vit_tiny": (lambda: zoo.VisionTransformer(32, 8, 16, 1, 2, 32, 10), ["encoder.layers.0", "heads"])}
METHODS = {"backprop": {"rule": "backprop"}, "local": {"rule": "local"},
           "zeroth-order": {"rule": "zeroth-order"},
           "backprop+bias": {"rule": "backprop", "trainable": "bias"},
           "backprop+last:2": {"rule": "backprop", "trainable": "last:2"}}


def data(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 3, 32, 32), dtype=np.float32), np.arange(64) % 10
    path = folder / "rgb32.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:32], y_test=y[:32])
    return path


def run(name: str, method: str, folder: Path, steps: int) -> dict:
    build, blocks = MODELS[name]
    torch.manual_seed(0)
    model = build()
    kw = dict(METHODS[method])
    if kw["rule"] == "local":
        kw["blocks"] = blocks
    out = folder / f"{name}-{method}"
    t = time.perf_counter()
    export(model, out=out, data=str(folder / "rgb32.npz"), batch_size=8, optimizer="sgd", lr=0.01, force=True,
           progress=False, **kw)
    seconds = time.perf_counter() - t
    report = validate(out, data=str(folder / "rgb32.npz"), steps=steps, progress=False)
    lock = report["lockstep"]
    return {"model": name, "method": method, "export_s": round(seconds, 1), "ok": report["ok"],
            "lockstep_max_abs_diff": lock["max_abs_diff"], "lockstep_worst": lock["worst"],
            "lockstep_rms": lock["rms"], "free_running_rms": report["free_running"]["rms"], "steps": steps}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="*", default=list(MODELS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--folder", default="/tmp/edgeprop-real-models")
    a = p.parse_args()
    folder = Path(a.folder)
    folder.mkdir(parents=True, exist_ok=True)
    data(folder)
    RESULTS.parent.mkdir(exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in a.models:
        for method in a.methods.split(","):
            try:
                entry = run(name, method, folder, a.steps)
            except Exception as e:  # noqa: BLE001 - a model that does not export is a result too
                entry = {"model": name, "method": method, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            results[f"{name}/{method}"] = entry
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
            print(json.dumps(entry), flush=True)


if __name__ == "__main__":
    main()
