"""NoProp-DT against back-prop on the full Fashion-MNIST, at equal epochs.

    python bench/noprop_fashion.py [--epochs 10,40,100] [--seeds 3] [--rules noprop-dt,backprop,mono-forward,local]
                                   [--out bench/results/noprop_fashion.json]

Every row: export on the desktop, then train and evaluate in a fresh process without torch
(onnxruntime, one thread), 60,000 training and 10,000 test images, the MLPs of
bench/rules.py (width 128). At the smallest epoch count every rule runs --seeds seeds (the
export's initial weights and the trainer's batch order and noise differ per seed); larger
budgets run seed 0. NoProp-DT rows carry the mean chain's accuracy (`accuracy`, the
default), the paper's sampled chain's (`accuracy_sampled`), and each block's accuracy along
both chains. Written: the JSON rows, a summary of mean ± spread per rule and budget, and a
PNG of accuracy against epochs (matplotlib). Targets (reported, not asserted): NoProp-DT MLP
within 0.5 points of back-prop at every budget.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import rules as rules_bench  # bench/rules.py: the script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]


def summary(rows: list[dict]) -> list[dict]:
    import numpy as np
    out = []
    for key in sorted({(r["rule"], r["epochs"]) for r in rows if "error" not in r}):
        group = [r for r in rows if (r["rule"], r["epochs"]) == key and "error" not in r]
        acc = np.array([r["accuracy"] for r in group])
        entry = {"rule": key[0], "epochs": key[1], "seeds": len(group), "accuracy_mean": float(acc.mean()),
                 "accuracy_spread": float(acc.max() - acc.min()),
                 "train_seconds_mean": float(np.mean([r["train_seconds"] for r in group]))}
        if "accuracy_sampled" in group[0]:
            entry["accuracy_sampled_mean"] = float(np.mean([r["accuracy_sampled"] for r in group]))
        out.append(entry)
    return out


def plot(table: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for rule in sorted({t["rule"] for t in table}):
        pts = sorted((t["epochs"], t["accuracy_mean"]) for t in table if t["rule"] == rule)
        ax.plot(*zip(*pts), marker="o", label=rule)
        if rule == "noprop-dt":
            pts = sorted((t["epochs"], t["accuracy_sampled_mean"]) for t in table if t["rule"] == rule)
            ax.plot(*zip(*pts), marker="x", linestyle="--", label="noprop-dt, sampled chain")
    ax.set(xscale="log", xlabel="epochs", ylabel="test accuracy", title="Fashion-MNIST, MLP width 128")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", default="10,40,100")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rules", default="noprop-dt,backprop,mono-forward,local")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "noprop_fashion.json"))
    args = p.parse_args()
    if not rules_bench.FASHION.is_dir():
        print(f"{rules_bench.FASHION} not found: apt install dataset-fashion-mnist", file=sys.stderr)
        return 1
    budgets = sorted(int(e) for e in args.epochs.split(","))
    out, rows = Path(args.out), []
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for epochs in budgets:
        for seed in range(args.seeds if epochs == budgets[0] else 1):
            for rule in args.rules.split(","):
                options, _, note = rules_bench.RULES[rule]
                row = rules_bench.measure(rule, "fashion", {**options, "seed": seed}, note, epochs, seed)
                rows.append({**row, "seed": seed})
                sampled = f" (sampled chain {row['accuracy_sampled']:.4f})" if "accuracy_sampled" in row else ""
                print(f"{epochs:4d} epochs seed {seed} {rule:14s} {row['accuracy']:.4f}{sampled}  "
                      f"{row['train_seconds']:.0f} s", flush=True)
                table = summary(rows)  # written after every row: a long run keeps what it measured
                out.write_text(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                                           "wall_seconds": time.perf_counter() - t0, "summary": table,
                                           "rows": rows}, indent=1) + "\n")
    plot(summary(rows), out.with_suffix(".png"))
    for t in summary(rows):
        print(f"{t['rule']:14s} {t['epochs']:4d} epochs  {100 * t['accuracy_mean']:.2f}% "
              f"± {100 * t['accuracy_spread'] / 2:.2f} ({t['seeds']} seeds)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
