"""Fine-tuning a pretrained model on the device, torch-free: which method to pick.

MobileNetV2-0.35 (exporters/zoo.py, torchvision's definition) is pretrained here with torch
on Fashion-MNIST classes 0-4 (1000 images each, upsampled to 3×32×32), then fine-tuned on
all 10 classes from 100 new images per class, in a fresh process that never imports torch
(edgeprop's trainer on onnxruntime), with each method:

    backprop (every parameter), bias (TinyTL), bn (BatchNorm affine), last:2,
    auto for rpi-zero-2w and for a 256 KB-RAM microcontroller (the largest set whose plan
    fits; batch 1 there), local (units at features.7, features.14, classifier), zeroth-order

Reported per method: test accuracy (2000 Fashion-MNIST test images, all 10 classes),
planned working set (edgeprop.memory, onnxruntime, the bundle's batch) and measured
(profile.measure: 3 real steps per unit, resident bytes above runtime and data), trainable
parameters, fine-tuning samples/s (onnxruntime, 1 thread), export seconds.

    nice -n 10 .venv/bin/python bench/finetune.py [--methods bias,last:2,...] [--epochs 10]

Fashion-MNIST comes from Debian's dataset-fashion-mnist package. Writes
bench/results/finetune.json (entries kept across runs).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "finetune.json"
FASHION = Path("/usr/share/datasets/fashion-mnist")
WORK = Path("/tmp/edgeprop-finetune")
MCU = """name = "mcu-256k"
title = "a microcontroller with 256 KB of RAM and 16 MB of external flash"
kind = "mcu"
arch = "cortex-m7"
cores = 1
ram = "256 KiB"
flash = "16 MiB"
train_share = 1.0
float_formats = ["fp32"]
engines = ["tflm"]
"""
BLOCKS = ["features.7", "features.14", "classifier"]
# method -> export options (besides the pretrained model, data and batch size)
METHODS = {"backprop": {"rule": "backprop"},
           "bias": {"rule": "backprop", "trainable": "bias"},
           "bn": {"rule": "backprop", "trainable": "bn"},
           "last:2": {"rule": "backprop", "trainable": "last:2"},
           "auto rpi-zero-2w": {"rule": "backprop", "trainable": "auto", "device": "rpi-zero-2w"},
           "auto mcu-256k": {"rule": "backprop", "trainable": "auto", "device": str(WORK / "mcu-256k.toml"),
                             "batch_size": 1},
           "local": {"rule": "local", "blocks": BLOCKS},
           "zeroth-order": {"rule": "zeroth-order", "lr": 1e-4}}


def _images(x: np.ndarray) -> np.ndarray:
    """28×28 uint8 → 3×32×32 uint8 (bilinear; the grey channel three times)."""
    import torch
    from torch.nn import functional as F
    up = F.interpolate(torch.from_numpy(x).float()[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous().numpy()


def data(pretrain_per_class: int, finetune_per_class: int, test: int) -> tuple[dict, Path]:
    from edgeprop import datasets
    train, t10k = datasets.load(str(FASHION), "train"), datasets.load(str(FASHION), "test")
    pre = np.concatenate([np.flatnonzero(train.y == c)[:pretrain_per_class] for c in range(5)])
    fine = np.concatenate([np.flatnonzero(train.y == c)[pretrain_per_class:pretrain_per_class + finetune_per_class]
                           for c in range(10)])  # images pretraining never saw
    path, tmp = WORK / "fashion-finetune.npz", WORK / f".fashion-finetune.{os.getpid()}.npz"
    np.savez(tmp, x_train=_images(train.x[fine]), y_train=train.y[fine], x_test=_images(t10k.x[:test]),
             y_test=t10k.y[:test])
    os.replace(tmp, path)  # atomically: another run may be reading it
    return {"x": _images(train.x[pre]), "y": train.y[pre]}, path


def pretrain(pre: dict, norm: tuple[float, float], epochs: int):
    """MobileNetV2-0.35 with 10 outputs trained on classes 0-4, inputs normalised as the
    bundle will normalise them (the fine-tuning data's mean and std). Kept in WORK: a rerun
    fine-tunes the same model."""
    import torch

    from edgeprop.exporters import zoo
    torch.manual_seed(0)
    model = zoo.create("mobilenet_v2", 10, width_mult=0.35).train()
    x = (torch.from_numpy(pre["x"]).float() - norm[0]) / norm[1]
    y = torch.from_numpy(pre["y"])
    saved = WORK / f"pretrained-{epochs}.pt"
    if saved.exists():
        model.load_state_dict(torch.load(saved, weights_only=True))
        epochs = 0
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    torch.save(model.state_dict(), saved)
    with torch.no_grad():
        acc = float((model(x[:2000]).argmax(1) == y[:2000]).float().mean())
    return model, acc


# Run by the device side: a fresh process that must never import torch.
DEVICE_SIDE = r"""
import json, sys, time
from edgeprop import bundle as bundles, datasets, memory
from edgeprop.profile import measure
from edgeprop.runtimes import get_engine, memory_model
from edgeprop.trainer import TrainConfig, Trainer, evaluate
root, data, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
bundle, engine = bundles.load(root), get_engine("onnxruntime", threads=1)
train, test = datasets.load(data, "train"), datasets.load(data, "test")
plan = memory.plan(bundle, engine=memory_model("onnxruntime"), data_bytes=train.nbytes)
measured = measure(bundle, engine, train, TrainConfig(epochs=1), 3)
before = evaluate(bundle, engine, test, Trainer(bundle, engine, train, TrainConfig(epochs=1)).state)
trainer = Trainer(bundle, engine, train, TrainConfig(epochs=epochs, seed=0))
started = time.monotonic()
trainer.run(progress=False, checkpoints=False)
seconds = time.monotonic() - started
after = evaluate(bundle, engine, test, trainer.state)
assert "torch" not in sys.modules, "the device side imported torch"
print(json.dumps({"accuracy_before": before["accuracy"], "accuracy": after["accuracy"],
                  "planned_working_set": plan.working_set, "measured_working_set": measured["working_set"],
                  "samples_per_s": round(epochs * len(train) / seconds, 1), "train_seconds": round(seconds, 1),
                  "epochs": epochs, "batch_size": bundle.batch_size}))
"""


def trainable_parameters(root: Path) -> int:
    from edgeprop import bundle as bundles
    b = bundles.load(root)
    return int(sum(u.n_params for u in b.units))


def _save(method: str, entry: dict) -> None:
    """Add one method's entry to RESULTS, re-read first: runs for other methods may write too."""
    RESULTS.parent.mkdir(exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[method] = entry
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(method, json.dumps(entry), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs on the device side")
    p.add_argument("--pretrain-epochs", type=int, default=4)
    a = p.parse_args()
    if not FASHION.is_dir():
        sys.exit(f"{FASHION}: not found (apt-get install dataset-fashion-mnist)")
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "mcu-256k.toml").write_text(MCU)
    from edgeprop import datasets
    from edgeprop.exporters import export
    pre, path = data(1000, 100, 2000)
    fine = datasets.load(str(path), "train")
    norm = (float(fine.x.mean(dtype=np.float64)), float(fine.x.std(dtype=np.float64)))
    t = time.perf_counter()
    model, pre_acc = pretrain(pre, norm, a.pretrain_epochs)
    print(f"pretrained on classes 0-4 in {time.perf_counter() - t:.0f} s: {pre_acc:.3f} on its training images",
          flush=True)
    results = {}
    for method in a.methods.split(","):
        kw = {"batch_size": 32, **METHODS[method]}
        out = WORK / method.replace(" ", "-").replace(":", "")
        t = time.perf_counter()
        try:
            export(model, out=out, data=str(path), force=True, progress=False, **kw)
        except Exception as e:  # noqa: BLE001 - a method that does not export is a result too
            results[method] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            _save(method, results[method])
            continue
        export_s = time.perf_counter() - t
        proc = subprocess.run([sys.executable, "-c", DEVICE_SIDE, str(out), str(path), str(a.epochs)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            results[method] = {"error": proc.stderr.strip()[-400:]}
        else:
            manifest = json.loads((out / "manifest.json").read_text())
            auto = manifest["model"].get("trainable_auto")
            results[method] = {**json.loads(proc.stdout.strip().splitlines()[-1]),
                               "trainable_parameters": trainable_parameters(out), "export_s": round(export_s, 1),
                               "pretrain_accuracy": pre_acc, **({"auto": auto["message"]} if auto else {})}
        _save(method, results[method])


if __name__ == "__main__":
    main()
