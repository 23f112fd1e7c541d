"""`edgeprop plot`: each unit's loss per epoch, as a PNG (needs matplotlib)."""
from __future__ import annotations

from edgeprop import bundle as bundles
from edgeprop.errors import EdgepropError

HELP = "plot each unit's loss per epoch to a PNG (needs matplotlib)"


def add_arguments(pl) -> None:
    pl.add_argument("bundle")
    pl.add_argument("--out", default=None, help="default: BUNDLE/losses.png")


def run(args) -> int:
    from edgeprop.trainer import epoch_losses, load_trained_state

    from .charts import loss_curves
    bundle = bundles.load(args.bundle)
    _, meta = load_trained_state(bundle)
    if not meta.get("history"):
        raise EdgepropError(f"{bundle.checkpoint_path()}: no training history to plot (train first)")
    out = args.out or bundle.root / "losses.png"
    from edgeprop.trainer import load_eval
    print(f"wrote {loss_curves(bundle, epoch_losses(meta['history']), out, load_eval(bundle))}")
    return 0
