"""AdamW's element-wise chain on onnxruntime: how many full-size nodes, how long, how exact.

    python bench/optimizer_ops.py [--n 60426] [--runs 300] [--out bench/results/optimizer_ops.json]

Traces one AdamW step over a flat buffer of --n floats (default: the digits NoProp-DT MLP
block's parameters, width 128) the way a step graph carries it (exporters/trace.py: make_fx,
then torch.onnx), in two arithmetics:
  torch_order  torch.optim.AdamW's order of operations, as step graphs carried it before
  shipped      exporters/optim.py's Optimizer.update: the same step with its scalars folded,
               sqrt(v)/sqrt(b2) + eps written as (sqrt(v) + eps*sqrt(b2))/sqrt(b2), its
               1/sqrt(b2) merged into the step size, and m as torch's lerp, m + (g - m)(1 - beta1)
and reports for each the nodes writing a full-size tensor, onnxruntime's microseconds per
run (one thread, CPU time, median of 5 alternating timings of --runs runs), and after 50 steps from the same
gradients the largest difference from torch.optim.AdamW.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LR, WD, BETAS, EPS = 1e-3, 1e-3, (0.9, 0.999), 1e-8


def shipped(p, g, m, v, lr, step):
    from edgeprop.exporters.optim import Optimizer
    p, slots = Optimizer("adamw", weight_decay=WD).update(p, g, {"m": m, "v": v}, lr, step)
    return p, slots["m"], slots["v"]


def torch_order(p, g, m, v, lr, step):
    import torch
    b1, b2 = BETAS
    p = p * (1 - lr * WD)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    bias1 = 1 - torch.pow(torch.tensor(b1), step)
    bias2 = 1 - torch.pow(torch.tensor(b2), step)
    p = p - (lr / bias1) * m / (torch.sqrt(v) / torch.sqrt(bias2) + EPS)
    return p, m, v


def traced(fn, n: int, path: Path):
    import onnx
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    from edgeprop.exporters.trace import onnx_model
    args = [torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.tensor(LR), torch.tensor(1.0)]
    model = onnx_model(make_fx(fn)(*args), args, ["param", "grad", "opt.m", "opt.v", "lr", "step"],
                       ["next.param", "next.opt.m", "next.opt.v"])
    onnx.save_model(model, str(path))
    inferred = onnx.shape_inference.infer_shapes(model)
    sizes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
             for v in [*inferred.graph.value_info, *inferred.graph.output]}
    full = [node.op_type for node in model.graph.node if any(sizes.get(o) == [n] for o in node.output)]
    return full, len(model.graph.node)


def timed(sessions: dict, feeds: dict, runs: int, rounds: int = 5) -> dict[str, float]:
    """CPU microseconds per run of each session (one thread: on a shared machine the wall clock
    counts the others' time too), the median of `rounds`, the sessions alternating."""
    times = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            session.run(None, feeds)
            c0 = time.process_time()
            for _ in range(runs):
                session.run(None, feeds)
            times[name].append((time.process_time() - c0) / runs * 1e6)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def torch_gap(session, n: int, steps: int = 50) -> float:
    """Largest difference from torch.optim.AdamW after `steps` steps on the same gradients."""
    import torch
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) * 1e-2 for _ in range(steps)]
    ref = torch.nn.Parameter(torch.tensor(p0))
    opt = torch.optim.AdamW([ref], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    p, m, v = p0, np.zeros(n, np.float32), np.zeros(n, np.float32)
    for k, g in enumerate(grads, 1):
        ref.grad = torch.tensor(g)
        opt.step()
        p, m, v = session.run(None, {"param": p, "grad": g, "opt.m": m, "opt.v": v,
                                     "lr": np.array(LR, np.float32), "step": np.array(k, np.float32)})
    return float(np.abs(p - ref.detach().numpy()).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=60426, help="floats in the buffer (default: a digits MLP block's)")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "optimizer_ops.json"))
    args = ap.parse_args()
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # edgeprop's default
    rng = np.random.default_rng(1)
    feeds = {"param": rng.standard_normal(args.n).astype(np.float32),
             "grad": rng.standard_normal(args.n).astype(np.float32),
             "opt.m": rng.standard_normal(args.n).astype(np.float32) * 1e-2,
             "opt.v": rng.random(args.n).astype(np.float32) * 1e-4,
             "lr": np.array(LR, np.float32), "step": np.array(7.0, np.float32)}
    results = {"n": args.n, "runs": args.runs, "threads": 1}
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("torch_order", torch_order), ("shipped", shipped)):
            full, nodes = traced(fn, args.n, Path(tmp) / f"{name}.onnx")
            sessions[name] = ort.InferenceSession(str(Path(tmp) / f"{name}.onnx"), opts,
                                                  providers=["CPUExecutionProvider"])
            results[name] = {"full_size_nodes": len(full), "ops": full, "nodes": nodes,
                             "max_gap_vs_torch": torch_gap(sessions[name], args.n)}
        for name, us in timed(sessions, feeds, args.runs).items():
            results[name]["cpu_us_per_run"] = us
    results["shipped_vs_torch_order"] = results["shipped"]["cpu_us_per_run"] / results["torch_order"]["cpu_us_per_run"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    for name in ("torch_order", "shipped"):
        r = results[name]
        print(f"{name}: {r['full_size_nodes']} full-size nodes of {r['nodes']}, "
              f"{r['cpu_us_per_run']:.1f} CPU us per run, {r['max_gap_vs_torch']:.2e} from torch after 50 steps")
    print(f"shipped / torch_order: {results['shipped_vs_torch_order']:.3f}")


if __name__ == "__main__":
    main()
