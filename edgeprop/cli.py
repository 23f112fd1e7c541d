"""`edgeprop`: export and validate on the desktop; train, eval, profile and info on the device.

export and validate need the `export` extra (torch); the other commands never import it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from . import bundle as bundles
from . import datasets
from .errors import EdgepropError
from .state import STREAM_FOLDER


def _engine(args):
    from .runtimes import get_engine
    options = {"provider": args.provider} if args.provider != "cpu" else {}
    return get_engine(args.engine, threads=args.threads, **options)


def _data(bundle, source: str, split: str):
    data = datasets.load(source, split)
    datasets.check(data, bundle.input_shape, bundle.num_classes)
    return data


def _blocks(text: str | None):
    """--blocks: NoProp-DT's T (a number); sequential rules: every-layer, none, or layer
    indices where blocks start ("0,2,4")."""
    if text is None or text in ("every-layer", "none"):
        return text
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise EdgepropError(f"--blocks {text}: a number, every-layer, none, or comma-separated layer indices") from None
    return values[0] if len(values) == 1 and "," not in text else values


# Rule-specific `export` flags (dest names): passed to the exporter only when given.
RULE_OPTIONS: list[str] = ["threshold", "zo_eps", "zo_directions", "zo_layers", "init", "inference_steps", "dropout",
                           "batchnorm", "temperature"]


def add_inference_options(sp, default: str) -> None:
    """--temperature τ / --inference mean|sample: NoProp-DT's (and -CT's) inference chain
    z_t = a_t û_t + b_t z_{t-1} + τ √c_t ε. Read them back with inference_temperature(args)."""
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--temperature", type=float, default=None, metavar="TAU",
                   help=f"noprop-dt, noprop-ct: inference temperature τ >= 0, the scale of the noise the chain "
                        f"adds ({default})")
    g.add_argument("--inference", choices=["mean", "sample"], default=None,
                   help="mean: τ 0, the mean chain (the default); sample: τ 1, the paper's stochastic chain")


def inference_temperature(args) -> float | None:
    """τ from --temperature or --inference (None: neither was given)."""
    from .schedule import INFERENCE_MODES, check_temperature
    if getattr(args, "inference", None) is not None:
        return INFERENCE_MODES[args.inference]
    return None if args.temperature is None else check_temperature(args.temperature)


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
    if "per_unit_accuracy" in report:
        lines.append(f"per-unit accuracy ({report['per_unit_note']}): "
                     + " ".join(f"{a:.3f}" for a in report["per_unit_accuracy"]))
        for name, tau in (("mean", 0.0), ("sampled", 1.0)):
            if report.get("temperature") != tau and f"per_unit_accuracy_{name}" in report:
                lines.append(f"per-unit accuracy, {name} chain (τ {tau:g}): "
                             + " ".join(f"{a:.3f}" for a in report[f"per_unit_accuracy_{name}"]))
    return "\n".join(lines)


def cmd_export(args) -> int:
    exporters = _desktop()
    args.temperature = inference_temperature(args)
    rule_options = {k: getattr(args, k) for k in RULE_OPTIONS if getattr(args, k) is not None}
    blocks = _blocks(args.blocks)
    if args.rule != "noprop-dt" and isinstance(blocks, int):
        blocks = [blocks]  # one index: where the second block starts
    out = exporters.export(args.out, rule=args.rule, model=args.model, data=args.data, blocks=blocks,
                           width=args.width, depth=args.depth, embedding=args.embedding, embed_dim=args.embed_dim,
                           batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, head_lr=args.head_lr,
                           weight_decay=args.weight_decay, eta=args.eta, seed=args.seed, tflite=args.tflite,
                           ort_training=args.ort_training, force=args.force, progress=not args.quiet, **rule_options)
    print(f"wrote {out}")
    return 0


def cmd_validate(args) -> int:
    _desktop()
    from .exporters.validate import validate
    report = validate(args.bundle, args.data, steps=args.steps, device=args.reference_device, tol=args.tol,
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


def _budget(args):
    """(budget in bytes or None, device profile or None) from --budget / --device."""
    from .devices import load_profile
    from .sizes import parse_size
    budget = parse_size(args.budget, "--budget") if args.budget is not None else None
    device = load_profile(args.device) if args.device is not None else None
    return budget, device


def cmd_train(args) -> int:
    from .sizes import format_size as fmt
    from .trainer import TrainConfig, Trainer, epoch_losses
    bundle = bundles.load(args.bundle)
    data = _data(bundle, args.data, "train")
    budget, device = _budget(args)
    config = TrainConfig(epochs=args.epochs, order=args.order, seed=args.seed, lr=args.lr, head_lr=args.head_lr,
                         lr_schedule=args.lr_schedule, checkpoint_every=args.checkpoint_every,
                         checkpoint_seconds=args.checkpoint_seconds, stream=args.stream).check()
    ckpt = bundle.checkpoint_path()
    if args.resume and not ckpt.is_file():
        raise EdgepropError(f"{ckpt}: no checkpoint to resume from")
    if not args.resume and ckpt.exists() and not args.restart:
        raise EdgepropError(f"{ckpt} already exists; pass --resume to continue it, or --restart to train "
                            f"from the initial weights (it is replaced at the first new checkpoint)")
    if budget is not None or device is not None:  # before any state is loaded or written
        from .memory import refusal
        why = refusal(bundle, budget, device, stream=args.stream, engine=args.engine,
                      data_bytes=data.nbytes)
        if why:
            raise EdgepropError(why)
    trainer = Trainer(bundle, _engine(args), data, config)
    trainer.config.budget = budget if budget is not None else _device_working_budget(trainer, device)
    if args.resume:
        trainer.resume()
    try:
        trainer.run(progress=not args.quiet)
    finally:
        if args.stream:  # the checkpoint holds everything; the working files can go
            trainer.state = None
            shutil.rmtree(bundle.path(STREAM_FOLDER), ignore_errors=True)
    last = {unit: means[-1] for unit, means in epoch_losses(trainer.history).items() if means}
    print(f"trained {trainer.done} steps; last epoch's mean loss: "
          + ", ".join(f"{unit} {loss:.3g}" for unit, loss in last.items()))
    print(f"checkpoint: {ckpt}")
    print(f"memory: working set {fmt(trainer.working_set())} measured above the runtime and data "
          f"({fmt(trainer.baseline)})")
    return 0


def _device_working_budget(trainer, device) -> int | None:
    """On a device, what the working set may take: the device's training share less what the
    process already holds (interpreter, engine, graphs, data), as measured."""
    if device is None:
        return None
    return max(device.budget - trainer.baseline, 1)


def cmd_eval(args) -> int:
    from .trainer import evaluate, load_trained_state
    bundle = bundles.load(args.bundle)
    data = _data(bundle, args.data, "test")
    state, meta = load_trained_state(bundle)
    if not meta:
        print(f"note: {bundle.checkpoint_path()} not found; evaluating the untrained initial weights", file=sys.stderr)
    options = {"inference_steps": args.inference_steps} if args.inference_steps is not None else {}
    tau = inference_temperature(args)
    if tau is not None:
        options["temperature"] = tau
    report = evaluate(bundle, _engine(args), data, state, seed=args.seed, runs=args.runs, **options)
    report["trained_steps"] = int(meta.get("done", 0))
    if meta:  # info and plot show the last evaluation's per-block curves
        from .trainer import save_eval
        save_eval(bundle, {**report, "data": args.data, "seed": args.seed})
    if args.json:
        print(json.dumps(report))
    else:
        print(format_eval(report, args.runs))
    return 0


def cmd_info(args) -> int:
    from .storage import load_arrays
    bundle = bundles.load(args.bundle)
    m = bundle.manifest
    n_params = sum(u.n_params for u in bundle.units)
    print(f"bundle     {bundle.root} (schema {m['schema_version']}, id {bundle.id})")
    model = bundle.model
    roles = {}
    for u in bundle.units:
        roles[u.role] = roles.get(u.role, 0) + 1
    print(f"rule       {bundle.rule}: " + ", ".join(f"{n} {role}{'s' if n > 1 else ''}" for role, n in roles.items()))
    if "layers" in model:
        layers = " ".join(d["type"] for d in model["layers"])
        print(f"model      sequential ({model['source']}): {layers}; blocks {model['blocks']}")
    else:
        print(f"model      {model['kind']} width {model['width']}, {model['embedding']} embedding "
              f"(d={model['embed_dim']})")
    print(f"           input {bundle.input_shape}, {bundle.num_classes} classes, {n_params:,} parameters")
    lrs = ", ".join(sorted({f"{u.role} {u.lr:g}" for u in bundle.units}))
    print(f"training   batch {bundle.batch_size}, {bundle.optimizer['name']} lr {lrs}")
    if bundle.schedule is not None:
        print(f"noise      eta {bundle.schedule.eta:g}, block weights "
              + " ".join(f"{w:.3g}" for w in bundle.schedule.weights))
    if bundle.temperature is not None:
        note = f" ({bundle.temperature_note})" if bundle.temperature_note else ""
        print(f"inference  temperature {bundle.temperature:g}{note}: 0 the mean chain, 1 the paper's sampled chain")
    for key, g in bundle.graphs.items():
        size = bundle.graph_path(key).stat().st_size
        print(f"graph      {key:12s} {g.file} ({size / 1024:.0f} KiB, {len(g.inputs)} inputs)")
    ckpt = bundle.checkpoint_path()
    if ckpt.exists():
        from .trainer import epoch_losses
        _, meta = load_arrays(ckpt)
        print(f"checkpoint {ckpt}: {meta.get('done')}/{meta.get('total')} steps "
              f"({meta.get('order')}, seed {meta.get('seed')})")
        memory = meta.get("memory")
        if memory:
            from .sizes import format_size as fmt
            print(f"  memory   working set {fmt(memory['working_set'])} measured above runtime and data "
                  f"({fmt(memory['baseline'])}){', --stream' if memory.get('stream') else ''}")
        history = epoch_losses(meta.get("history", {}))
        for unit in bundle.units:
            means = history.get(unit.name)
            if means:
                print(f"  {unit.name:8s} mean loss, epoch 1: {means[0]:.3g}  epoch {len(means)}: {means[-1]:.3g}")
        from .trainer import load_eval
        report = load_eval(bundle)
        if report:
            print(f"  eval     on {report.get('data')} ({report['n']} samples, {report['runs']} run(s)): "
                  + format_eval(report, report["runs"]).replace("\n", "\n           "))
    else:
        print("checkpoint none (not trained yet)")
    return 0


def cmd_plot(args) -> int:
    from .plots import loss_curves
    from .trainer import epoch_losses, load_trained_state
    bundle = bundles.load(args.bundle)
    _, meta = load_trained_state(bundle)
    if not meta.get("history"):
        raise EdgepropError(f"{bundle.checkpoint_path()}: no training history to plot (train first)")
    from .trainer import load_eval
    out = args.out or bundle.root / "losses.png"
    print(f"wrote {loss_curves(bundle, epoch_losses(meta['history']), out, load_eval(bundle))}")
    return 0


def cmd_devices(args) -> int:
    from .devices import HERE, profiles
    from .sizes import format_size as fmt
    rows = profiles()
    if args.json:
        print(json.dumps([{**vars(p), "budget": p.budget} for p in rows], indent=1))
        return 0
    print(f"{'name':17s} {'kind':5s} {'arch':11s} {'cores':>5s} {'RAM':>10s} {'for training':>12s} "
          f"{'flash':>10s}  engines")
    for p in rows:
        ram = fmt(p.ram) + (f" +{fmt(p.psram)}" if p.psram else "")
        print(f"{p.name:17s} {p.kind:5s} {p.arch:11s} {p.cores:5d} {ram:>10s} {fmt(p.budget):>12s} "
              f"{fmt(p.flash):>10s}  {', '.join(p.engines)}")
    print(f"\nAdd your own: copy a file from {HERE} and pass --device FILE.toml")
    return 0


def cmd_profile(args) -> int:
    from . import memory
    from .profile import measure, report
    budget, device = _budget(args)
    engine = args.engine or (device.engines[0] if device and "onnxruntime" not in device.engines else "onnxruntime")
    if str(args.bundle).endswith(".onnx"):
        return _profile_onnx(args, budget, device, engine)
    bundle = bundles.load(args.bundle)
    data = _data(bundle, args.data, "train") if args.data else None
    data_bytes = data.nbytes if data is not None else 0
    if device is not None and device.kind == "mcu" and not args.stream:
        args.stream = True  # bare metal: weights stay in flash, one unit's state in SRAM
    p = memory.plan(bundle, args.batch_size, args.stream, engine, data_bytes)
    verdict = memory.check(p, budget, device) if (budget or device) else None
    measured = None
    if args.measure:
        if args.batch_size not in (None, bundle.batch_size):
            raise EdgepropError(f"--measure runs the bundle's graphs, traced for batch {bundle.batch_size}; "
                                f"drop --batch-size or export again with --batch-size {args.batch_size}")
        if data is None:
            raise EdgepropError("--measure trains a few real steps: give --data")
        from .runtimes import get_engine
        from .trainer import TrainConfig
        measured = measure(bundle, get_engine(engine, threads=args.threads), data,
                           TrainConfig(epochs=1, stream=args.stream), args.steps)
    fits = memory.fit(bundle, budget, device, engine, data_bytes) if args.fit and verdict else None
    if args.fit and not verdict:
        raise EdgepropError("--fit needs a --budget or a --device to fit into")
    if args.plot:
        from .plots import memory_bars
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


def cmd_deploy(args) -> int:
    from .deploy import deploy, summary
    from .devices import load_profile
    device = load_profile(args.device)
    if args.target == "c99":  # a microcontroller: C sources, a linker script and a Makefile
        try:
            from .exporters import firmware
        except ImportError as e:
            raise EdgepropError(f"--target c99 runs on the desktop and needs the mcu extra "
                                f"(pip install 'edgeprop[mcu]'): {e}") from None
        report = firmware.write_firmware(args.bundle, device, args.out, data=args.data,
                                         train_samples=args.train_samples, test_samples=args.test_samples,
                                         epochs=args.epochs, seed=args.seed,
                                         temperature=inference_temperature(args), force=args.force)
        print(firmware.summary(report, args.out))
        return 0
    out = deploy(args.bundle, device, args.out, engine=args.engine, engine_version=args.engine_version,
                 python=args.python, edgeprop_wheel_path=args.edgeprop_wheel, force=args.force)
    print(summary(out, device))
    return 0


def _profile_onnx(args, budget, device, engine: str) -> int:
    _desktop_onnx()
    from .exporters.model_memory import onnx_report
    report = onnx_report(args.bundle, args.batch_size, engine=engine)
    if args.measure:
        from .exporters.model_memory import measure_onnx
        report["measured_arena"] = measure_onnx(args.bundle, report["batch"])
    verdict = None
    if budget or device:
        from . import memory
        verdict = memory.check_inference(report, budget, device)
    if args.json:
        print(json.dumps({**report, "verdict": verdict}, indent=1))
    else:
        from .exporters.model_memory import format_report
        print(format_report(report, verdict))
    return 0 if verdict is None or verdict["fits"] else 1


def _desktop_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise EdgepropError("profiling a plain .onnx model reads it with the onnx package: "
                            "pip install onnx (or 'edgeprop[export]')") from None


def _desktop():
    try:
        from . import exporters
        from .exporters import bundle_export, validate  # noqa: F401  (torch, onnx, onnxscript)
    except ImportError as e:
        raise EdgepropError(f"this command runs on the desktop and needs the export extra "
                            f"(pip install 'edgeprop[export]'): {e}") from None
    return exporters


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeprop", description=__doc__)
    sub = p.add_subparsers(dest="command")

    def common(sp, engine=True):
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
        if engine:
            sp.add_argument("--engine", default="onnxruntime", help="inference engine (default: onnxruntime)")
            sp.add_argument("--threads", type=int, default=1, help="engine threads (default: 1)")
            sp.add_argument("--provider", default="cpu", choices=["cpu", "cuda"],
                            help="onnxruntime execution provider: cuda runs the graphs on a GPU (onnxruntime-gpu)")

    e = sub.add_parser("export", help="export a model as a bundle of per-block training graphs (desktop)")
    e.add_argument("--rule", default="noprop-dt",
                   help="noprop-dt (default), local, mono-forward, backprop, forward-forward, zeroth-order, "
                        "noprop-ct, noprop-fm")
    e.add_argument("--model", default="mlp", choices=["mlp", "cnn"],
                   help="mlp (flat inputs) or cnn (NoProp-DT: the paper's conv block, for images)")
    e.add_argument("--data", default="digits", help="digits, an .npz file, or an IDX folder")
    e.add_argument("--out", required=True)
    e.add_argument("--blocks", default=None,
                   help="noprop-dt: T, the number of blocks (default 10); local: every-layer (default), none, "
                        "or the layer indices where blocks start, e.g. 0,2")
    e.add_argument("--width", type=int, default=None, help="hidden width (default: 128 for mlp, 256 for cnn)")
    e.add_argument("--depth", type=int, default=2, help="hidden layers of the mlp for sequential rules (default: 2)")
    e.add_argument("--embedding", default="one-hot", choices=["one-hot", "orthogonal"])
    e.add_argument("--embed-dim", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=None,
                   help="fixed batch size of the step graphs (default: 128 for noprop-dt, the paper's; 64 otherwise)")
    e.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    e.add_argument("--lr", type=float, default=None,
                   help="units' learning rate (default: the rule's: 1e-3, forward-forward 0.03)")
    e.add_argument("--head-lr", type=float, default=1e-2,
                   help="the linear head's learning rate (a trivial classifier on z_T: it can go faster)")
    e.add_argument("--weight-decay", type=float, default=1e-3)
    e.add_argument("--eta", type=float, default=0.1)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--zo-eps", type=float, default=None,
                   help="zeroth-order: perturbation scale ε (default: 1e-3)")
    e.add_argument("--zo-directions", type=int, default=None,
                   help="zeroth-order: random directions averaged per step (default: 1)")
    e.add_argument("--zo-layers", default=None,
                   help="zeroth-order: layers perturbed and updated: all (default), last-K, or trainable "
                        "layer indices, e.g. 4 or 2,4 (the rest stay fixed)")
    e.add_argument("--init", default=None, metavar="BUNDLE",
                   help="zeroth-order: start from this bundle's trained weights (its checkpoint, else its "
                        "initial ones): a backprop or zeroth-order bundle of the same --model/--width/--depth")
    e.add_argument("--threshold", type=float, default=None,
                   help="forward-forward: goodness threshold θ on mean(h²) (default: 2.0)")
    e.add_argument("--dropout", type=float, default=None,
                   help="noprop-dt --model cnn: dropout rate after each conv stage (default: 0.2, the paper's)")
    e.add_argument("--batchnorm", action="store_true", default=None,
                   help="noprop-dt --model cnn: the paper's BatchNorm layers (running statistics are unit state)")
    e.add_argument("--inference-steps", type=int, default=None,
                   help="noprop-ct, noprop-fm: ODE/diffusion steps at inference (default: 40; the paper: 1000)")
    add_inference_options(e, "the bundle's default for eval; default 0, the mean chain")
    e.add_argument("--tflite", action="store_true",
                   help="also write every graph as .tflite for --engine litert (needs edgeprop[tflite])")
    e.add_argument("--ort-training", action="store_true",
                   help="also write onnxruntime-training artifacts for --engine ort-training "
                        "(needs scripts/engine-venv.sh ort-training)")
    e.add_argument("--force", action="store_true", help="replace an existing bundle and its checkpoints")
    common(e, engine=False)
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("validate", help="train with the runtime and the torch reference; compare (desktop)")
    v.add_argument("bundle")
    v.add_argument("--data", default="digits")
    v.add_argument("--steps", type=int, default=50, help="optimizer steps per unit")
    v.add_argument("--reference-device", default="cpu", help="cpu or cuda")
    v.add_argument("--engine", default="onnxruntime", help="the runtime's engine: onnxruntime, litert or tflm")
    v.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="the runtime's onnxruntime provider")
    v.add_argument("--tol", type=float, default=1e-4, help="largest allowed absolute weight difference")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json", action="store_true")
    common(v, engine=False)
    v.set_defaults(func=cmd_validate)

    t = sub.add_parser("train", help="train a bundle on the device (no torch)")
    t.add_argument("bundle")
    t.add_argument("--data", default="digits")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--order", default="interleaved", choices=["interleaved", "block-sequential"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--lr", type=float, default=None, help="blocks' learning rate (default: the bundle's)")
    t.add_argument("--head-lr", type=float, default=None, help="the head's learning rate (default: the bundle's)")
    t.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    t.add_argument("--checkpoint-every", type=int, default=None, help="updates between checkpoints")
    t.add_argument("--checkpoint-seconds", type=float, default=60.0,
                   help="at most this long between checkpoints (default: 60; resuming is exact either way)")
    t.add_argument("--budget", default=None,
                   help="refuse to start unless the plan's working set fits, e.g. 48MB; stop if it is exceeded")
    t.add_argument("--device", default=None, help="refuse to start unless training fits this device's profile")
    t.add_argument("--stream", action="store_true",
                   help="keep units that are not stepping in memory-mapped files, not RAM")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from the bundle's checkpoint")
    g.add_argument("--restart", action="store_true", help="start over although a checkpoint exists")
    common(t)
    t.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="test accuracy of the trained bundle (no torch)")
    ev.add_argument("bundle")
    ev.add_argument("--data", default="digits")
    ev.add_argument("--runs", type=int, default=1, help="stochastic inference runs to average")
    ev.add_argument("--inference-steps", type=int, default=None,
                    help="noprop-ct, noprop-fm: inference steps (default: the bundle's)")
    add_inference_options(ev, "default: the bundle's, 0 unless exported otherwise")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", action="store_true")
    common(ev)
    ev.set_defaults(func=cmd_eval)

    pl = sub.add_parser("plot", help="plot each unit's loss per epoch to a PNG (needs matplotlib)")
    pl.add_argument("bundle")
    pl.add_argument("--out", default=None, help="default: BUNDLE/losses.png")
    pl.set_defaults(func=cmd_plot)

    d = sub.add_parser("devices", help="list the device profiles edgeprop knows")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_devices)

    pr = sub.add_parser("profile", help="plan a bundle's training memory against a device or budget (no torch)")
    pr.add_argument("bundle", help="a bundle folder, or any .onnx inference model (its inference memory)")
    pr.add_argument("--device", default=None, help="a profile name (see `edgeprop devices`) or a .toml file")
    pr.add_argument("--budget", default=None, help="bytes the working set may take, e.g. 48MB")
    pr.add_argument("--batch-size", type=int, default=None, help="plan this batch size (default: the bundle's)")
    pr.add_argument("--stream", action="store_true", help="plan with inactive units' state on disk")
    pr.add_argument("--data", default=None, help="count this data set in RAM; needed by --measure")
    pr.add_argument("--measure", action="store_true", help="also run a few real steps and measure them")
    pr.add_argument("--steps", type=int, default=3, help="steps per unit for --measure (default: 3)")
    pr.add_argument("--fit", action="store_true", help="report the largest batch size that fits")
    pr.add_argument("--plot", default=None, help="write a PNG bar chart of memory per unit")
    pr.add_argument("--json", action="store_true")
    pr.add_argument("--engine", default=None, help="default: onnxruntime, or the device's first engine")
    pr.add_argument("--threads", type=int, default=1)
    pr.set_defaults(func=cmd_profile)

    dp = sub.add_parser("deploy", help="write a folder that sets up and trains offline on a Linux device")
    dp.add_argument("bundle")
    dp.add_argument("--device", required=True, help="a profile name (see `edgeprop devices`) or a .toml file")
    dp.add_argument("--out", required=True)
    dp.add_argument("--engine", default="onnxruntime")
    dp.add_argument("--engine-version", default=None,
                    help="pin the engine's version, e.g. 1.20.1 (default: the newest with a wheel for the device)")
    dp.add_argument("--python", default=None, help="the device's Python, e.g. 3.11 (default: the profile's)")
    dp.add_argument("--edgeprop-wheel", default=None, help="ship this edgeprop wheel instead of building one")
    dp.add_argument("--force", action="store_true", help="replace an existing --out folder")
    dp.add_argument("--target", choices=("python", "c99"), default="python",
                    help="python: a folder for a Linux device; c99: firmware sources for a microcontroller")
    mcu = dp.add_argument_group("--target c99", "the firmware trains block by block on a data subset in flash")
    mcu.add_argument("--data", default="digits", help="the data set whose subset goes into flash")
    mcu.add_argument("--train-samples", type=int, default=None, help="the first N training samples (default all)")
    mcu.add_argument("--test-samples", type=int, default=None, help="the first N test samples (default all)")
    mcu.add_argument("--epochs", type=int, default=1)
    mcu.add_argument("--seed", type=int, default=0, help="as `edgeprop train --seed`: the same noise")
    add_inference_options(mcu, "the firmware's test chain; default: the bundle's")
    dp.set_defaults(func=cmd_deploy)

    i = sub.add_parser("info", help="describe a bundle")
    i.add_argument("bundle")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:  # a bare `edgeprop` shows what it can do
        p.print_help()
        return 0
    try:
        return args.func(args)
    except EdgepropError as e:
        print(f"edgeprop {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # disk full, permission denied, ...: say so without a traceback
        print(f"edgeprop {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgeprop {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
