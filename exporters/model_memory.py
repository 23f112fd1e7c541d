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

from .liveness import ALIASES, engine_graph, fold_constants, infer_shapes, live_bytes, tensor_bytes
from .onnx_skeleton import load_skeleton
from .ort_pattern import arena_bytes, symbolic_shapes


def _at_batch(model: onnx.ModelProto, batch: int, path: str) -> onnx.ModelProto:
    """`model` with a fixed batch (changed in place): a symbolic first axis becomes `batch`."""
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


OPSET = 17  # the oldest opset the planner reads; older models are converted (--convert)


def _skeleton(path: str, convert: bool) -> tuple[onnx.ModelProto, int]:
    """The model without its weights' bytes, at opset OPSET or newer; and its own opset."""
    try:
        model = load_skeleton(path)
    except Exception as e:  # protobuf raises DecodeError and others for a file that is not a model
        raise EdgepropError(f"{path}: not a readable ONNX model ({e})") from None
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < OPSET:
        if not convert:
            raise EdgepropError(f"{path}: opset {opset}; the planner reads opset {OPSET} or newer: add --convert to "
                                f"plan it converted by onnx.version_converter (the file is not changed)")
        try:
            model = onnx.version_converter.convert_version(model, OPSET)
        except Exception as e:  # the converter lacks an adapter for some op
            raise EdgepropError(f"{path}: onnx.version_converter cannot convert opset {opset} to {OPSET} "
                                f"({str(e).splitlines()[0][:200]})") from None
    return model, opset


def _weight_facts(model: onnx.ModelProto, sizes: dict[str, int], weights: int, made: set[str]) -> dict:
    """What EngineMemory.session_build reads of a model after constant folding (`made`: the
    weights the folding made)."""
    initializers = {i.name: i for i in model.graph.initializer}
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def constant_input(ops, index, rank=None, below=None, names=None):
        found = {n.input[index] for n in model.graph.node if n.op_type in ops and len(n.input) > index}
        return sum(sizes[n] for n in found if n in initializers and (rank is None or len(initializers[n].dims) == rank)
                   and (below is None or sizes[n] < below) and (names is None or n in names))

    # A folded conv weight that a BatchNormalization follows is fused into a new weight;
    # the folded one, a heap buffer of its own, stays resident.
    bn_fused = {n.input[1] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1
                and [r.op_type for r in readers.get(n.output[0], [])] == ["BatchNormalization"]}
    # Matrices of 32 MiB or more are left out of the packed copies: a buffer that large is
    # always mmapped by glibc and given back when freed (VGG19's 392 MiB fc6 measured no copy).
    return {"weights": weights, "folded": sum(sizes[n] for n in made), "nodes": len(model.graph.node),
            "largest": max([0] + [sizes[name] for name in initializers]),
            "conv": constant_input({"Conv"}, 1, rank=4),
            "fused": constant_input({"Conv"}, 1, names=made & bn_fused),
            "matrices": {op: constant_input({op}, 1, below=32 << 20) for op in ("Gemm", "MatMul")}}


def onnx_report(path: str | Path, batch: int | None = None, engine: str = "onnxruntime",
                vector_width: int | None = None, optimization: str = "extended", convert: bool = False,
                arch: str | None = None) -> dict:
    """The model's memory at `batch` on `engine` at onnxruntime's `optimization` level;
    `vector_width`: onnxruntime will run its convolutions in the NCHWc layout with blocks of
    that many floats (see liveness.engine_graph). The model is read without its weights'
    bytes and shape-inferred once. `convert`: plan an older opset's model converted. `arch`:
    the device's CPU architecture, whose runtime figure is used where one was measured."""
    path = str(path)
    model, opset = _skeleton(path, convert)
    static = _static_batch(model)
    if static is not None and batch not in (None, static):
        raise EdgepropError(f"{path}: the model's batch is fixed at {static}; export it with a symbolic "
                            f"batch axis to plan batch {batch}")
    batch = static or batch or 1
    shapes = symbolic_shapes(model) if optimization != "disabled" else {}  # before the batch is fixed
    fixed = _at_batch(model, batch, path)
    eng = memory_model(engine, arch)
    try:
        inferred = infer_shapes(fixed, path)  # once
        sizes = tensor_bytes(fixed, path, inferred)
        folded, made = fold_constants(inferred, sizes) if optimization != "disabled" else (fixed, set())
        timeline, inputs, constants = live_bytes(folded, path, sizes, vector_width)
        nodes, engine_sizes = engine_graph(folded, sizes, vector_width)
    except (ValueError, onnx.shape_inference.InferenceError) as e:
        raise EdgepropError(str(e)) from None
    weights = constants  # initializers, Constant nodes and what constant folding makes
    build = eng.session_build(_weight_facts(folded, sizes, weights, made), optimization)
    peak = max(timeline, default=0)
    kept = {o for n in folded.graph.node if n.op_type not in ALIASES | {"Constant"} for o in n.output if o}
    activations = sum(sizes[o] for o in kept)
    g = folded.graph
    fed = {v.name for v in g.input} | {i.name for i in g.initializer} | \
        {o for n in g.node if n.op_type == "Constant" for o in n.output}
    # onnxruntime's arena, replayed: the first run tensor by tensor, then its memory pattern
    pattern, arena = arena_bytes(nodes, engine_sizes, shapes, fed, {v.name for v in g.output}) \
        if shapes and engine == "onnxruntime" else (None, eng.arena(peak))
    running = build["loaded"] + inputs + arena
    inference = max(build["peak"], running)  # the session build's own peak, or the runs'
    backprop = 4 * weights + inputs + eng.arena(activations + weights)  # weights, grads, 2 slots; arena: acts + grads
    layout = f"NCHWc, {vector_width}-float blocks" if vector_width else "NCHW"
    nodes = len(folded.graph.node)
    runtime = eng.runtime  # the session's own cost per node is in build["loaded"]
    return {"model": path, "batch": batch, "opset": opset, "converted": opset < OPSET, "nodes": nodes,
            "engine": engine, "optimization": optimization, "layout": layout,
            "weights": weights, "folded": sum(sizes[n] for n in made), "inputs": inputs, "peak": peak,
            "pattern": pattern, "arena": arena,
            "session_build": build["peak"], "session": build["loaded"], "running": running,
            "inference": inference, "zeroth_order": inference,
            "backprop": {"weights": weights, "gradients": weights, "optimizer": 2 * weights,
                         "activations": activations, "working_set": backprop},
            "runtime": runtime, "runtime_source": eng.note, "total": None if runtime is None else runtime + inference}


