"""The fused step graph against one call per unit, in one process: CPU time per batch.

    python bench/fused_step.py [--batches 1,32] [--rounds 7] [--per-round 20]
                               [--engines onnxruntime,native] [--out bench/results/fused_step.json]

Exports the digits NoProp-DT MLP (10 blocks of width 128 + head) with --fused-step at each
batch size, then for each engine keeps two trainers on the same bundle (train's per-unit
path and train --fused-step) and alternates them, --rounds rounds of --per-round batches
each, one thread; reported: CPU microseconds per batch (median of the rounds), for the
whole trainer step (feeds drawn, engine called, state written back) and for the engine
calls alone (the same feeds, captured once). CPU time, not wall time: on a shared machine
the wall clock counts the others' time too. bench/engines.py gives the same comparison as
samples/s in fresh processes, beside torch.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def per_batch(fn, first: int, count: int) -> float:
    """CPU microseconds per call of fn(j), j = first .. first + count - 1."""
    c0 = time.process_time()
    for j in range(first, first + count):
        fn(j)
    return (time.process_time() - c0) / count * 1e6


def measure(bundle_path: str, engine: str, rounds: int, per_round: int) -> dict:
    import numpy as np

    from edgeprop import bundle as bundles
    from edgeprop import datasets
    from edgeprop.runtimes import get_engine
    from edgeprop.trainer import TrainConfig, Trainer
    b, data = bundles.load(bundle_path), datasets.load("digits", "train")
    units = len(b.units)
    trainers = {fused: Trainer(b, get_engine(engine, threads=1), data, TrainConfig(epochs=1000, fused=fused))
                for fused in (False, True)}

    def trainer_batch(fused: bool):
        t = trainers[fused]

        def run(j: int) -> None:
            i = (j + 2) * units  # batch j + 2: two warm-up batches first
            if fused:
                t.fused_step(i)
            else:
                for k in range(units):
                    t.step(i + k)
        return run

    for fused in (False, True):
        for j in (-2, -1):
            trainer_batch(fused)(j)
    # The engine calls alone: each unit's graph on its feeds, or the fused graph on all of them.
    fused_graph, spec = trainers[True].fused, b.fused
    captured = {}
    for index, unit in enumerate(b.units):
        own = {**trainers[False].state[unit.name], **trainers[False].rule.feeds(index, 0, 0),
               "lr": 1e-3, "step": 1.0}
        captured[unit.name] = {k: np.asarray(v, np.float32) for k, v in own.items()}
    fused_feeds = {(k if k in spec.shared else spec.name(u, k)): v for u, own in captured.items()
                   for k, v in own.items()}
    graphs = trainers[False].graphs

    def units_alone(_: int) -> None:
        for unit in b.units:
            graphs[unit.step_graph].run(captured[unit.name])

    def fused_alone(_: int) -> None:
        fused_graph.run(fused_feeds)

    fns = {"trainer_per_unit": trainer_batch(False), "trainer_fused": trainer_batch(True),
           "engine_per_unit": units_alone, "engine_fused": fused_alone}
    rows = {name: [] for name in fns}
    for r in range(rounds):  # alternating round by round, so a change of load lands on all four
        for name, fn in fns.items():
            rows[name].append(per_batch(fn, r * per_round, per_round))
    out = {name: sorted(t)[len(t) // 2] for name, t in rows.items()}
    out["trainer_speedup"] = out["trainer_per_unit"] / out["trainer_fused"]
    out["engine_speedup"] = out["engine_per_unit"] / out["engine_fused"]
    out["rounds_cpu_us"] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--engines", default="onnxruntime,native")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--per-round", type=int, default=20, help="batches per timed round")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fused_step.json"))
    args = ap.parse_args()
    from edgeprop.exporters import export
    results = {"machine": {"platform": platform.platform()}, "threads": 1, "unit": "CPU microseconds per batch",
               "model": "noprop-dt digits MLP, 10 blocks of width 128 + head"}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in map(int, args.batches.split(",")):
            print(f"export: batch {batch} ...", file=sys.stderr)
            bundle = export(Path(tmp) / f"b{batch}", batch_size=batch, fused_step=True, progress=False)
            for engine in args.engines.split(","):
                print(f"{engine}, batch {batch} ...", file=sys.stderr)
                row = measure(str(bundle), engine, args.rounds, args.per_round)
                results[f"{engine}_batch{batch}"] = row
                print(f"{engine} batch {batch}: per unit {row['trainer_per_unit']:,.0f} us, fused "
                      f"{row['trainer_fused']:,.0f} us per batch ({row['trainer_speedup']:.2f}x); engine calls "
                      f"alone {row['engine_per_unit']:,.0f} vs {row['engine_fused']:,.0f} us "
                      f"({row['engine_speedup']:.2f}x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
