"""onnxruntime's graph optimisation levels side by side: speed and memory of conv graphs.

    python bench/ort_levels.py [--runs 30] [--out bench/results/ort_levels.json]

onnxruntime's ENABLE_LAYOUT and ENABLE_ALL levels add the NCHWc layout transform on x86:
convolution activations are reordered into blocks of the CPU's vector width (16 floats with
AVX-512, 8 with AVX2) and their channels padded up to the block. EXTENDED keeps NCHW (it
still fuses Conv+activation). For each graph and level, in a fresh process with one thread:
  ms         median time of one run (after two warm-up runs)
  arena      resident bytes the runs added above the loaded session (what the planner plans)
  session    resident bytes the session build added (graph copies, optimiser scratch)
  planned    the planner's arena for the same graph at that level and this CPU's vector width
Graphs: a plain conv model (Conv 1->8 3x3 on 28x28, ReLU, Linear; the one the memory test
profiles) at batch 64, a wider one (Conv 3->32->64 on 32x32) at batch 16, and the NoProp-DT
CNN step graph (digits, paper block, width 64) at its batch.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import common  # bench/common.py: the script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ("extended", "layout", "all")


def worker(path: str, level: str, runs: int) -> dict:
    import time

    import numpy as np

    from edgeprop import rss
    from edgeprop.runtimes import get_engine
    engine = get_engine("onnxruntime", threads=1, optimization=level)
    before = rss.current()
    graph = engine.load(Path(path))
    session = rss.current() - before
    rng = np.random.default_rng(0)
    types = {"tensor(float)": np.float32, "tensor(int64)": np.int64}
    feeds = {}
    for i in graph.session.get_inputs():
        dtype = types[i.type]
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        # small positive values: valid for every input (learning rates, masks, step counts)
        feeds[i.name] = np.asarray(rng.uniform(0.01, 0.1, shape), dtype) if dtype == np.float32 \
            else np.ones(shape, dtype)
    base = rss.current()
    rss.reset_peak()
    graph.run(feeds)
    graph.run(feeds)
    arena = rss.peak() - base
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        graph.run(feeds)
        times.append(time.perf_counter() - t)
    return {"ms": 1e3 * float(np.median(times)), "arena": arena, "session": session}


def conv_models(folder: Path) -> dict[str, Path]:
    import torch
    out = {}
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 28 * 28, 10))
    wide = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10))
    for name, model, shape in (("conv1-8 b64", plain, (64, 1, 28, 28)), ("conv3-32-64 b16", wide, (16, 3, 32, 32))):
        path = folder / (name.replace(" ", "_") + ".onnx")
        torch.onnx.export(model.eval(), (torch.randn(*shape),), str(path), dynamo=True, input_names=["x"],
                          verbose=False)
        out[name] = path
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "ort_levels.json"))
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        path, level, runs = args.worker
        print(json.dumps(worker(path, level, int(runs))))
        return

    import warnings
    warnings.simplefilter("ignore")
    from edgeprop import bundle as bundles
    from edgeprop import cpu, memory
    from edgeprop.exporters import export
    from edgeprop.exporters.model_memory import onnx_report
    from edgeprop.runtimes import memory_model
    width = cpu.host_vector_width()
    folder = Path(tempfile.mkdtemp())
    graphs = conv_models(folder)
    export(rule="noprop-dt", model="cnn", data="digits", out=folder / "cnn", blocks=2, width=64)
    cnn = bundles.load(folder / "cnn")
    # each graph, and how the planner plans its arena at a vector width (None: NCHW)
    planners = {name: (path, lambda w, p=path: onnx_report(p, vector_width=w)["arena"])
                for name, path in graphs.items()}
    planners["noprop-dt cnn block step"] = (cnn.graph_path(cnn.units[0].step_graph), lambda w: memory.plan(
        cnn, engine=memory_model("onnxruntime"), vector_width=w).units[0].engine)
    rows = []
    for name, (path, planned) in planners.items():
        for level in LEVELS:
            r = common.spawn(__file__, path, level, args.runs)
            r["planned"] = planned(width if level != "extended" else None)
            rows.append({"graph": name, "level": level, **r})
            print(f"{name:26s} {level:9s} {r['ms']:8.2f} ms  arena {r['arena'] / 2**20:6.2f} MiB  planned "
                  f"{r['planned'] / 2**20:6.2f} MiB  session {r['session'] / 2**20:6.2f} MiB", flush=True)
    import onnxruntime
    result = {"machine": platform.machine(), "vector_width": width, "onnxruntime": onnxruntime.__version__,
              "python": sys.version.split()[0], "runs": args.runs, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
