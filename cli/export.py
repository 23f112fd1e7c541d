"""`edgeprop export`: a model as a bundle of per-block training graphs (desktop, torch)."""
from __future__ import annotations

import json

from edgeprop.errors import EdgepropError

from . import shared

HELP = "export a model as a bundle of per-block training graphs (desktop)"

# Rule-specific flags (dest names): passed to the exporter only when given.
RULE_OPTIONS: list[str] = ["threshold", "zo_eps", "zo_directions", "zo_layers", "init", "inference_steps", "dropout",
                           "batchnorm", "temperature", "trainable", "device"]


def add_arguments(e) -> None:
    e.add_argument("--rule", default="noprop-dt",
                   help="noprop-dt (default), local, mono-forward, backprop, forward-forward, zeroth-order, "
                        "noprop-ct, noprop-fm")
    e.add_argument("--model", default="mlp",
                   help="mlp (flat inputs), cnn (NoProp-DT: the paper's conv block, for images), or your own "
                        "model: FILE.py:FUNCTION (FUNCTION() returns a torch.nn.Module) or FILE.pt2 "
                        "(an ExportedProgram) for local, backprop and zeroth-order")
    e.add_argument("--weights", default=None, metavar="STATE_DICT.pt",
                   help="pretrained weights for --model FILE.py:FUNCTION (a state dict; loaded with "
                        "torch.load(weights_only=True))")
    e.add_argument("--trainable", default=None,
                   help="your own model: what trains: all (default), bias, bn (BatchNorm affine), last:K (the "
                        "last K layers with parameters), or comma-separated globs of parameter names; the rest "
                        "are constants with no gradient and no optimizer state; auto (with --device): the largest "
                        "set, from the output backwards, whose memory plan fits the device")
    e.add_argument("--device", default=None,
                   help="--trainable auto: the device profile the plan must fit (see `edgeprop devices`)")
    e.add_argument("--data", default="digits", help="digits, an .npz file, or an IDX folder")
    e.add_argument("--out", required=True)
    e.add_argument("--blocks", default=None,
                   help="noprop-dt: T, the number of blocks (default 10); local: every-layer (default), none, "
                        "or the layer indices where blocks start, e.g. 0,2; your own model: the modules where "
                        "units start, e.g. layer2,layer3,fc")
    e.add_argument("--width", type=int, default=None, help="hidden width (default: 128 for mlp, 256 for cnn)")
    e.add_argument("--depth", type=int, default=2, help="hidden layers of the mlp for sequential rules (default: 2)")
    e.add_argument("--embedding", default="one-hot", choices=["one-hot", "orthogonal", "learned", "prototype"],
                   help="NoProp's label embedding W_embed: fixed one-hot or orthogonal; learned (d 20 unless "
                        "--embed-dim) or prototype (image-sized), trained with the head (NoProp-DT)")
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
    shared.add_inference_options(e, "the bundle's default for eval; default 0, the mean chain")
    e.add_argument("--tflite", action="store_true",
                   help="also write every graph as .tflite for --engine litert (needs edgeprop[tflite])")
    e.add_argument("--fused-step", action="store_true",
                   help="also write one step graph that steps every unit of an interleaved batch in one call "
                        "(train --fused-step: fewer engine calls, every unit's activations in memory at once)")
    e.add_argument("--ort-training", action="store_true",
                   help="also write onnxruntime-training artifacts for --engine ort-training "
                        "(needs scripts/engine-venv.sh ort-training)")
    e.add_argument("--force", action="store_true", help="replace an existing bundle and its checkpoints")
    shared.add_quiet(e)


def blocks(text: str | None):
    """--blocks: NoProp-DT's T (a number); sequential rules: every-layer, none, or layer
    indices where blocks start ("0,2,4")."""
    if text is None or text in ("every-layer", "none"):
        return text
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        if all(part.strip() for part in text.split(",")):
            return [part.strip() for part in text.split(",")]  # module names
        raise EdgepropError(f"--blocks {text}: a number, every-layer, none, or comma-separated layer indices") from None
    return values[0] if len(values) == 1 and "," not in text else values


def run(args) -> int:
    exporters = shared.desktop()
    args.temperature = shared.inference_temperature(args)
    rule_options = {k: getattr(args, k) for k in RULE_OPTIONS if getattr(args, k) is not None}
    units = blocks(args.blocks)
    if args.rule != "noprop-dt" and isinstance(units, int):
        units = [units]  # one index: where the second block starts
    model = args.model
    if model not in ("mlp", "cnn"):
        from edgeprop.exporters import user_model
        if not user_model.is_user_model(model):
            raise EdgepropError(f"--model {model}: mlp, cnn, FILE.py:FUNCTION or FILE.pt2")
        model = user_model.load(model, args.weights)
    elif args.weights is not None:
        raise EdgepropError("--weights loads a state dict into --model FILE.py:FUNCTION; the built-in models "
                            "start from random weights")
    out = exporters.export(args.out, rule=args.rule, model=model, data=args.data, blocks=units,
                           width=args.width, depth=args.depth, embedding=args.embedding, embed_dim=args.embed_dim,
                           batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, head_lr=args.head_lr,
                           weight_decay=args.weight_decay, eta=args.eta, seed=args.seed, tflite=args.tflite,
                           ort_training=args.ort_training, fused_step=args.fused_step, force=args.force,
                           progress=not args.quiet, **rule_options)
    auto = json.loads((out / "manifest.json").read_text())["model"].get("trainable_auto")
    if auto:
        print(auto["message"])
    print(f"wrote {out}")
    return 0
