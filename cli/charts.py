"""Pictures a person would rather look at than read. Needs matplotlib (the `plot` extra);
nothing else in edgeprop imports this module."""
from __future__ import annotations

from pathlib import Path

from edgeprop.bundle import Bundle
from edgeprop.errors import EdgepropError


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgepropError("plotting needs matplotlib: pip install 'edgeprop[plot]'") from None
    return plt


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    fig.clf()
    return out


def _check_png(out) -> None:
    """A chart goes to a .png, never over one of the bundle's own files by a slip of --out."""
    if Path(out).suffix.lower() != ".png":
        raise EdgepropError(f"--out {out}: charts are written as .png files; give a path ending in .png")


def loss_curves(bundle: Bundle, history: dict[str, list[float]], out: Path, evaluation: dict | None = None) -> Path:
    """One line per unit: its mean loss per epoch (log scale), blocks shaded noise → clean.
    With an evaluation (the checkpoint's last `edgeprop eval`), a second panel: each unit's
    test accuracy along the chain, for each chain evaluated (NoProp: mean and sampled)."""
    _check_png(out)
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    curves = _per_unit_curves(evaluation) if evaluation else {}
    if curves:
        fig, (ax, acc) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120, gridspec_kw={"width_ratios": [3, 2]})
        for label, values in curves.items():
            acc.plot(range(1, len(values) + 1), values, marker="o", label=label)
        acc.xaxis.set_major_locator(MaxNLocator(integer=True))
        acc.set_xlabel("block t" if bundle.rule == "noprop-dt" else "unit")
        acc.set_ylabel(f"test accuracy ({evaluation.get('n')} samples)")
        acc.set_title("per-unit accuracy along the chain")
        acc.legend(fontsize=7)
        acc.grid(alpha=0.3)
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    cmap = plt.get_cmap("viridis")
    for k, unit in enumerate(bundle.units):
        means = history.get(unit.name, [])
        if not means:
            continue
        epochs = range(1, len(means) + 1)
        if unit.role == "head":
            ax.plot(epochs, means, color="black", linestyle="--", label="head (cross-entropy)")
        else:
            ax.plot(epochs, means, color=cmap((k + 1) / len(bundle.units)), label=unit.name)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training loss" + (" (block t: weighted ‖û − u_y‖²)" if bundle.rule == "noprop-dt" else ""))
    ax.set_title(f"{bundle.rule}: loss per unit")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    out = _save(fig, out)
    plt.close(fig)
    return out


def _per_unit_curves(report: dict) -> dict[str, list[float]]:
    """{label: per-unit accuracies} from an eval report (NoProp-DT: each chain's)."""
    if "per_unit_accuracy" not in report:
        return {}
    tau = report.get("temperature")
    if tau is None:
        return {"per unit": report["per_unit_accuracy"]}
    names = {0.0: "mean", 1.0: "sampled"}
    curves = {f"{names.get(tau, 'the evaluated')} chain (τ {tau:g})": report["per_unit_accuracy"]}
    for value, name in names.items():
        if tau != value and f"per_unit_accuracy_{name}" in report:
            curves[f"{name} chain (τ {value:g})"] = report[f"per_unit_accuracy_{name}"]
    return curves


def memory_bars(plan, verdict, out: Path, title: str = "") -> Path:
    """Stacked bars of each unit's working set while it steps (state held, engine arenas,
    batch), end-to-end back-prop's beside them, and the budget as a line."""
    _check_png(out)
    plt = _pyplot()
    mib = 1 / 2**20
    names = [u.name for u in plan.units] + ["back-prop"]
    bp = plan.backprop
    parts = {  # what each bar is made of, bottom to top
        "weights + optimizer state": [u.held for u in plan.units] + [bp["state"]],
        "engine arenas (activations, gradient, update)":
            [u.working_set - u.batch - u.held for u in plan.units] + [bp["engine"]],
        "batch": [u.batch for u in plan.units] + [bp["batch"]],
    }
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names) + 2), 4.5), dpi=120)
    bottom = [0.0] * len(names)
    for (label, values), color in zip(parts.items(), ("#4c72b0", "#dd8452", "#55a868")):
        ax.bar(names, [v * mib for v in values], bottom=bottom, label=label, color=color)
        bottom = [b + v * mib for b, v in zip(bottom, values)]
    if verdict is not None and verdict.what.startswith("working set"):
        ax.axhline(verdict.budget * mib, color="crimson", linestyle="--", label=f"budget ({verdict.what})")
    elif verdict is not None:
        ax.axhline((verdict.budget - (plan.runtime or 0) - plan.data) * mib, color="crimson", linestyle="--",
                   label="device budget less runtime and data")
    ax.set_ylabel("MiB")
    ax.set_title(title or f"{plan.rule}, batch {plan.batch}: memory while each unit steps")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    out = _save(fig, out)
    plt.close(fig)
    return out


def accuracy_per_round(report: dict, out: Path) -> Path:
    """A fleet's test accuracy after each round (`edgeprop fleet simulate --plot`)."""
    _check_png(out)
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    rounds = [e["round"] for e in report["history"]]
    ax.plot(rounds, [e["accuracy"] for e in report["history"]], marker="o")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (global state)")
    s = report["settings"]
    ax.set_title(f"{report['rule']}: {report['clients']} clients, {s['assign']}, {s['strategy']}")
    ax.grid(alpha=0.3)
    out = _save(fig, out)
    plt.close(fig)
    return out
