"""Memory of NoProp-DT training vs end-to-end back-prop of the same network, same batch.

    python bench/memory.py [--batches 50] [--out bench/results/memory.json]

For each configuration (digits at batch 1, 32, 64 and 128; Fashion-MNIST at 1, 32 and 128
when its files are installed, see docs/results.md):
  (a) working set per step: planned (edgeprop.memory) and measured (peak resident bytes
      above the process once its graphs and data are loaded), for the edgeprop trainer
      with every unit's state in RAM and with --stream, and for end-to-end back-prop:
      planned from the same liveness facts, measured in a torch training process (peak above
      the process once torch and the data are loaded).
  (b) whole-process peak resident set of the edgeprop trainer (onnxruntime, no torch) vs a
      torch process training the same network end to end with back-prop and AdamW.
Every measurement runs in its own fresh process and trains --batches batches (every unit
steps on each): memory reaches its steady state within the first few. Also recorded: what the runtime itself
costs (interpreter, numpy, edgeprop, onnxruntime, its environment), the figure behind
edgeprop.memory's onnxruntime model.
Targets to report against (not asserted): working set <= 0.10x back-prop's; process peak
<= 0.20x torch's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import common  # bench/common.py: the script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
FASHION = "/usr/share/datasets/fashion-mnist"


# ---- workers (each runs in a fresh process) ---------------------------------------------------

def worker_runtime_parts() -> dict:
    from edgeprop import rss
    parts, last = {}, rss.current()

    def mark(name):
        nonlocal last
        now = rss.current()
        parts[name], last = now - last, now

    parts["interpreter"] = last
    import numpy  # noqa: F401
    mark("numpy")
    from edgeprop import bundle, cli, datasets, memory, trainer  # noqa: F401
    mark("edgeprop")
    from edgeprop.runtimes import get_engine
    engine = get_engine("onnxruntime")
    mark("onnxruntime")
    import onnx  # only to make a one-node graph; its memory is freed before the mark below
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = Path(tempfile.mkdtemp()) / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    last = rss.current()
    engine.load(path)
    mark("onnxruntime_environment")
    return {"parts": parts, "total": rss.current()}


def worker_edgeprop(bundle: str, data: str, batches: int, stream: bool) -> dict:
    from edgeprop import bundle as bundles
    from edgeprop import datasets, rss
    from edgeprop.runtimes import get_engine
    from edgeprop.trainer import TrainConfig, Trainer
    b, train = bundles.load(bundle), datasets.load(data, "train")
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(b, get_engine("onnxruntime", threads=1), train, TrainConfig(epochs=1, stream=stream),
                          stream_folder=folder)
        trainer.run(limit=batches * len(b.units), progress=False, checkpoints=False)
        working_set = trainer.working_set()
        trainer.state = None
    return {"working_set": working_set, "baseline": trainer.baseline,
            "process_peak": rss.process_peak(), "torch_imported": "torch" in sys.modules}


def worker_torch_backprop(bundle: str, data: str, batches: int) -> dict:
    """The same NoProp-DT network trained end to end with autograd and torch.optim.AdamW."""
    import numpy as np
    import torch

    from edgeprop import bundle as bundles
    from edgeprop import datasets, rss
    from edgeprop.exporters.models import Chain, build_unit, cross_entropy
    from edgeprop.rules import normalise
    torch.set_num_threads(1)
    b, train = bundles.load(bundle), datasets.load(data, "train")
    baseline = rss.current()
    rss.reset_peak()
    torch.manual_seed(0)
    blocks = [build_unit(b.model, "block", b.embedding) for _ in b.blocks]
    chain = Chain(blocks, build_unit(b.model, "head", b.embedding), [b.schedule.coefficients(u.t) for u in b.blocks],
                  temperature=1.0)  # the paper's chain, noise and all
    opt = torch.optim.AdamW(chain.parameters(), lr=1e-3, weight_decay=1e-3)
    B, d, T = b.batch_size, b.embedding.shape[1], len(b.blocks)
    onehot = np.eye(b.num_classes, dtype=np.float32)
    perm = np.random.default_rng(0).permutation(len(train.y))
    for i in range(batches):
        idx = perm[i * B % len(perm):][:B]
        x = torch.from_numpy(normalise(b, train.x[idx]))
        z, noise = torch.randn(len(idx), d), torch.randn(T, len(idx), d)
        opt.zero_grad()
        cross_entropy(chain(x, z, noise), torch.from_numpy(onehot[train.y[idx]]), torch.ones(len(idx))).backward()
        opt.step()
    return {"working_set": rss.peak() - baseline, "baseline": baseline, "process_peak": rss.process_peak()}


# ---- driver ---------------------------------------------------------------------------------


def spawn(*args) -> dict:
    return common.spawn(__file__, *args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=50, help="training batches per measurement")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory.json"))
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        fn = {"runtime-parts": worker_runtime_parts,
              "edgeprop": lambda b, d, e, s: worker_edgeprop(b, d, int(e), s == "stream"),
              "torch": lambda b, d, e: worker_torch_backprop(b, d, int(e))}[kind]
        print(json.dumps(fn(*rest)))
        return

    from edgeprop import bundle as bundles
    from edgeprop import datasets, memory
    from edgeprop.exporters import export
    from edgeprop.runtimes import memory_model
    configs = [("digits", "digits", b) for b in (1, 32, 64, 128)]
    if Path(FASHION).is_dir():
        configs += [("fashion-mnist", FASHION, b) for b in (1, 32, 128)]
    else:
        print(f"{FASHION} not found: Fashion-MNIST configurations skipped", file=sys.stderr)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "batches": args.batches,
               "runtime": spawn("runtime-parts"), "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data, batch in configs:
            print(f"{name}, batch {batch} ...", file=sys.stderr)
            b = bundles.load(export(Path(tmp) / f"{name}-{batch}", data=data, batch_size=batch, progress=False))
            train = datasets.load(data, "train")
            data_bytes = train.nbytes
            ort = memory_model("onnxruntime")
            plans = {s: memory.plan(b, stream=s, engine=ort, data_bytes=data_bytes) for s in (False, True)}
            ram, streamed = (spawn("edgeprop", b.root, data, args.batches, mode) for mode in ("ram", "stream"))
            torch_bp = spawn("torch", b.root, data, args.batches)
            bp_planned = plans[False].backprop["working_set"]
            results["configs"][f"{name}-batch{batch}"] = {
                "planned": {"noprop": plans[False].working_set, "noprop_stream": plans[True].working_set,
                            "backprop": bp_planned, "backprop_detail": plans[False].backprop,
                            "runtime_and_data": plans[False].runtime + data_bytes},
                "measured": {"noprop": ram, "noprop_stream": streamed, "backprop_torch": torch_bp},
                "measured_over_planned": {"noprop": ram["working_set"] / plans[False].working_set,
                                          "noprop_stream": streamed["working_set"] / plans[True].working_set},
                "working_set_vs_backprop": {
                    "planned": plans[False].working_set / bp_planned,
                    "planned_stream": plans[True].working_set / bp_planned,
                    "measured_vs_torch": ram["working_set"] / torch_bp["working_set"],
                    "measured_stream_vs_torch": streamed["working_set"] / torch_bp["working_set"]},
                "process_peak_vs_torch": {"ram": ram["process_peak"] / torch_bp["process_peak"],
                                          "stream": streamed["process_peak"] / torch_bp["process_peak"]}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    mib = 1 / 2**20
    print(f"{'config':22s} {'planned':>8s} {'measured':>8s} {'m/p':>5s} {'stream p':>8s} {'m/p':>5s} "
          f"{'bp plan':>8s} {'torch bp':>8s} {'ws/bp':>6s} {'ws/bp s':>7s} {'peak/torch':>10s} {'s':>5s}")
    for key, r in results["configs"].items():
        pl, me = r["planned"], r["measured"]
        print(f"{key:22s} {pl['noprop'] * mib:8.1f} {me['noprop']['working_set'] * mib:8.1f} "
              f"{r['measured_over_planned']['noprop']:5.2f} {pl['noprop_stream'] * mib:8.1f} "
              f"{r['measured_over_planned']['noprop_stream']:5.2f} {pl['backprop'] * mib:8.1f} "
              f"{me['backprop_torch']['working_set'] * mib:8.1f} {r['working_set_vs_backprop']['planned']:6.2f} "
              f"{r['working_set_vs_backprop']['planned_stream']:7.2f} {r['process_peak_vs_torch']['ram']:10.2f} "
              f"{r['process_peak_vs_torch']['stream']:5.2f}")
    print(f"(MiB; ws/bp: planned working set over planned back-prop's; peak/torch: whole-process peak RSS "
          f"over the torch back-prop process's)\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
