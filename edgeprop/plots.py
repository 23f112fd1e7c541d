"""Pictures a person would rather look at than read. Needs matplotlib (the `plot` extra);
nothing else in edgeprop imports this module."""
from __future__ import annotations

from pathlib import Path

from .bundle import Bundle
from .errors import EdgepropError


def loss_curves(bundle: Bundle, history: dict[str, list[float]], out: Path) -> Path:
    """One line per unit: its mean loss per epoch (log scale), blocks shaded noise → clean."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise EdgepropError("plotting needs matplotlib: pip install 'edgeprop[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    cmap = plt.get_cmap("viridis")
    for unit in bundle.units:
        means = history.get(unit.name, [])
        if not means:
            continue
        epochs = range(1, len(means) + 1)
        if unit.role == "head":
            ax.plot(epochs, means, color="black", linestyle="--", label="head (cross-entropy)")
        else:
            ax.plot(epochs, means, color=cmap(unit.t / len(bundle.blocks)), label=f"block {unit.t}")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training loss (block t: weighted ‖û − u_y‖²)")
    ax.set_title(f"{bundle.rule}: loss per unit")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
