"""`edgeprop train`: train a bundle on the device (no torch)."""
from __future__ import annotations

import shutil

from edgeprop import bundle as bundles
from edgeprop import lock
from edgeprop.errors import EdgepropError
from edgeprop.sizes import format_size as fmt
from edgeprop.state import STREAM_FOLDER

from . import shared

HELP = "train a bundle on the device (no torch)"


def add_arguments(t) -> None:
    t.add_argument("bundle")
    shared.add_data(t)
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--order", default="interleaved", choices=["interleaved", "block-sequential"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--lr", type=float, default=None, help="blocks' learning rate (default: the bundle's)")
    t.add_argument("--head-lr", type=float, default=None, help="the head's learning rate (default: the bundle's)")
    t.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    t.add_argument("--checkpoint-every", type=int, default=None, help="updates between checkpoints")
    t.add_argument("--checkpoint-seconds", type=float, default=60.0,
                   help="at most this long between checkpoints (default: 60; resuming is exact either way)")
    t.add_argument("--holdout", type=float, default=0.0,
                   help="share of the training data kept out of training as a validation split (the same every "
                        "time) for eval --predict-with best, e.g. 0.1")
    shared.add_budget(t, "refuse to start unless the plan's working set fits, e.g. 48MB; stop if it is exceeded")
    shared.add_device(t, "refuse to start unless training fits this device's profile")
    t.add_argument("--stream", action="store_true",
                   help="keep units that are not stepping in memory-mapped files, not RAM")
    t.add_argument("--fused-step", action="store_true",
                   help="step every unit of a batch in one engine call with the bundle's fused step graph "
                        "(export --fused-step; interleaved order; onnxruntime or native)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from the bundle's checkpoint")
    g.add_argument("--restart", action="store_true", help="start over although a checkpoint exists")
    shared.add_quiet(t)
    shared.add_engine(t)


def run(args) -> int:
    from edgeprop.trainer import TrainConfig, Trainer, epoch_losses
    bundle = bundles.load(args.bundle)
    data = shared.data(bundle, args.data, "train")
    budget, device = shared.limits(args)
    # A device bounds the whole process: the trainer gives the working set what is left once
    # it has measured the runtime and data.
    config = TrainConfig(epochs=args.epochs, order=args.order, seed=args.seed, lr=args.lr, head_lr=args.head_lr,
                         lr_schedule=args.lr_schedule, checkpoint_every=args.checkpoint_every,
                         checkpoint_seconds=args.checkpoint_seconds, stream=args.stream, budget=budget,
                         holdout=args.holdout, fused=args.fused_step,
                         device_budget=device.budget if device is not None else None).check()
    ckpt = bundle.checkpoint_path()
    if args.resume and not ckpt.is_file():
        raise EdgepropError(f"{ckpt}: no checkpoint to resume from")
    if not args.resume and ckpt.exists() and not args.restart:
        raise EdgepropError(f"{ckpt} already exists; pass --resume to continue it, or --restart to train "
                            f"from the initial weights (it is replaced at the first new checkpoint)")
    if budget is not None or device is not None:  # before any state is loaded or written
        from edgeprop.memory import refusal
        from edgeprop.runtimes import memory_model
        engine = memory_model(args.engine, device and device.arch)
        why = refusal(bundle, budget, device, stream=args.stream, engine=engine, data_bytes=data.nbytes,
                      vector_width=shared.vector_width(args, device), fused=args.fused_step)
        if why:
            raise EdgepropError(why)
    bundle.check_writable()
    with lock.held(bundle.root, "train it"):  # one run per bundle: a second refuses at once
        # A killed --stream run leaves its working copy of the state; the checkpoint holds it all.
        shutil.rmtree(bundle.path(STREAM_FOLDER), ignore_errors=True)
        trainer = Trainer(bundle, shared.engine(args), data, config)
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
