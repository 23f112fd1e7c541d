"""`edgeprop eval`: test accuracy of the trained bundle (no torch)."""
from __future__ import annotations

import json
import sys

from edgeprop import bundle as bundles

from . import shared

HELP = "test accuracy of the trained bundle (no torch)"


def add_arguments(ev) -> None:
    ev.add_argument("bundle")
    shared.add_data(ev)
    ev.add_argument("--runs", type=int, default=1, help="stochastic inference runs to average")
    ev.add_argument("--inference-steps", type=int, default=None,
                    help="noprop-ct, noprop-fm: inference steps (default: the bundle's)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", action="store_true")
    shared.add_quiet(ev)
    shared.add_engine(ev)


def run(args) -> int:
    from edgeprop.trainer import evaluate, load_trained_state
    bundle = bundles.load(args.bundle)
    data = shared.data(bundle, args.data, "test")
    state, meta = load_trained_state(bundle)
    if not meta:
        print(f"note: {bundle.checkpoint_path()} not found; evaluating the untrained initial weights", file=sys.stderr)
    options = {"inference_steps": args.inference_steps} if args.inference_steps is not None else {}
    report = evaluate(bundle, shared.engine(args), data, state, seed=args.seed, runs=args.runs, **options)
    report["trained_steps"] = int(meta.get("done", 0))
    if args.json:
        print(json.dumps(report))
    else:
        print(f"test accuracy {report['accuracy']:.4f} on {report['n']} samples ({args.runs} inference run(s))")
        for key, value in report.items():  # a rule's other predictions, e.g. accuracy_readout
            if key.startswith("accuracy_") and key != "accuracy_runs":
                print(f"  {key.removeprefix('accuracy_')} accuracy {value:.4f}")
        if "per_unit_accuracy" in report:
            units = " ".join(f"{a:.3f}" for a in report["per_unit_accuracy"])
            print(f"per-unit accuracy ({report['per_unit_note']}): {units}")
    return 0
