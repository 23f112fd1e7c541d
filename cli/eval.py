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
    shared.add_inference_options(ev, "default: the bundle's, 0 unless exported otherwise")
    ev.add_argument("--predict-with", default=None, metavar="last|best|K",
                    help="local, mono-forward: which unit's classifier predicts: last (default), unit K "
                         "(1-based; eval lists every unit's accuracy), or best: the unit that scores best on the "
                         "validation split train --holdout kept out (never the test set)")
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
    chosen = None
    if args.predict_with == "best":
        from edgeprop.trainer import best_unit
        unit, score, n = best_unit(bundle, shared.engine(args), shared.data(bundle, args.data, "train"), state,
                                   meta.get("holdout", 0.0))
        options["predict_with"] = str(unit)
        chosen = f"  predicted by unit {unit}, the best on the validation split ({score:.4f} on {n} held-out samples)"
    elif args.predict_with is not None:
        options["predict_with"] = args.predict_with
    tau = shared.inference_temperature(args)
    if tau is not None:
        options["temperature"] = tau
    report = evaluate(bundle, shared.engine(args), data, state, seed=args.seed, runs=args.runs, **options)
    report["trained_steps"] = int(meta.get("done", 0))
    if chosen:
        report["predicted_by_note"] = chosen.strip()
    if meta:  # info and plot show the last evaluation's per-block curves
        from edgeprop.trainer import save_eval
        save_eval(bundle, {**report, "data": shared.data_source(bundle, args.data), "seed": args.seed})
    if args.json:
        print(json.dumps(report))
    else:
        print(format_eval(report, args.runs))
    return 0


def format_eval(report: dict, runs: int) -> str:
    """`edgeprop eval`'s text: the accuracy, a NoProp chain's other temperatures and block 1's
    diagnostic beside it, and the per-unit accuracies."""
    chain = ""
    if "temperature" in report:
        tau = report["temperature"]
        chain = f"{ {0.0: 'mean chain, ', 1.0: 'sampled chain, '}.get(tau, '') }τ {tau:g}, "
    lines = [f"test accuracy {report['accuracy']:.4f} on {report['n']} samples ({chain}{runs} inference run(s))"]
    if "temperature" in report:
        for name, tau in (("mean", 0.0), ("sampled", 1.0)):
            if report["temperature"] != tau and f"accuracy_{name}" in report:
                lines.append(f"  {name} chain (τ {tau:g}) accuracy {report[f'accuracy_{name}']:.4f}")
        if "block1_true_class_probability" in report:
            p1 = report["block1_true_class_probability"]
            lines.append(f"  block 1's mean probability of the true class {p1:.4f} "
                         "(what an ideal sampled chain scores)")
        if "temperature_note" in report:
            lines.append(f"  note: inference temperature {report['temperature_note']}")
    else:
        for key, value in report.items():  # a rule's other predictions, e.g. accuracy_readout
            if key.startswith("accuracy_") and key != "accuracy_runs":
                lines.append(f"  {key.removeprefix('accuracy_')} accuracy {value:.4f}")
    if "predicted_by_note" in report:
        lines.append("  " + report["predicted_by_note"])
    elif "predicted_by_unit" in report and report["predicted_by_unit"] != len(report.get("per_unit_accuracy", [])):
        lines.append(f"  predicted by unit {report['predicted_by_unit']} (--predict-with)")
    if "per_unit_accuracy" in report:
        lines.append(f"per-unit accuracy ({report['per_unit_note']}): "
                     + " ".join(f"{a:.3f}" for a in report["per_unit_accuracy"]))
        for name, tau in (("mean", 0.0), ("sampled", 1.0)):
            if report.get("temperature") != tau and f"per_unit_accuracy_{name}" in report:
                lines.append(f"per-unit accuracy, {name} chain (τ {tau:g}): "
                             + " ".join(f"{a:.3f}" for a in report[f"per_unit_accuracy_{name}"]))
    return "\n".join(lines)

