"""`edgeprop profile`: a bundle's training memory planned (and measured) against a device or
a budget; or a plain .onnx model's inference memory (no torch)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from edgeprop import bundle as bundles
from edgeprop.errors import EdgepropError

from . import shared

HELP = "plan a bundle's training memory against a device or budget (no torch)"


def add_arguments(pr) -> None:
    pr.add_argument("bundle", help="a bundle folder, or any .onnx inference model (its inference memory)")
    shared.add_device(pr, "a profile name (see `edgeprop devices`) or a .toml file")
    shared.add_budget(pr, "bytes the working set may take, e.g. 48MB")
    pr.add_argument("--batch-size", type=int, default=None, help="plan this batch size (default: the bundle's)")
    pr.add_argument("--stream", action="store_true", help="plan with inactive units' state on disk")
    pr.add_argument("--fused-step", action="store_true",
                    help="plan train --fused-step: every unit steps at once in the bundle's fused step graph")
    pr.add_argument("--data", default=None, help="count this data set in RAM; needed by --measure")
    pr.add_argument("--measure", action="store_true",
                    help="also run it in a fresh process and measure it (a bundle: a few real steps)")
    pr.add_argument("--convert", action="store_true",
                    help="an .onnx model of opset < 17: plan it converted by onnx.version_converter (file unchanged)")
    pr.add_argument("--steps", type=int, default=3, help="steps per unit for --measure (default: 3)")
    pr.add_argument("--measure-here", action="store_true", help=argparse.SUPPRESS)  # the fresh process --measure runs
    pr.add_argument("--fit", action="store_true", help="report the largest batch size that fits")
    pr.add_argument("--plot", default=None, help="write a PNG bar chart of memory per unit")
    pr.add_argument("--json", action="store_true")
    pr.add_argument("--engine", default=None, help="default: onnxruntime, or the device's first engine")
    pr.add_argument("--threads", type=int, default=1)
    shared.add_ort_optimization(pr)


def run(args) -> int:
    from edgeprop import memory
    from edgeprop.profile import report
    from edgeprop.runtimes import memory_model
    budget, device = shared.limits(args)
    engine = args.engine or (device.engines[0] if device and "onnxruntime" not in device.engines else "onnxruntime")
    if str(args.bundle).endswith(".onnx"):
        return _profile_onnx(args, budget, device, engine)
    bundle = bundles.load(args.bundle)
    if args.measure_here:
        return _measure_here(args, bundle, engine)
    data = shared.data(bundle, args.data, "train") if args.data else None
    data_bytes = data.nbytes if data is not None else 0
    stream = args.stream or (device is not None and device.kind == "mcu")  # bare metal: weights stay in flash
    model, width = memory_model(engine, device and device.arch), shared.vector_width(args, device)
    p = memory.plan(bundle, args.batch_size, stream, engine=model, data_bytes=data_bytes, vector_width=width,
                    fused=args.fused_step)
    verdict = memory.check(p, budget, device) if (budget or device) else None
    measured = None
    if args.measure:
        if args.batch_size not in (None, bundle.batch_size):
            raise EdgepropError(f"--measure runs the bundle's graphs, traced for batch {bundle.batch_size}; "
                                f"drop --batch-size or export again with --batch-size {args.batch_size}")
        if data is None:
            raise EdgepropError("--measure trains a few real steps: give --data")
        if args.fused_step:
            raise EdgepropError("--measure measures each unit's own step; it does not run --fused-step")
        measured = _measure_fresh(args, engine, stream)
    fits = memory.fit(bundle, budget, device, engine=model, data_bytes=data_bytes, vector_width=width,
                      fused=args.fused_step) \
        if args.fit and verdict else None
    if args.fit and not verdict:
        raise EdgepropError("--fit needs a --budget or a --device to fit into")
    if args.plot:
        from .charts import memory_bars
        against = f"on {device.name}" if device else (f"within {args.budget}" if budget else "")
        memory_bars(p, verdict, args.plot, title=f"{bundle.root.name}, batch {p.batch} {against}")
    if args.json:
        out = {"plan": p.to_json(), "measured": measured, "largest_batch": fits}
        if verdict:
            out["verdict"] = {"fits": verdict.fits, "budget": verdict.budget, "need": verdict.need,
                              "headroom": verdict.headroom, "bounds": verdict.what, "problems": verdict.problems}
        print(json.dumps(out, indent=1))
    else:
        where = f" on {device.title}" if device else (f" within --budget {args.budget}" if budget else "")
        print(report(p, verdict, measured, f"{bundle.root}{where}"))
        if fits:
            print("largest batch size that fits:")
            for how, batch in fits.items():
                print(f"  {how}: {batch if batch else 'none'}")
        if args.plot:
            print(f"wrote {args.plot}")
    return 0 if verdict is None or verdict.fits else 1


def _measure_fresh(args, engine: str, stream: bool) -> dict:
    """Run --measure's steps in a fresh process, as `train` would run them: the whole
    process's peak (imports, data, sessions, steps) is then what a device must have."""
    argv = [sys.executable, "-m", "edgeprop", "profile", str(args.bundle), "--measure-here", "--data", args.data,
            "--steps", str(args.steps), "--engine", engine, "--threads", str(args.threads)]
    argv += ["--stream"] if stream else []
    argv += ["--ort-optimization", args.ort_optimization] if args.ort_optimization else []
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EdgepropError(f"--measure: the measuring process failed ({proc.stderr.strip()[-300:]})")
    return json.loads(proc.stdout)


def _measure_here(args, bundle, engine: str) -> int:
    """The fresh process of --measure: a few real steps, then the figures as JSON."""
    from edgeprop import rss
    from edgeprop.profile import measure
    from edgeprop.trainer import TrainConfig
    data = shared.data(bundle, args.data, "train")
    measured = measure(bundle, shared.engine(args, engine), data, TrainConfig(epochs=1, stream=args.stream),
                       args.steps)
    print(json.dumps({**measured, "process_peak": rss.process_peak()}))
    return 0


def _profile_onnx(args, budget, device, engine: str) -> int:
    """A plain inference model: its forward pass (zeroth-order fine-tuning) against end-to-end back-prop."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise EdgepropError("profiling a plain .onnx model reads it with the onnx package: "
                            "pip install onnx (or 'edgeprop[export]')") from None
    from edgeprop.exporters.model_memory import format_report, measure_onnx, onnx_report
    from edgeprop.runtimes.onnxruntime import DEFAULT_LEVEL
    level = args.ort_optimization or DEFAULT_LEVEL
    report = onnx_report(args.bundle, args.batch_size, engine=engine, vector_width=shared.vector_width(args, device),
                         optimization=level, convert=args.convert, arch=device and device.arch)
    if args.measure:
        report["measured"] = measure_onnx(args.bundle, report["batch"], optimization=level)
    verdict = None
    if budget or device:
        from edgeprop import memory
        verdict = memory.check_inference(report, budget, device)
    if args.json:
        print(json.dumps({**report, "verdict": verdict}, indent=1))
    else:
        print(format_report(report, verdict))
    return 0 if verdict is None or verdict["fits"] else 1
