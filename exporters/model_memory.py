"""`edgeprop profile model.onnx`: the memory of any ONNX inference model, not only edgeprop's.

Needs the onnx package, not torch. For a model with a symbolic batch axis the figures are
given at --batch-size (default 1); a model with static shapes is planned at its own batch.

  inference      weights + inputs + the liveness peak of the graph (intermediates and
                 outputs): what a forward pass needs, and so what zeroth-order fine-tuning
                 (SPSA/MeZO: two forward passes, perturbations regenerated from a seed) needs
  back-prop      what training the same model end to end would hold: weights, their
                 gradients and two Adam slots, plus every intermediate tensor of the forward
                 pass (the activations a backward pass reads)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx

from edgeprop.errors import EdgepropError
from edgeprop.runtimes import memory_model
from edgeprop.sizes import format_size as fmt

from .liveness import ALIASES, live_bytes, tensor_bytes


def _at_batch(model: onnx.ModelProto, batch: int, path: str) -> onnx.ModelProto:
    """A copy of `model` whose inputs have a fixed batch: a symbolic first axis becomes `batch`."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    initializers = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            if axis != 0:
                raise EdgepropError(f"{path}: input '{value.name}' axis {axis} has no size "
                                    f"({dim.dim_param or '?'}); only the batch axis may be symbolic")
            dim.Clear()
            dim.dim_value = batch
    return model


def _static_batch(model: onnx.ModelProto) -> int | None:
    """The batch of a model whose first input's first axis is fixed, else None."""
    initializers = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        if value.name not in initializers:
            dims = value.type.tensor_type.shape.dim
            return dims[0].dim_value if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None
    return None


def onnx_report(path: str | Path, batch: int | None = None, engine: str = "onnxruntime",
                vector_width: int | None = None) -> dict:
    """The model's memory at `batch`; `vector_width`: onnxruntime will run its convolutions in
    the NCHWc layout with blocks of that many floats (see liveness.engine_graph)."""
    path = str(path)
    try:
        model = onnx.load(path)
    except Exception as e:  # onnx raises DecodeError and others for a file that is not a model
        raise EdgepropError(f"{path}: not a readable ONNX model ({e})") from None
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 17:
        raise EdgepropError(f"{path}: opset {opset}; the planner reads opset 17 or newer models")
    static = _static_batch(model)
    if static is not None and batch not in (None, static):
        raise EdgepropError(f"{path}: the model's batch is fixed at {static}; export it with a symbolic "
                            f"batch axis to plan batch {batch}")
    batch = static or batch or 1
    fixed = _at_batch(model, batch, path)
    try:
        sizes = tensor_bytes(fixed, path)  # shape inference, once
        timeline, inputs, constants = live_bytes(fixed, path, sizes, vector_width)
    except (ValueError, onnx.shape_inference.InferenceError) as e:
        raise EdgepropError(str(e)) from None
    eng = memory_model(engine)
    weights = constants  # initializers and Constant nodes
    peak = max(timeline, default=0)
    kept = {o for n in fixed.graph.node if n.op_type not in ALIASES | {"Constant"} for o in n.output if o}
    activations = sum(sizes[o] for o in kept)
    inference = weights + inputs + eng.arena(peak)
    backprop = 4 * weights + inputs + eng.arena(activations + weights)  # weights, grads, 2 slots; arena: acts + grads
    layout = f"NCHWc, {vector_width}-float blocks" if vector_width else "NCHW"
    return {"model": path, "batch": batch, "opset": opset, "nodes": len(fixed.graph.node), "engine": engine,
            "layout": layout,
            "weights": weights, "inputs": inputs, "peak": peak, "arena": eng.arena(peak),
            "inference": inference, "zeroth_order": inference,
            "backprop": {"weights": weights, "gradients": weights, "optimizer": 2 * weights,
                         "activations": activations, "working_set": backprop},
            "runtime": None if eng.runtime is None else eng.runtime + eng.per_node * len(fixed.graph.node)}


def format_report(r: dict, verdict: dict | None) -> str:
    lines = [f"{r['model']}: {r['nodes']} nodes, opset {r['opset']}, batch {r['batch']}, engine {r['engine']}",
             f"weights          {fmt(r['weights']):>10s}",
             f"inputs           {fmt(r['inputs']):>10s}",
             f"live peak        {fmt(r['peak']):>10s}   (intermediates and outputs; arena {fmt(r['arena'])}; "
             f"conv layout {r['layout']})",
             *([f"  measured arena {fmt(r['measured_arena']):>10s}   ratio {r['measured_arena'] / r['arena']:.2f} "
                f"(onnxruntime, {r['batch']} per run, fresh process)"] if r.get("measured_arena") else []),
             f"inference        {fmt(r['inference']):>10s}   = zeroth-order fine-tuning's working set",
             f"back-prop        {fmt(r['backprop']['working_set']):>10s}   (activations kept "
             f"{fmt(r['backprop']['activations'])}, gradients and Adam slots {fmt(3 * r['weights'])})"]
    if r["runtime"] is not None:
        lines.append(f"runtime          {fmt(r['runtime']):>10s}   (interpreter, numpy, {r['engine']})")
    if verdict:
        lines.append("")
        lines.append(("verdict: FITS: " if verdict["fits"] else "verdict: DOES NOT FIT: ") + verdict["message"])
    return "\n".join(lines)



# Run in a fresh process: in this one, the heap that onnx.load freed would be reused by the
# engine and hide what it takes.
_MEASURE = """
import json, sys
import numpy as np
from edgeprop import rss
from edgeprop.runtimes import get_engine
path, batch, runs, level = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
graph = get_engine("onnxruntime", optimization=level).load(path)
rng = np.random.default_rng(0)
types = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
         "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8}
feeds = {}
for i in graph.session.get_inputs():
    shape = [d if isinstance(d, int) else batch for d in i.shape]
    dtype = types[i.type]
    feeds[i.name] = rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating) \\
        else np.zeros(shape, dtype)
base = rss.current()
rss.reset_peak()
for _ in range(runs):
    graph.run(feeds)
print(json.dumps({"engine_bytes": rss.peak() - base}))
"""


def measure_onnx(path: str | Path, batch: int, runs: int = 3, optimization: str = "extended") -> int:
    """Bytes onnxruntime took to run the model `runs` times at `batch`, above the loaded
    session and its inputs: what the planner calls the arena."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(batch), str(runs), optimization],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise EdgepropError(f"{path}: onnxruntime could not run the model ({proc.stderr.strip()[-300:]})")
    return json.loads(proc.stdout.strip().splitlines()[-1])["engine_bytes"]
