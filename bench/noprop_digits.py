"""NoProp-DT on digits: accuracy, training throughput and peak memory, runtime vs torch.

    python bench/noprop_digits.py [--epochs 40] [--out bench/results/noprop_digits.json]

Every measurement runs in its own fresh process, so peak RSS is that process's own: the
runtime's process never imports torch, which is the footprint a device would see.
  accuracy     NoProp-DT trained by the runtime (onnxruntime) vs a back-prop MLP of the same
               width and depth trained in torch for the same epochs, same data and batch
  throughput   training samples/s (one sample = one pass through every block and the head,
               interleaved) of the runtime vs the torch reference, 1 thread each, at batch
               1, 32 and 128
Each throughput figure is the median of --rounds alternating runs.
Targets to report against (not asserted): accuracy no worse than back-prop; runtime
throughput >= 3x torch at batch 32 and >= 10x at batch 1.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import common  # bench/common.py: the script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    fork+exec, so a child would report its parent's peak), across the trainer's resets."""
    from edgeprop import rss
    return rss.process_peak() / 2**20


# ---- workers (each runs in a fresh process) ---------------------------------------------------

def worker_runtime_accuracy(bundle: str, epochs: int) -> dict:
    from edgeprop import bundle as bundles
    from edgeprop import datasets
    from edgeprop.runtimes import get_engine
    from edgeprop.trainer import TrainConfig, Trainer, evaluate
    b, engine = bundles.load(bundle), get_engine("onnxruntime", threads=1)
    trainer = Trainer(b, engine, datasets.load("digits", "train"), TrainConfig(epochs=epochs))
    t0 = time.perf_counter()
    trainer.run(progress=False, checkpoints=False)
    seconds = time.perf_counter() - t0
    report = evaluate(b, engine, datasets.load("digits", "test"), trainer.state, runs=5)
    return {"accuracy": report["accuracy"], "accuracy_runs": report["accuracy_runs"],
            "per_block_accuracy": report["per_unit_accuracy"], "train_seconds": seconds,
            "torch_imported": "torch" in sys.modules, "peak_rss_mb": peak_rss_mb()}


def worker_backprop_accuracy(epochs: int, batch: int, width: int) -> dict:
    import numpy as np
    import torch
    from torch import nn

    from edgeprop import datasets
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train, test = datasets.load("digits", "train"), datasets.load("digits", "test")
    mean, std = np.float32(train.x.mean()), np.float32(train.x.std())
    x, y = torch.from_numpy((train.x - mean) / std), torch.from_numpy(train.y)
    # Same width and depth as one NoProp block's image path plus its joint layers.
    model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-3)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.from_numpy(np.random.default_rng([0, epoch]).permutation(len(y)))
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        pred = model(torch.from_numpy((test.x - mean) / std)).argmax(1).numpy()
    return {"accuracy": float((pred == test.y).mean()), "train_seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def worker_throughput(bundle: str, which: str, seconds: float) -> dict:
    from edgeprop import bundle as bundles
    from edgeprop import datasets
    from edgeprop.trainer import TrainConfig
    b, data = bundles.load(bundle), datasets.load("digits", "train")
    config = TrainConfig(epochs=1000)
    if which == "runtime":
        from edgeprop.runtimes import get_engine
        from edgeprop.trainer import Trainer
        trainer = Trainer(b, get_engine("onnxruntime", threads=1), data, config)
    else:
        import torch
        torch.set_num_threads(1)
        from edgeprop.exporters.reference import TorchReference
        trainer = TorchReference(b, data, config, "cpu")
    units = len(b.units)
    for i in range(2 * units):  # warm-up: sessions built, caches warm
        trainer.step(i)
    i, t0 = 2 * units, time.perf_counter()
    while time.perf_counter() - t0 < seconds or (i // units) < 3:
        for _ in range(units):  # whole batches: every block and the head
            trainer.step(i)
            i += 1
    elapsed = time.perf_counter() - t0
    batches = (i - 2 * units) // units
    return {"samples_per_s": batches * b.batch_size / elapsed, "batches": batches, "seconds": elapsed,
            "torch_imported": "torch" in sys.modules, "peak_rss_mb": peak_rss_mb()}


# ---- driver ---------------------------------------------------------------------------------


def spawn(*args) -> dict:
    return common.spawn(__file__, *args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seconds", type=float, default=4.0, help="timing window per throughput measurement")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per batch size (median kept)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "noprop_digits.json"))
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        fn = {"runtime-accuracy": lambda b, e: worker_runtime_accuracy(b, int(e)),
              "backprop-accuracy": lambda e, b, w: worker_backprop_accuracy(int(e), int(b), int(w)),
              "throughput": lambda b, w, s: worker_throughput(b, w, float(s))}[kind]
        print(json.dumps(fn(*rest)))
        return

    from edgeprop.exporters import export
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpus": os.cpu_count()}, "epochs": args.epochs}
    with tempfile.TemporaryDirectory() as tmp:
        bundles = {b: str(export(Path(tmp) / f"b{b}", batch_size=b, progress=False)) for b in (1, 32, 64, 128)}
        print(f"accuracy: {args.epochs} epochs, batch 64 ...", file=sys.stderr)
        nop = spawn("runtime-accuracy", bundles[64], args.epochs)
        bp = spawn("backprop-accuracy", args.epochs, 64, 128)
        results["accuracy"] = {"noprop_dt_runtime": nop, "backprop_mlp_torch": bp,
                               "noprop_minus_backprop": nop["accuracy"] - bp["accuracy"]}
        results["throughput"] = {}
        for batch in (1, 32, 128):
            # Alternate the two sides over several rounds and keep each side's median, so a
            # load change on the machine does not land on one side only.
            runs = {"runtime": [], "torch": []}
            for r in range(args.rounds):
                print(f"throughput: batch {batch}, round {r + 1}/{args.rounds} ...", file=sys.stderr)
                for side in runs:
                    runs[side].append(spawn("throughput", bundles[batch], side, args.seconds))
            median = {side: sorted(rs, key=lambda x: x["samples_per_s"])[len(rs) // 2] for side, rs in runs.items()}
            results["throughput"][f"batch{batch}"] = {
                "runtime": median["runtime"], "torch_reference": median["torch"],
                "runtime_rounds": [x["samples_per_s"] for x in runs["runtime"]],
                "torch_rounds": [x["samples_per_s"] for x in runs["torch"]],
                "speedup": median["runtime"]["samples_per_s"] / median["torch"]["samples_per_s"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({"accuracy_noprop": nop["accuracy"], "accuracy_backprop": bp["accuracy"],
                      **{k: round(v["speedup"], 2) for k, v in results["throughput"].items()}}))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
