"""`edgeprop`: export and validate on the desktop; train, eval and info on the device.

export and validate need the `export` extra (torch); train, eval and info never import it.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import bundle as bundles
from . import datasets
from .errors import EdgepropError


def _engine(args):
    from .runtimes import get_engine
    return get_engine(args.engine, threads=args.threads)


def _data(bundle, source: str, split: str):
    data = datasets.load(source, split)
    datasets.check(data, bundle.input_shape, bundle.num_classes)
    return data


def cmd_export(args) -> int:
    exporters = _desktop()
    out = exporters.export(args.out, rule=args.rule, model=args.model, data=args.data, blocks=args.blocks,
                           width=args.width, embedding=args.embedding, embed_dim=args.embed_dim,
                           batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, head_lr=args.head_lr,
                           weight_decay=args.weight_decay, eta=args.eta, seed=args.seed, force=args.force,
                           progress=not args.quiet)
    print(f"wrote {out}")
    return 0


def cmd_validate(args) -> int:
    _desktop()
    from .exporters.validate import validate
    report = validate(args.bundle, args.data, steps=args.steps, device=args.reference_device, tol=args.tol,
                      seed=args.seed, progress=not args.quiet)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        lock, free = report["lockstep"], report["free_running"]
        print(f"{report['steps']} steps per unit, onnxruntime vs torch on {report['device']}")
        print(f"  lock-step     largest difference {lock['max_abs_diff']:.3g} in {lock['worst']} "
              f"(tolerance {args.tol:g})")
        print(f"  free-running  largest difference {free['max_abs_diff']:.3g} in {free['worst']} "
              f"(allowed {free['allowed']:.3g})")
        print(f"  torch vs torch with inputs nudged by one ulp: {report['torch_sensitivity']:.3g}")
    if not report["ok"]:
        print("validate: FAILED: the runtime and the torch reference disagree", file=sys.stderr)
        return 1
    return 0


def cmd_train(args) -> int:
    from .trainer import TrainConfig, Trainer, epoch_losses
    bundle = bundles.load(args.bundle)
    data = _data(bundle, args.data, "train")
    config = TrainConfig(epochs=args.epochs, order=args.order, seed=args.seed, lr=args.lr, head_lr=args.head_lr,
                         lr_schedule=args.lr_schedule, checkpoint_every=args.checkpoint_every,
                         checkpoint_seconds=args.checkpoint_seconds).check()
    trainer = Trainer(bundle, _engine(args), data, config)
    ckpt = bundle.checkpoint_path()
    if args.resume:
        trainer.resume()
    elif ckpt.exists() and not args.restart:
        raise EdgepropError(f"{ckpt} already exists; pass --resume to continue it, or --restart to train "
                            f"from the initial weights (it is replaced at the first new checkpoint)")
    trainer.run(progress=not args.quiet)
    last = {unit: means[-1] for unit, means in epoch_losses(trainer.history).items() if means}
    print(f"trained {trainer.done} steps; last epoch's mean loss: "
          + ", ".join(f"{unit} {loss:.3g}" for unit, loss in last.items()))
    print(f"checkpoint: {ckpt}")
    return 0


def cmd_eval(args) -> int:
    from .trainer import evaluate, load_trained_state
    bundle = bundles.load(args.bundle)
    data = _data(bundle, args.data, "test")
    state, meta = load_trained_state(bundle)
    if not meta:
        print(f"note: {bundle.checkpoint_path()} not found; evaluating the untrained initial weights", file=sys.stderr)
    report = evaluate(bundle, _engine(args), data, state, seed=args.seed, runs=args.runs)
    report["trained_steps"] = int(meta.get("done", 0))
    if args.json:
        print(json.dumps(report))
    else:
        blocks = " ".join(f"{a:.3f}" for a in report["per_block_accuracy"])
        print(f"test accuracy {report['accuracy']:.4f} on {report['n']} samples ({args.runs} inference run(s))")
        print(f"per-block accuracy (each û_t alone): {blocks}")
    return 0


def cmd_info(args) -> int:
    from .storage import load_arrays
    bundle = bundles.load(args.bundle)
    m = bundle.manifest
    n_params = sum(u.n_params for u in bundle.units)
    print(f"bundle     {bundle.root} (schema {m['schema_version']}, id {bundle.id})")
    print(f"rule       {bundle.rule}: {len(bundle.blocks)} blocks + head, {bundle.model['embedding']} embedding "
          f"(d={bundle.model['embed_dim']})")
    print(f"model      {bundle.model['kind']} width {bundle.model['width']}, input {bundle.input_shape}, "
          f"{bundle.num_classes} classes, {n_params:,} parameters")
    print(f"training   batch {bundle.batch_size}, {bundle.optimizer['name']} lr {bundle.blocks[0].lr:g} "
          f"(head {bundle.head.lr:g}), "
          f"eta {bundle.schedule.eta:g}")
    print("weights    " + " ".join(f"{w:.3g}" for w in bundle.schedule.weights))
    for key, g in bundle.graphs.items():
        size = bundle.graph_path(key).stat().st_size
        print(f"graph      {key:12s} {g.file} ({size / 1024:.0f} KiB, {len(g.inputs)} inputs)")
    ckpt = bundle.checkpoint_path()
    if ckpt.exists():
        from .trainer import epoch_losses
        _, meta = load_arrays(ckpt)
        print(f"checkpoint {ckpt}: {meta.get('done')}/{meta.get('total')} steps "
              f"({meta.get('order')}, seed {meta.get('seed')})")
        history = epoch_losses(meta.get("history", {}))
        for unit in bundle.units:
            means = history.get(unit.name)
            if means:
                print(f"  {unit.name:8s} mean loss, epoch 1: {means[0]:.3g}  epoch {len(means)}: {means[-1]:.3g}")
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
    out = args.out or bundle.root / "losses.png"
    print(f"wrote {loss_curves(bundle, epoch_losses(meta['history']), out)}")
    return 0


def _desktop():
    try:
        from . import exporters
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

    e = sub.add_parser("export", help="export a model as a bundle of per-block training graphs (desktop)")
    e.add_argument("--rule", default="noprop-dt")
    e.add_argument("--model", default="mlp")
    e.add_argument("--data", default="digits", help="digits, an .npz file, or an IDX folder")
    e.add_argument("--out", required=True)
    e.add_argument("--blocks", type=int, default=10, help="T, the number of NoProp blocks")
    e.add_argument("--width", type=int, default=128)
    e.add_argument("--embedding", default="one-hot", choices=["one-hot", "orthogonal"])
    e.add_argument("--embed-dim", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=64, help="fixed batch size of the step graphs")
    e.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    e.add_argument("--lr", type=float, default=1e-3, help="blocks' learning rate")
    e.add_argument("--head-lr", type=float, default=1e-2,
                   help="the linear head's learning rate (a trivial classifier on z_T: it can go faster)")
    e.add_argument("--weight-decay", type=float, default=1e-3)
    e.add_argument("--eta", type=float, default=0.1)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--force", action="store_true", help="replace an existing bundle and its checkpoints")
    common(e, engine=False)
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("validate", help="train with the runtime and the torch reference; compare (desktop)")
    v.add_argument("bundle")
    v.add_argument("--data", default="digits")
    v.add_argument("--steps", type=int, default=50, help="optimizer steps per unit")
    v.add_argument("--reference-device", default="cpu", help="cpu or cuda")
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
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from the bundle's checkpoint")
    g.add_argument("--restart", action="store_true", help="start over although a checkpoint exists")
    common(t)
    t.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="test accuracy of the trained bundle (no torch)")
    ev.add_argument("bundle")
    ev.add_argument("--data", default="digits")
    ev.add_argument("--runs", type=int, default=1, help="stochastic inference runs to average")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", action="store_true")
    common(ev)
    ev.set_defaults(func=cmd_eval)

    pl = sub.add_parser("plot", help="plot each unit's loss per epoch to a PNG (needs matplotlib)")
    pl.add_argument("bundle")
    pl.add_argument("--out", default=None, help="default: BUNDLE/losses.png")
    pl.set_defaults(func=cmd_plot)

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
    except OSError as e:  # disk full, permission denied, ...: say so without a traceback
        print(f"edgeprop {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgeprop {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
