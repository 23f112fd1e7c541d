"""The same NoProp-DT training on every engine: throughput and peak memory, one thread.

    python bench/engines.py [--seconds 4] [--rounds 3] [--out bench/results/engines.json]

One bundle per batch size (1 and 32; the digits MLP, 10 blocks of width 128 and a head),
exported with its .tflite twins, trained by:
  onnxruntime    edgeprop's default engine (.venv)
  litert         ai_edge_litert, in its own environment without onnxruntime or torch
                 (.venvs/litert, built by scripts/engine-venv.sh)
  ort-training   ONNX Runtime's training API on the bundle's per-block artifacts
                 (.venvs/ort-training)
  native         the graphs compiled to C and built on this host (OpenBLAS products,
                 fused optimizer loop), .venv
  binary         no Python at all: `deploy --target native` for this host (-march=native,
                 Debian's OpenBLAS where installed), its ./train timing its own loop and
                 reporting its peak RSS as VmHWM from /proc/self/status
  onnxruntime-fused, native-fused
                 the same engines running the bundle's fused step graph (export --fused-step,
                 train --fused-step): every unit of a batch in one call instead of one each
  torch          the eager torch reference (nn.Module + autograd + torch.optim): what a
                 user would otherwise run
and ONNX Runtime's training API running end-to-end back-prop of an MLP of the same width
and depth as one block (`--rule backprop`): the anchor a user of that API would pick.
Each figure: training samples/s (one sample = one pass through every unit), the median of
--rounds alternating runs, and that run's process peak RSS (VmHWM; `rss_vs_torch` the ratio
to torch's). Every run is a fresh process.
Targets to report against (not asserted): the fastest engine >= 3x torch at batch 32 and
>= 10x at batch 1, and >= 50% of the practical limit at batch 32: each step's matrix products
timed with OpenBLAS at their own shapes plus one fused AdamW pass over each unit's state,
measured in the same run (bench/limit.py); every engine's `share_of_limit` is its rate per
CPU second over it (the limit's short timings are rarely preempted; a shared machine's wall
clock would count the others' time against the engines only).

--fashion-cnn N,E adds the image comparison: NoProp-DT with the paper's CNN blocks (10
blocks, width 256, dropout 0.2) vs the same CNN trained end to end by back-prop (its image
path and joint head as one Sequential, `--rule backprop`), both on onnxruntime, batch 64,
E epochs on the first N Fashion-MNIST training images, tested on all 10,000 test images
(Debian's dataset-fashion-mnist). Target: NoProp-DT within 0.5 points of back-prop. One
full-data epoch of the ten 28x28 CNN blocks takes about half an hour on a 2-core VM.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # bench/common.py: the script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
BATCHES = (1, 32)
# engine -> the environment it runs in (an engine venv is built on first use)
PYTHON = {"onnxruntime": sys.executable, "torch": sys.executable, "native": sys.executable, "litert": "litert",
          "ort-training": "ort-training", "onnxruntime-fused": sys.executable, "native-fused": sys.executable}
FUSED = "-fused"  # an engine name's suffix: train with the fused step graph


def worker_throughput(bundle: str, which: str, seconds: float) -> dict:
    from edgeprop import bundle as bundles
    from edgeprop import datasets, rss
    from edgeprop.trainer import TrainConfig
    b, data = bundles.load(bundle), datasets.load("digits", "train")
    fused = which.endswith(FUSED)
    which = which.removesuffix(FUSED)
    config = TrainConfig(epochs=1000, fused=fused)
    if which == "torch":
        import torch
        torch.set_num_threads(1)
        from edgeprop.exporters.reference import TorchReference
        trainer = TorchReference(b, data, config, "cpu")
    else:
        from edgeprop.runtimes import get_engine
        from edgeprop.trainer import Trainer
        trainer = Trainer(b, get_engine(which, threads=1), data, config)
    units = len(b.units)

    def batch(i: int) -> None:  # work items i .. i+units-1: every unit once
        if fused:
            trainer.fused_step(i)
        else:
            for k in range(units):
                trainer.step(i + k)

    for i in range(0, 2 * units, units):  # warm-up: graphs loaded, caches warm
        batch(i)
    i, t0, c0 = 2 * units, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds or (i // units) < 3:
        batch(i)
        i += units
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    batches = (i - 2 * units) // units
    # Per CPU second too: on a shared machine the wall clock counts the time others had the core.
    return {"samples_per_s": batches * b.batch_size / elapsed, "batches": batches, "seconds": elapsed,
            "samples_per_cpu_s": batches * b.batch_size / cpu,
            "torch_imported": "torch" in sys.modules, "onnxruntime_imported": "onnxruntime" in sys.modules,
            "peak_rss_mb": rss.process_peak() / 2**20}


def build_binary(bundle: str, folder: Path) -> dict:
    """`deploy --target native` for this host, built with make; a short run calibrates its rate."""
    from edgeprop import bundle as bundles
    from edgeprop.device_profile import Profile
    from edgeprop.targets import native
    host = Profile(name="host", title="this host", kind="linux", arch=platform.machine(), cores=os.cpu_count() or 1,
                   ram=1 << 34, flash=1 << 34, train_share=1.0, float_formats=("fp32",), engines=("native",),
                   cflags="-march=native")
    b = bundles.load(bundle)
    native.write_folder(b, host, folder, data="digits", epochs=100_000, seed=0)
    make = subprocess.run(["make", "-s", "-j2"], cwd=folder, capture_output=True, text=True, check=True)
    calibration = run_binary(folder, steps=20 * len(b.units))
    return {"units": len(b.units), "batch": b.batch_size, "rate": calibration["samples_per_s"],
            "blas": "no OpenBLAS" not in make.stdout + make.stderr}


def run_binary(folder: Path, steps: int) -> dict:
    """One fresh ./train of `steps` work items from the initial state (one OpenBLAS thread)."""
    (folder / "checkpoint.bin").unlink(missing_ok=True)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run(["./train", "--steps", str(steps)], cwd=folder, capture_output=True, text=True, env=env,
                         check=True).stdout.split("\n")
    wall, cpu = (float(v) for v in next(line for line in out if line.startswith("ep samples-per-s")).split()[2:])
    kb = int(next(line for line in out if line.startswith("ep peak-rss-kb")).split()[2])
    return {"samples_per_s": wall, "samples_per_cpu_s": cpu, "peak_rss_mb": kb / 1024, "steps": steps}


def median(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda run: run["samples_per_s"])[len(runs) // 2]


def worker_train_eval(bundle: str, data: str, epochs: int) -> dict:
    from edgeprop import bundle as bundles
    from edgeprop import datasets
    from edgeprop.runtimes import get_engine
    from edgeprop.trainer import TrainConfig, Trainer, evaluate
    b, engine = bundles.load(bundle), get_engine("onnxruntime", threads=1)
    trainer = Trainer(b, engine, datasets.load(data, "train"), TrainConfig(epochs=epochs))
    t0 = time.perf_counter()
    trainer.run(progress=False, checkpoints=False)
    seconds = time.perf_counter() - t0
    report = evaluate(b, engine, datasets.load(data, "test"), trainer.state, runs=3 if b.rule == "noprop-dt" else 1)
    return {"accuracy": report["accuracy"], "per_unit_accuracy": report.get("per_unit_accuracy"),
            "train_seconds": seconds}


def fashion_cnn(n_train: int, epochs: int, tmp: Path) -> dict:
    """NoProp-DT CNN vs the same CNN by back-prop on the first n_train Fashion-MNIST images."""
    import numpy as np
    import torch

    from edgeprop import datasets
    from edgeprop.exporters import export
    train, test = datasets.load(str(FASHION), "train"), datasets.load(str(FASHION), "test")
    data = tmp / "fashion.npz"
    np.savez(data, x_train=train.x[:n_train], y_train=train.y[:n_train], x_test=test.x, y_test=test.y)
    cnn = common.backprop_cnn()  # the NoProp-DT CNN block without its label path
    rows = {}
    for name, options in (("backprop", {"rule": "backprop", "model": cnn, "example_input": torch.zeros(1, 1, 28, 28)}),
                          ("noprop_dt", {"rule": "noprop-dt", "model": "cnn"})):
        print(f"fashion cnn: {name}, {n_train} images, {epochs} epochs ...", file=sys.stderr)
        bundle = export(out=tmp / name, data=str(data), batch_size=64, progress=False, **options)
        rows[name] = spawn("onnxruntime", "train-eval", bundle, data, epochs)
    rows.update(n_train=n_train, n_test=len(test), epochs=epochs,
                noprop_minus_backprop_pp=round(100 * (rows["noprop_dt"]["accuracy"] - rows["backprop"]["accuracy"]), 2))
    return rows


def engine_python(engine: str) -> str:
    where = PYTHON[engine]
    if where == sys.executable:
        return where
    subprocess.run([str(ROOT / "scripts" / "engine-venv.sh"), where], check=True)
    return str(ROOT / ".venvs" / where / "bin" / "python")


def spawn(engine: str, *args) -> dict:
    return common.spawn(__file__, *args, python=engine_python(engine))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=4.0, help="timing window per measurement")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per batch size (median kept)")
    p.add_argument("--engines", default="onnxruntime,litert,ort-training,native,binary,torch")
    p.add_argument("--fashion-cnn", default=None, metavar="N,E",
                   help="also compare NoProp-DT and back-prop CNNs: N Fashion-MNIST training images, E epochs")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "engines.json"))
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        if args.worker[0] == "limit":
            from limit import practical_limit
            print(json.dumps(practical_limit(args.worker[1])))
        elif args.worker[0] == "train-eval":
            _, bundle, data, epochs = args.worker
            print(json.dumps(worker_train_eval(bundle, data, int(epochs))))
        else:
            bundle, which, seconds = args.worker
            print(json.dumps(worker_throughput(bundle, which, float(seconds))))
        return

    from edgeprop.exporters import export
    engines = [e for e in args.engines.split(",") if e]  # --engines "": the CNN comparison alone
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "threads": 1,
               "model": "noprop-dt digits MLP, 10 blocks of width 128 + head; anchor: backprop MLP, same width"}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in BATCHES if engines else ():
            print(f"export: batch {batch} ...", file=sys.stderr)
            common_opts = {"batch_size": batch, "progress": False, "tflite": "litert" in engines,
                           "fused_step": any(e.endswith(FUSED) for e in engines),
                           **({"ort_training": True} if "ort-training" in engines else {})}
            noprop = str(export(Path(tmp) / f"noprop{batch}", **common_opts))
            anchor = str(export(Path(tmp) / f"backprop{batch}", rule="backprop", width=128, depth=3,
                                **common_opts)) if "ort-training" in engines else None
            for engine in ("native", "native" + FUSED):  # its libraries built once, before any timing
                if engine in engines:
                    spawn(engine, noprop, engine, 0.1)
            if "binary" in engines:  # built once; --steps sized to --seconds by a short run
                binary = build_binary(noprop, Path(tmp) / f"binary{batch}")
                binary_steps = max(3, round(args.seconds * binary["rate"] / batch)) * binary["units"]
            runs = {e: [] for e in engines}
            anchor_runs = []
            limits = []
            for r in range(args.rounds):
                print(f"throughput: batch {batch}, round {r + 1}/{args.rounds} ...", file=sys.stderr)
                for engine in engines:  # alternate, so a load change does not land on one engine only
                    runs[engine].append(run_binary(Path(tmp) / f"binary{batch}", binary_steps) if engine == "binary"
                                        else spawn(engine, noprop, engine, args.seconds))
                if anchor:
                    anchor_runs.append(spawn("ort-training", anchor, "ort-training", args.seconds))
                limits.append(spawn("torch", "limit", noprop))  # .venv: numpy, onnx, the BLAS wheel

            row = {e: {**median(rs), "rounds": [x["samples_per_s"] for x in rs]} for e, rs in runs.items()}
            if "torch" in row:
                for e in engines:
                    row[e]["vs_torch"] = row[e]["samples_per_s"] / row["torch"]["samples_per_s"]
                    row[e]["rss_vs_torch"] = row[e]["peak_rss_mb"] / row["torch"]["peak_rss_mb"]
            limit = median(limits)
            row["practical_limit"] = {**limit, "rounds": [x["samples_per_s"] for x in limits]}
            for e in engines:  # the limit is timed in short pieces that a busy machine rarely preempts
                row[e]["share_of_limit"] = row[e]["samples_per_cpu_s"] / limit["samples_per_s"]
                if "torch" in row:
                    row[e]["vs_torch_cpu"] = row[e]["samples_per_cpu_s"] / row["torch"]["samples_per_cpu_s"]
            if anchor_runs:
                row["ort_training_backprop_anchor"] = {**median(anchor_runs),
                                                       "rounds": [x["samples_per_s"] for x in anchor_runs]}
            if "binary" in engines:
                row["binary"]["openblas"] = binary["blas"]
            results[f"batch{batch}"] = row
        if args.fashion_cnn:
            n_train, epochs = map(int, args.fashion_cnn.split(","))
            results["fashion_cnn"] = fashion_cnn(n_train, epochs, Path(tmp))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    for batch in BATCHES if engines else ():
        row = results[f"batch{batch}"]
        print(f"batch {batch}: " + ", ".join(
            f"{e} {v['samples_per_s']:,.0f}/s ({v['samples_per_cpu_s']:,.0f}/cpu-s, {v['peak_rss_mb']:.0f} MiB"
            + (f", {v['vs_torch']:.2f}x torch ({v['vs_torch_cpu']:.2f}x per cpu-s), {v['rss_vs_torch']:.3f}x its RSS"
               if "vs_torch" in v else "")
            + (f", {100 * v['share_of_limit']:.0f}% of limit)" if "share_of_limit" in v else ")")
            for e, v in row.items() if "peak_rss_mb" in v)
            + f"; practical limit {row['practical_limit']['samples_per_s']:,.0f}/s "
              f"(products at {row['practical_limit']['gflops']:.0f} GFLOP/s)")
    if "fashion_cnn" in results:
        f = results["fashion_cnn"]
        print(f"fashion cnn ({f['n_train']} images, {f['epochs']} epochs): noprop-dt {f['noprop_dt']['accuracy']:.4f}, "
              f"backprop {f['backprop']['accuracy']:.4f} ({f['noprop_minus_backprop_pp']:+.2f} points)")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