def format_report(r: dict, verdict: dict | None) -> str:
    m = r.get("measured")
    opset = f"opset {r['opset']}" + (f" (planned converted to {OPSET})" if r["converted"] else "")
    lines = [f"{r['model']}: {r['nodes']} nodes, {opset}, batch {r['batch']}, engine {r['engine']} "
             f"({r['optimization']})",
             f"weights          {fmt(r['weights']):>10s}" + (f"   ({fmt(r['folded'])} of them made by constant folding)"
                                                           if r["folded"] else ""),
             f"inputs           {fmt(r['inputs']):>10s}",
             f"live peak        {fmt(r['peak']):>10s}   (intermediates and outputs; arena {fmt(r['arena'])}; "
             f"conv layout {r['layout']})",
             *([f"  measured arena {fmt(m['arena']):>10s}   ratio {m['arena'] / r['arena']:.2f}"] if m else []),
             f"session build    {fmt(r['session_build']):>10s}   (its peak; the built session keeps "
             f"{fmt(r['session'])})",
             *([f"  measured       {fmt(m['session']):>10s}   ratio {m['session'] / r['session_build']:.2f} "
                f"(keeps {fmt(m['loaded'])})"] if m else []),
             f"inference        {fmt(r['inference']):>10s}   = zeroth-order fine-tuning's working set: the larger of "
             f"the build's peak and the session, inputs and arena",
             *([f"  measured       {fmt(m['peak'] - m['baseline']):>10s}   ratio "
                f"{(m['peak'] - m['baseline']) / r['inference']:.2f}"] if m else []),
             f"back-prop        {fmt(r['backprop']['working_set']):>10s}   (activations kept "
             f"{fmt(r['backprop']['activations'])}, gradients and Adam slots {fmt(3 * r['weights'])})"]
    if r["runtime"] is not None:
        lines.append(f"runtime          {fmt(r['runtime']):>10s}   (interpreter, numpy, {r['engine']}: "
                     f"{r['runtime_source']})")
        lines.append(f"total            {fmt(r['total']):>10s}   (runtime + inference: the process's peak)")
        if m:
            lines.append(f"  measured       {fmt(m['peak']):>10s}   ratio {m['peak'] / r['total']:.2f} (fresh process: "
                         f"imports, session build, {m['runs']} runs at batch {r['batch']}; runtime "
                         f"{fmt(m['baseline'])})")
    if verdict:
        lines.append("")
        lines.append(("verdict: FITS: " if verdict["fits"] else "verdict: DOES NOT FIT: ") + verdict["message"])
    return "\n".join(lines)


# Run in a fresh process, as a device would run the model: in this one the heap that onnx.load
# freed would be reused by the engine and hide what it takes. Phases: the imports (numpy,
# onnxruntime, edgeprop's engine module) and onnxruntime's environment, made with a first
# one-node session (the runtime the planner counts apart); the session build; the runs.
_MEASURE = """
import json, sys
import numpy as np
from edgeprop import rss
from edgeprop.runtimes import get_engine
path, batch, runs, level, tiny = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
engine = get_engine("onnxruntime", optimization=level)
engine.load(tiny)  # onnxruntime's environment, made with the first session and kept
baseline = rss.current()
rss.reset_peak()
graph = engine.load(path)
session_peak, loaded = rss.peak(), rss.current()
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
print(json.dumps({"runs": runs, "baseline": baseline, "session": session_peak - baseline, "loaded": loaded - baseline,
                  "arena": rss.peak() - base, "peak": rss.process_peak()}))
"""


def _tiny_model(folder: Path) -> Path:
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "tiny", [x], [y])
    path = folder / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def measure_onnx(path: str | Path, batch: int, runs: int = 3, optimization: str = "extended") -> dict:
    """onnxruntime running the model `runs` times at `batch` in a fresh process, in bytes:
      baseline  the process before the session (interpreter, numpy, onnxruntime and its environment)
      session   the session build's peak above the baseline (weights, their copies, optimizer passes)
      loaded    the built session above the baseline (what it keeps)
      arena     the runs' peak above the loaded session and its inputs
      peak      the whole process's peak resident set (VmHWM): what a device must have"""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="edgeprop-measure-") as folder:
        proc = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(batch), str(runs), optimization,
                               str(_tiny_model(Path(folder)))], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise EdgepropError(f"{path}: onnxruntime could not run the model ({proc.stderr.strip()[-300:]})")
    return json.loads(proc.stdout.strip().splitlines()[-1])
