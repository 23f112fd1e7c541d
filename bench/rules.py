"""Every learning rule side by side on the same engine: accuracy, speed, memory.

    python bench/rules.py [--data digits,fashion,PATH] [--rules noprop-dt,local,...] [--epochs-scale 1.0]
                          [--out bench/results/rules.json]

For each data set and rule: export on the desktop (torch), then train and evaluate in a
fresh process that never imports torch (onnxruntime, one thread), as a device would:
  accuracy       test accuracy of the rule's own prediction (NoProp: mean of 3 stochastic runs)
  throughput     training samples/s; one sample = one pass through every unit
  working_set    measured peak resident bytes above the loaded runtime, graphs and data
  process_peak   the training process's peak resident set
The `backprop` row is end-to-end back-prop of the same MLP (width 128, 2 hidden layers)
compiled to one step graph the same way: the reference the other rows are read against.
Fashion-MNIST comes from Debian's dataset-fashion-mnist package; without it those rows
are skipped with a message. PATH: your own data (an .npz or an IDX folder, as `--data`
takes), 10 epochs per rule unless scaled.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # bench/common.py: the script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
DATA = {"digits": "digits", "fashion": str(FASHION)}
EPOCHS = {"digits": 30, "fashion": 5}  # per rule below as multiples
# rule -> (export options, epochs multiplier, note)
RULES = {
    "backprop": ({"width": 128}, 1, "reference: end-to-end back-prop of the MLP"),
    "noprop-dt": ({"width": 128}, 1, "10 blocks of the paper's MLP block + linear head"),
    "local": ({"width": 128}, 1, "every layer a block with a linear auxiliary head"),
    "mono-forward": ({"width": 128}, 1, "every hidden layer with a projection to class scores"),
    "forward-forward": ({"width": 128}, 2, "goodness over all 10 labels"),
    "zeroth-order": ({"width": 128, "lr": 1e-4}, 1, "SPSA/MeZO on the inference graph alone, fine-tuning "
                     "the backprop MLP after its first epoch (accuracy_start); lr 1e-4: the default "
                     "1e-3 diverged within 5 Fashion-MNIST epochs"),
    "noprop-ct": ({"width": 128}, 1, "one network taking t, learned schedule"),
    "noprop-fm": ({"width": 128}, 1, "one network taking t, flow matching"),
}


def worker_train(bundle: str, data: str, epochs: int, seed: int = 0) -> dict:
    from edgeprop import bundle as bundles
    from edgeprop import datasets, rss
    from edgeprop.runtimes import get_engine
    from edgeprop.trainer import TrainConfig, Trainer, evaluate
    b, engine = bundles.load(bundle), get_engine("onnxruntime", threads=1)
    train = datasets.load(data, "train")
    trainer = Trainer(b, engine, train, TrainConfig(epochs=epochs, seed=seed))
    t0 = time.perf_counter()
    trainer.run(progress=False)  # the checkpoint is what a zeroth-order row starts from
    seconds = time.perf_counter() - t0
    working_set = trainer.working_set()
    report = evaluate(b, engine, datasets.load(data, "test"), trainer.state, seed=seed, runs=3)
    return {"accuracy": report["accuracy"], "accuracy_runs": report["accuracy_runs"],
            "per_unit_accuracy": report.get("per_unit_accuracy"),
            **{k: v for k, v in report.items() if k.startswith("accuracy_") and k != "accuracy_runs"},
            "epochs": epochs, "train_seconds": seconds, "throughput": len(train) * epochs / seconds,
            "working_set": working_set, "process_peak": rss.process_peak(),
            "torch_imported": "torch" in sys.modules}


def worker_export(rule: str, data: str, out: str, options: str) -> dict:
    from edgeprop.exporters import export
    t0 = time.perf_counter()
    export(out, rule=rule, data=data, progress=False, force=True, **json.loads(options))
    return {"export_seconds": time.perf_counter() - t0}


def measure(rule: str, data: str, options: dict, note: str, epochs: int, seed: int = 0) -> dict:
    source = DATA.get(data, data)  # a named data set, or the user's own path
    with tempfile.TemporaryDirectory() as tmp:
        bundle, extra = str(Path(tmp) / rule), {}
        if rule == "zeroth-order":  # fine-tuning: start from one epoch of back-prop
            start = str(Path(tmp) / "start")
            common.spawn(__file__, "export", "backprop", source, start, json.dumps({"width": options["width"]}))
            extra["accuracy_start"] = common.spawn(__file__, "train", start, source, 1)["accuracy"]
            options = {**options, "init": start}
        exported = common.spawn(__file__, "export", rule, source, bundle, json.dumps(options))
        return {"data": data, "rule": rule, "note": note, "options": options, **exported, **extra,
                **common.spawn(__file__, "train", bundle, source, epochs, seed)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits,fashion")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--epochs-scale", type=float, default=1.0, help="scale every epoch count (quick runs)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "rules.json"))
    p.add_argument("--worker", nargs="+")
    args = p.parse_args()
    if args.worker:
        name, *rest = args.worker
        result = worker_train(rest[0], rest[1], *map(int, rest[2:])) if name == "train" else worker_export(*rest)
        print(json.dumps(result))
        return 0

    from edgeprop.rules import RULES as AVAILABLE
    rows, skipped = [], []
    for data in args.data.split(","):
        if data == "fashion" and not FASHION.is_dir():
            skipped.append(f"fashion: {FASHION} not found (apt install dataset-fashion-mnist)")
            print(f"skip: {skipped[-1]}", file=sys.stderr)
            continue
        for rule in args.rules.split(","):
            if rule not in AVAILABLE:
                skipped.append(f"{rule}: not a rule this edgeprop has")
                print(f"skip: {skipped[-1]}", file=sys.stderr)
                continue
            options, scale, note = RULES[rule]
            epochs = max(1, round(EPOCHS.get(data, 10) * scale * args.epochs_scale))
            try:
                row = measure(rule, data, options, note, epochs)
            except subprocess.CalledProcessError as e:  # a rule that fails here is a result too
                rows.append({"data": data, "rule": rule, "note": note, "epochs": epochs,
                             "error": e.stderr.strip().splitlines()[-1]})
                print(f"{data:8s} {rule:16s} FAILED: {rows[-1]['error']}", flush=True)
                continue
            rows.append(row)
            start = f", from {row['accuracy_start']:.4f}" if "accuracy_start" in row else ""
            print(f"{data:8s} {rule:16s} acc {row['accuracy']:.4f}{start}  {row['throughput']:8.0f} samples/s  "
                  f"working set {row['working_set'] / 2**20:6.1f} MiB  peak {row['process_peak'] / 2**20:6.1f} MiB  "
                  f"({epochs} epochs, {row['train_seconds']:.0f} s)", flush=True)
    for data in {r["data"] for r in rows}:
        ref = next((r for r in rows if r["data"] == data and r["rule"] == "backprop" and "error" not in r), None)
        for r in (r for r in rows if r["data"] == data and ref and "error" not in r):
            r["accuracy_vs_backprop_pp"] = round(100 * (r["accuracy"] - ref["accuracy"]), 2)
            r["working_set_vs_backprop"] = r["working_set"] / ref["working_set"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                               "rows": rows, "skipped": skipped}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
