"""Each graph of a bundle alone, native against onnxruntime: microseconds per run.

    python bench/native_steps.py [--batch 32] [--runs 200] [--out bench/results/native_steps.json]

Exports the digits NoProp-DT MLP (10 blocks of width 128 + head) at --batch, feeds every
graph the initial state and the same random inputs on both engines (one thread), and
reports the median of 5 timings of --runs runs each, and the largest output difference.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def feeds_for(bundle, key, rng) -> dict:
    spec = bundle.graphs[key]
    unit = next(u for u in bundle.units if key in (u.step_graph, u.infer_graph))
    state, _ = bundle.initial_state()
    fixed = {"lr": 1e-3, "step": 3.0, "loss_scale": 0.5}
    return {t.name: state[unit.name][t.name] if t.name in state[unit.name]
            else np.array(fixed[t.name], t.dtype) if t.name in fixed
            else np.ones(t.shape, t.dtype) if t.name == "mask"
            else rng.standard_normal(t.shape).astype(t.dtype) for t in spec.inputs}


def timed(graph, feeds, runs: int) -> float:
    graph.run(feeds)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(runs):
            graph.run(feeds)
        times.append((time.perf_counter() - t0) / runs)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "native_steps.json"))
    args = p.parse_args()
    from edgeprop import bundle as bundles
    from edgeprop.exporters import export
    from edgeprop.runtimes import get_engine
    engines = {name: get_engine(name, threads=1) for name in ("onnxruntime", "native")}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        b = bundles.load(export(Path(tmp) / "digits", batch_size=args.batch, progress=False))
        rng = np.random.default_rng(0)
        for key in sorted(b.graphs):
            feeds = feeds_for(b, key, rng)
            graphs = {name: b.load_graph(e, key) for name, e in engines.items()}
            outs = {name: g.run(feeds) for name, g in graphs.items()}
            rows[key] = {f"{name}_us": timed(g, feeds, args.runs) * 1e6 for name, g in graphs.items()}
            rows[key]["max_abs_diff"] = max(float(np.abs(outs["native"][n] - outs["onnxruntime"][n]).max())
                                            for n in outs["native"])
            rows[key].update({k: graphs["native"].info[k] for k in ("products_on_blas", "transposes_folded",
                                                                     "elementwise_fused", "blas")})
            print(f"{key}: native {rows[key]['native_us']:.0f} us, onnxruntime {rows[key]['onnxruntime_us']:.0f} us",
                  file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"batch": args.batch, "threads": 1, "graphs": rows}, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
