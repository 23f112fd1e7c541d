"""NoProp-DT's inference chains on Fashion-MNIST: the mean chain (τ 0, edgeprop's default)
vs the paper's sampled chain (τ 1) vs end-to-end back-prop of an MLP, at equal epochs.

    python bench/noprop_fashion.py [--train-samples 10000] [--epochs 10] [--seeds 0,1,2] [--runs 5]
                                   [--model mlp|cnn|cnn-bn] [--embedding one-hot]
                                   [--out bench/results/noprop_fashion.json]

For each seed: `edgeprop export --rule noprop-dt --model mlp` (10 blocks of width 128, batch
128) and `--rule backprop --width 128 --depth 2` (batch 64), both trained by the runtime
(onnxruntime, one thread, a fresh process each) on the first N training images, tested on
all 10,000 test images. `--model cnn` (or `cnn-bn`, with BatchNorm) compares the paper's CNN
blocks with a back-prop CNN of the same image path. `--embedding learned|prototype` exports
NoProp-DT with the paper's learned label embeddings instead of the fixed one-hot one.
Reported per seed and as mean and spread: the mean chain's accuracy,
the sampled chain's, block 1's mean probability of the true class (the sampled chain's
accuracy with ideal blocks), per-block accuracy along both chains, back-prop's accuracy,
wall time. Issue 15's part 5 (full data, 10/40/100 epochs, the CNN) is a larger budget of
the same measurement. Fashion-MNIST comes from Debian's dataset-fashion-mnist package.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import common  # bench/common.py: the script's folder is on sys.path
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def export_options(rule: str, model: str, embedding: str) -> dict:
    """What `export` gets for this rule and model ("mlp", "cnn" or "cnn-bn": with BatchNorm)."""
    if rule == "noprop-dt" and model == "mlp":
        return {"model": "mlp", "width": 128, "embedding": embedding}
    if rule == "noprop-dt":
        return {"model": "cnn", "embedding": embedding, "batchnorm": model == "cnn-bn"}
    if model == "mlp":
        return {"model": "mlp", "width": 128, "depth": 2}
    import torch
    return {"model": common.backprop_cnn(), "example_input": torch.zeros(1, 1, 28, 28)}


def worker(rule: str, model: str, data: str, epochs: int, seed: int, runs: int, out: str, embedding: str) -> dict:
    """Export (torch), then train and evaluate with the runtime, in this fresh process."""
    import torch

    from edgeprop import bundle as bundles
    from edgeprop import datasets
    from edgeprop.exporters import export
    from edgeprop.runtimes import get_engine
    from edgeprop.trainer import TrainConfig, Trainer, evaluate
    torch.manual_seed(seed)  # the back-prop CNN's initial weights
    root = export(Path(out) / f"{rule}-{model}-{seed}", rule=rule, data=data, seed=seed, progress=False,
                  force=True, **export_options(rule, model, embedding))
    bundle, engine = bundles.load(root), get_engine("onnxruntime", threads=1)
    trainer = Trainer(bundle, engine, datasets.load(data, "train"), TrainConfig(epochs=epochs, seed=seed))
    started = time.monotonic()
    trainer.run(progress=False, checkpoints=False)
    seconds = time.monotonic() - started
    report = evaluate(bundle, engine, datasets.load(data, "test"), trainer.state, runs=runs)
    return {**{k: v for k, v in report.items() if k != "accuracy_runs"}, "train_seconds": round(seconds, 1),
            "batch_size": bundle.batch_size}


def spread(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-samples", type=int, default=10000, help="the first N training images (0: all 60,000)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--runs", type=int, default=5, help="inference runs averaged per chain")
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn", "cnn-bn"],
                   help="NoProp-DT's MLP blocks, or the paper's CNN blocks (cnn-bn: with its BatchNorm layers); "
                        "back-prop trains the same-size MLP or the CNN's image path and joint head")
    p.add_argument("--embedding", default="one-hot", choices=["one-hot", "orthogonal", "learned", "prototype"],
                   help="NoProp-DT's label embedding")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "noprop_fashion.json"))
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        rule, model, data, epochs, seed, runs, out, embedding = args.worker
        print(json.dumps(worker(rule, model, data, int(epochs), int(seed), int(runs), out, embedding)))
        return
    if not FASHION.is_dir():
        sys.exit(f"{FASHION}: not found (apt-get install dataset-fashion-mnist)")
    from edgeprop import datasets
    work = Path(tempfile.mkdtemp(prefix="bench-fashion."))
    data = str(FASHION)
    if args.train_samples:
        train, test = datasets.load(data, "train"), datasets.load(data, "test")
        data = str(work / "fashion.npz")
        np.savez(data, x_train=train.x[:args.train_samples], y_train=train.y[:args.train_samples],
                 x_test=test.x, y_test=test.y)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for seed in seeds:
        print(f"seed {seed}: noprop-dt, backprop ...", file=sys.stderr)
        nop = common.spawn(__file__, "noprop-dt", args.model, data, args.epochs, seed, args.runs, work, args.embedding)
        bp = common.spawn(__file__, "backprop", args.model.split("-")[0], data, args.epochs, seed, 1, work,
                          args.embedding)
        rows.append({"seed": seed, "noprop_dt": nop, "backprop": bp})
    summary = {
        "mean_chain": spread([r["noprop_dt"]["accuracy_mean"] for r in rows]),
        "sampled_chain": spread([r["noprop_dt"]["accuracy_sampled"] for r in rows]),
        "block1_true_class_probability": spread([r["noprop_dt"]["block1_true_class_probability"] for r in rows]),
        "backprop": spread([r["backprop"]["accuracy"] for r in rows]),
        "per_block_mean_chain": np.mean([r["noprop_dt"]["per_unit_accuracy_mean"] for r in rows], 0).round(4).tolist(),
        "per_block_sampled_chain": np.mean([r["noprop_dt"]["per_unit_accuracy_sampled"] for r in rows],
                                           0).round(4).tolist(),
    }
    result = {"date": time.strftime("%Y-%m-%d"), "train_samples": args.train_samples or 60000, "test_samples": 10000,
              "epochs": args.epochs, "seeds": seeds, "model": args.model, "embedding": args.embedding,
              "inference_runs": args.runs, "summary": summary, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
