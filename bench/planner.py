"""The memory planner against real models: `edgeprop profile model.onnx` vs the measured peak.

    python bench/planner.py [--models resnet18,...] [--sizes 224,96] [--batches 1,8]
                            [--exporters dynamo,legacy] [--out bench/results/planner.json]

Each model of exporters/zoo.py (torchvision's classifiers, layer for layer, random weights)
is exported with a symbolic batch axis by torch.onnx's dynamo and legacy (TorchScript)
exporters at each image size, then for each batch size:
  planned    onnx_report's figures: the inference working set (weights, inputs, arena, the
             session build's copies) and the total need (+ the runtime)
  measured   a fresh process loads onnxruntime, builds the session and runs the model three
             times (model_memory.measure_onnx): its peak resident set (VmHWM), and the
             peak above the process before the session was built (the working set)
With --light (default) also the onnx package's nine opset-9 models (batch fixed at 1),
planned converted to opset 17. The summary counts the configurations whose total and
working set are within ±20% of the measurement, and the worst under-plan (largest
measured/planned). Exports are cached under .cache/planner-models/ (about 1.5 GB, ViT-B's
four files most of it); the whole run takes a few minutes.
With --bundles (default) also real-model training bundles (BUNDLES: bench/real_models.py's
models at 32 px, batch 8): `edgeprop profile BUNDLE`'s total and working set against
`--measure`'s fresh process (3 steps), in the result's "bundles" (`--models ""` runs only
those).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import common  # bench/common.py: the script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "planner-models"
MODELS = ("mobilenet_v2", "mobilenet_v3_small", "resnet18", "squeezenet1_1", "efficientnet_b0",
          "shufflenet_v2_x1_0", "vit_b_16")


def export_worker(name: str, size: int, exporter: str, path: str) -> dict:
    import warnings

    import torch

    from edgeprop.exporters import zoo
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = zoo.create(name, image_size=size)
    x = torch.randn(2, 3, size, size)
    tmp = Path(path + ".tmp")
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.onnx.export(model, (x,), str(tmp), dynamo=True, input_names=["x"], output_names=["logits"],
                          dynamic_shapes={"x": {0: batch}}, optimize=True, verbose=False, external_data=False)
    else:
        torch.onnx.export(model, (x,), str(tmp), dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    tmp.replace(path)
    return {"bytes": Path(path).stat().st_size}


# Real-model training bundles (bench/real_models.py's models and methods: 3x32x32 inputs, 10
# classes, batch 8, SGD), planned by `edgeprop profile BUNDLE` against `--measure`'s fresh process.
BUNDLES = (("resnet18", "backprop+bias"), ("mobilenet_v2_0.35", "backprop+bias"),
           ("mobilenet_v2_0.35", "zeroth-order"))


def bundle_worker(name: str, method: str, out: str, data: str) -> dict:
    import real_models  # bench/real_models.py
    import torch

    from edgeprop.exporters import export
    build, _ = real_models.MODELS[name]
    torch.manual_seed(0)
    tmp = Path(out + ".tmp")
    export(build(), out=tmp, data=data, batch_size=8, optimizer="sgd", lr=0.01, force=True, progress=False,
           **real_models.METHODS[method])
    tmp.replace(out)
    return {}


def bundle_row(name: str, method: str) -> dict:
    """Planned against measured training memory of one real-model bundle, in a fresh process."""
    import subprocess

    import numpy as np
    folder = CACHE / "bundles"
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "rgb32.npz"
    if not data.exists():  # bench/real_models.py's random images
        rng = np.random.default_rng(0)
        x, y = rng.random((64, 3, 32, 32), dtype=np.float32), np.arange(64) % 10
        np.savez(data, x_train=x, y_train=y, x_test=x[:32], y_test=y[:32])
    out = folder / f"{name}-{method}"
    if not out.exists():
        common.spawn(__file__, "bundle", name, method, out, data)
    proc = subprocess.run([sys.executable, "-m", "edgeprop", "profile", str(out), "--data", str(data), "--measure",
                           "--steps", "3", "--json"], capture_output=True, text=True, check=True)
    report = json.loads(proc.stdout)
    plan, got = report["plan"], report["measured"]
    return {"model": name, "size": 32, "exporter": f"bundle ({method})", "batch": plan["batch"],
            "planned_total": plan["total"], "planned_inference": plan["working_set"],
            "measured_total": got["process_peak"], "measured_inference": got["working_set"],
            "ratio_total": got["process_peak"] / plan["total"],
            "ratio_inference": got["working_set"] / plan["working_set"]}


def exported(name: str, size: int, exporter: str) -> Path:
    path = CACHE / f"{name}_{size}_{exporter}.onnx"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        common.spawn(__file__, "export", name, size, exporter, path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--sizes", default="224,96")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--exporters", default="dynamo,legacy")
    p.add_argument("--level", default="extended", help="onnxruntime optimisation level to plan and measure")
    p.add_argument("--export-only", action="store_true")
    p.add_argument("--light", action=argparse.BooleanOptionalAction, default=True,
                   help="also the onnx package's opset-9 models (converted)")
    p.add_argument("--bundles", action=argparse.BooleanOptionalAction, default=True,
                   help="also real-model training bundles: " + ", ".join(f"{m} {r}" for m, r in BUNDLES))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "planner.json"))
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "export":
            name, size, exporter, path = rest
            print(json.dumps(export_worker(name, int(size), exporter, path)))
        elif kind == "bundle":
            print(json.dumps(bundle_worker(*rest)))
        return
    configs = [(m, int(s), e) for m in args.models.split(",") if m for s in args.sizes.split(",")
               for e in args.exporters.split(",")]
    for m, s, e in configs:
        t = time.perf_counter()
        path = exported(m, s, e)
        print(f"exported {path.name} ({time.perf_counter() - t:.0f} s)", flush=True)
    if args.export_only:
        return
    from edgeprop.exporters.model_memory import measure_onnx, onnx_report
    runs = [(m, s, e, b, exported(m, s, e)) for m, s, e in configs for b in map(int, args.batches.split(","))]
    if args.light and configs:  # the onnx package's opset-9 models: fixed batch 1, planned converted to opset 17
        import onnx
        light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
        runs += [(p.stem, 224, "onnx-package (opset 9)", 1, p) for p in sorted(light.glob("*.onnx"))]
    rows = []
    for m, s, e, b, path in runs:
        row = {"model": m, "size": s, "exporter": e, "batch": b, "level": args.level}
        try:
            r = onnx_report(path, b, optimization=args.level, convert=True)
            got = measure_onnx(path, b, optimization=args.level)
        except Exception as err:  # a refusal is a result too: the table says which
            rows.append({**row, "error": str(err)[-300:]})
            print(f"{m:20s} {s:3d} {e:6s} b{b}: {str(err)[-300:]}", flush=True)
            continue
        row.update(planned_total=r["total"], planned_inference=r["inference"], weights=r["weights"],
                   folded=r["folded"], session_build=r["session_build"], session=r["session"], arena=r["arena"],
                   runtime=r["runtime"], measured_total=got["peak"], measured_inference=got["peak"] - got["baseline"],
                   measured_runtime=got["baseline"], measured_arena=got["arena"], measured_session=got["session"],
                   measured_loaded=got["loaded"])
        row["ratio_total"] = row["measured_total"] / row["planned_total"]
        row["ratio_inference"] = row["measured_inference"] / row["planned_inference"]
        rows.append(row)
        print(f"{m:20s} {s:3d} {e:6s} b{b}: total {row['planned_total'] / 2**20:7.1f} planned "
              f"{row['measured_total'] / 2**20:7.1f} measured ({row['ratio_total']:.2f}x); inference "
              f"{row['planned_inference'] / 2**20:7.1f} / {row['measured_inference'] / 2**20:7.1f} "
              f"({row['ratio_inference']:.2f}x)", flush=True)
    bundles = []
    for name, method in BUNDLES if args.bundles else ():
        row = bundle_row(name, method)
        bundles.append(row)
        print(f"{name:20s} {method}: total {row['planned_total'] / 2**20:7.1f} planned "
              f"{row['measured_total'] / 2**20:7.1f} measured ({row['ratio_total']:.2f}x); working set "
              f"{row['planned_inference'] / 2**20:7.1f} / "
              f"{row['measured_inference'] / 2**20:7.1f} ({row['ratio_inference']:.2f}x)", flush=True)
    done = [r for r in rows if "error" not in r]

    def within(key):
        return sum(0.8 <= r[key] <= 1.2 for r in done)

    summary = {"configurations": len(rows), "planned": len(done),
               "total_within_20pct": within("ratio_total"), "inference_within_20pct": within("ratio_inference"),
               "worst_total_underplan": max((r["ratio_total"] for r in done), default=None)}
    import onnx
    import onnxruntime
    result = {"machine": platform.machine(), "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
              "python": sys.version.split()[0], "summary": summary, "rows": rows, "bundles": bundles}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
