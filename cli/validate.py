"""`edgeprop validate`: train with the runtime and with the torch reference, and compare (desktop)."""
from __future__ import annotations

import json
import sys

from edgeprop import bundle as bundles

from . import shared

HELP = "train with the runtime and the torch reference; compare (desktop)"


def add_arguments(v) -> None:
    v.add_argument("bundle")
    shared.add_data(v)
    v.add_argument("--steps", type=int, default=50, help="optimizer steps per unit")
    v.add_argument("--reference-device", default="cpu", help="cpu or cuda")
    v.add_argument("--engine", default="onnxruntime", help="the runtime's engine: onnxruntime, litert, tflm or native")
    v.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="the runtime's onnxruntime provider")
    v.add_argument("--tol", type=float, default=1e-4, help="largest allowed absolute weight difference")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json", action="store_true")
    shared.add_quiet(v)


def run(args) -> int:
    shared.desktop()
    from edgeprop.exporters.validate import validate
    data = shared.data_source(bundles.load(args.bundle), args.data)
    report = validate(args.bundle, data, steps=args.steps, device=args.reference_device, tol=args.tol,
                      seed=args.seed, engine=args.engine, provider=args.provider, progress=not args.quiet)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        lock, free = report["lockstep"], report["free_running"]
        print(f"{report['steps']} steps per unit, {report['engine']} ({report['provider']}) "
              f"vs torch on {report['device']}")
        if lock["judged"].startswith("adamw"):
            print(f"  lock-step     largest difference {lock['max_abs_diff']:.3g} in {lock['worst']} (AdamW moves a "
                  f"weight with a ~0 gradient by ±lr: judged instead on)")
            print(f"                gradient side (optimizer moments, loss, statistics) largest difference "
                  f"{lock['max_abs_diff_gradient']:.3g} in {lock['worst_gradient']}, weights RMS {lock['rms']:.3g} "
                  f"(tolerance {args.tol:g} each)")
        else:
            print(f"  lock-step     largest difference {lock['max_abs_diff']:.3g} in {lock['worst']} "
                  f"(tolerance {args.tol:g})")
        print(f"  free-running  RMS difference {free['rms']:.3g} (allowed {free['allowed_rms']:.3g}); "
              f"largest {free['max_abs_diff']:.3g} in {free['worst']}")
        print(f"  torch vs torch with the lock-step's rounding ({report['lockstep_rms']:.2g} RMS) added every step: "
              f"RMS difference {report['torch_sensitivity_rms']:.3g}")
        if "inference" in report:
            chains = "; ".join(f"τ {tau}: logits differ by {c['max_abs_diff']:.3g} (allowed {c['allowed']:.3g}), "
                               f"{c['agreement']:.1%} same class" for tau, c in report["inference"]["chains"].items())
            print(f"  inference     runtime chain vs torch chain on {report['inference']['samples']} samples: {chains}")
    if not report["ok"]:
        print("validate: FAILED: the runtime and the torch reference disagree", file=sys.stderr)
        return 1
    return 0
