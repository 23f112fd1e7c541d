"""How much memory an ONNX graph needs while it runs: liveness over its nodes (desktop side).

A sequential engine runs the nodes in order. Before node i runs, its outputs are
allocated; a tensor is freed after the last node that reads it; graph outputs are handed
to the caller and never freed. The live bytes at node i are everything allocated and not
yet freed, and the graph's working memory is their peak. Graph inputs belong to the caller
(they are counted by the planner as state and batch), constants belong to the engine.

    timeline = live_bytes(onnx.load("block_step.onnx"))    # one figure per node

Shapes come from ONNX shape inference, so every intermediate must have a static shape.

The figures reach the device in the manifest (see `memory_facts`): the device-side planner
never needs the onnx package. To plan other batch sizes than the one a graph was traced
for, a graph is analysed at two batch sizes and every figure is stored as bytes = c + s·B.
"""
from __future__ import annotations

import math

import numpy as np
import onnx

CONTROL_FLOW = {"If", "Loop", "Scan"}
# Ops whose output is a view of their first input in onnxruntime: no new buffer; the input
# lives as long as the view does.
ALIASES = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


def _itemsize(elem_type: int) -> int:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize


def _bytes(value_type: onnx.TypeProto) -> int | None:
    t = value_type.tensor_type
    if not t.HasField("shape") or not t.elem_type:
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    if any(d is None for d in dims):
        return None
    return math.prod(dims) * _itemsize(t.elem_type)


def infer_shapes(model: onnx.ModelProto, where: str = "graph") -> onnx.ModelProto:
    """`model` with every value's shape: ONNX's shape inference, and where its data propagation
    stops (Shape -> Div -> Reshape, as torch's legacy exporter writes channel shuffles and
    attention heads), the shape arithmetic evaluated (see _evaluate_shapes) and inferred again.

    onnxruntime's symbolic shape inference was the first choice, but importing it imports
    torch (300 MiB) and it fails on a legacy-exported ViT's attention reshapes."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    while _unknown(inferred, _sizes(inferred)):
        evaluated = _evaluate_shapes(inferred)
        if evaluated is None:
            break
        inferred = onnx.shape_inference.infer_shapes(evaluated, strict_mode=True, data_prop=True)
    return inferred


SMALL = 4096  # elements: shape arithmetic, never activations


def _evaluate_shapes(inferred: onnx.ModelProto) -> onnx.ModelProto | None:
    """The graph with its shape arithmetic done: every Shape of a value whose shape is known,
    and every node reading only small known values, replaced by its result as an initializer
    (computed by onnx's reference implementation of the op). The batch is fixed, so every
    such value is a constant. None when nothing could be evaluated."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator
    g = inferred.graph
    shapes = {}
    for v in [*g.input, *g.value_info, *g.output]:
        dims = v.type.tensor_type.shape.dim
        if v.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = [d.dim_value for d in dims]
    values = {i.name: numpy_helper.to_array(i) for i in g.initializer
              if (i.raw_data or i.int64_data or i.int32_data or i.float_data) and math.prod(i.dims) <= SMALL}
    done = []
    for node in g.node:
        try:
            if node.op_type == "Shape" and node.input[0] in shapes:
                feeds = {node.input[0]: np.zeros(shapes[node.input[0]], np.int8)}
            elif node.op_type == "Constant" or (node.op_type not in UNFOLDED and node.input and all(
                    not i or i in values for i in node.input)):
                feeds = {i: values[i] for i in node.input if i}
            else:
                continue
            out = ReferenceEvaluator(node).run(None, feeds)
        except Exception:  # an op the reference cannot run here: leave it to the engine
            continue
        if all(np.asarray(o).size <= SMALL for o in out):
            values.update((name, np.asarray(o)) for name, o in zip(node.output, out))
            done.append(node)
    if all(n.op_type == "Constant" for n in done):
        return None
    made = {o for n in done for o in n.output if o}
    out = onnx.ModelProto()
    out.CopyFrom(inferred)
    del out.graph.node[:]
    out.graph.node.extend(n for n in g.node if not any(o in made for o in n.output))
    stale = [v for v in out.graph.value_info if v.name not in made]  # a guess ("unk__1") would stick
    del out.graph.value_info[:]
    out.graph.value_info.extend(stale)
    out.graph.initializer.extend(numpy_helper.from_array(values[name], name) for name in sorted(made))
    return out


def _sizes(inferred: onnx.ModelProto) -> dict[str, int | None]:
    g = inferred.graph
    sizes = {v.name: _bytes(v.type) for v in [*g.input, *g.value_info, *g.output]}
    for init in g.initializer:
        sizes[init.name] = math.prod(init.dims) * _itemsize(init.data_type)
    return sizes


def _unknown(inferred: onnx.ModelProto, sizes: dict) -> list[str]:
    return sorted(name for node in inferred.graph.node for name in node.output if name and sizes.get(name) is None)


def tensor_bytes(model: onnx.ModelProto, where: str = "graph", inferred: onnx.ModelProto | None = None
                 ) -> dict[str, int]:
    """Bytes of every value in the graph (inputs, intermediates, outputs), from shape inference
    (`inferred`: infer_shapes(model), when the caller already has it)."""
    inferred = inferred if inferred is not None else infer_shapes(model, where)
    sizes = _sizes(inferred)
    unknown = _unknown(inferred, sizes)
    if unknown:
        raise ValueError(f"{where}: shape inference left {len(unknown)} tensor(s) without a static shape "
                         f"(e.g. {unknown[:3]}); give the model static or declared input shapes")
    return sizes


# Ops onnxruntime's constant folding leaves alone: their outputs differ from run to run.
UNFOLDED = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
            "QuantizeLinear", "DequantizeLinear"} | CONTROL_FLOW


def fold_constants(model: onnx.ModelProto, sizes: dict[str, int]) -> tuple[onnx.ModelProto, set[str]]:
    """The graph after onnxruntime's constant folding (BASIC level and above): every node whose
    inputs are all constants runs once at session build, and what the remaining nodes read
    of its results becomes an initializer, a weight like any other. Returns the folded model
    (whose new initializers carry shape and type but no data) and the names of the weights
    the folding made. `model` has been through infer_shapes: their shapes come from its
    value_info."""
    g = model.graph
    constant = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    folded, made = [], set()
    for node in g.node:
        if node.op_type not in UNFOLDED | {"Constant"} and node.input \
                and all(not i or i in constant for i in node.input):
            folded.append(node)
            constant.update(o for o in node.output if o)
            made.update(o for o in node.output if o)
    if not folded:
        return model, set()
    gone = {id(n) for n in folded}
    read = {i for n in g.node if id(n) not in gone for i in n.input} | {v.name for v in g.output}
    # What only folded nodes read is dropped with them, as onnxruntime drops unused initializers.
    kept = [n for n in g.node if id(n) not in gone and (n.op_type != "Constant" or n.output[0] in read)]
    new = sorted(made & read)
    types = {v.name: v.type.tensor_type for v in [*g.value_info, *g.output]}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:], out.graph.initializer[:]
    out.graph.node.extend(kept)
    out.graph.initializer.extend(i for i in g.initializer if i.name in read)
    for name in new:
        t = types[name]
        out.graph.initializer.append(onnx.TensorProto(name=name, data_type=t.elem_type,
                                                      dims=[d.dim_value for d in t.shape.dim]))
    return out, set(new)


# onnxruntime fuses an activation into the Conv before it (ConvActivationFusion, EXTENDED
# level and above): the activation writes no buffer of its own.
FUSED_ACTIVATIONS = {"Relu", "Sigmoid", "Tanh", "LeakyRelu", "Clip", "HardSigmoid"}
# Ops the NCHWc layout (onnxruntime's LAYOUT and ALL levels on x86) runs blocked: a blocked
# input gives a blocked output, with channels padded to the block like the input's.
BLOCKED_OPS = FUSED_ACTIVATIONS | {"Add", "Sum", "Mul", "Concat", "MaxPool", "AveragePool", "GlobalMaxPool",
                                  "GlobalAveragePool", "BatchNormalization", "Resize", "Upsample"}


NCHWC_WIDTHS = (8, 16)  # AVX2 and AVX-512


class _Node:
    """A node as the engine runs it: op, inputs, outputs (a rewrite may add reorder copies)."""
    def __init__(self, op_type: str, inputs, outputs):
        self.op_type, self.input, self.output = op_type, list(inputs), list(outputs)


def tensor_channels(model: onnx.ModelProto) -> dict[str, int]:
    """Channel count (axis 1) of every 4-D value shape inference gave a shape."""
    g = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    out = {}
    for v in [*g.input, *g.value_info, *g.output]:
        dims = v.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[1].HasField("dim_value"):
            out[v.name] = dims[1].dim_value
    return out


def engine_graph(model: onnx.ModelProto, sizes: dict[str, int], vector_width: int | None = None,
                 channels: dict[str, int] | None = None):
    """The graph's nodes as onnxruntime runs them, and the bytes of every value.

    Two of onnxruntime's rewrites change what is live: an activation fused into its Conv
    (at the EXTENDED level, edgeprop's default, and above), and, at LAYOUT/ALL on x86 with a
    `vector_width` (floats per block: 16 with AVX-512, 8 with AVX2), the NCHWc layout: a
    Conv with constant 4-D weights (and every MaxPool) runs on channel blocks, its output
    padded to a whole number of blocks; ops in BLOCKED_OPS carry the blocked layout on, and
    before any other reader a reorder writes an NCHW copy. A Conv reading an NCHW input of
    `vector_width` or more channels (and a MaxPool reading any) first makes a padded copy.
    `channels`: tensor_channels(model), when the caller already has them."""
    g = model.graph
    constants = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    readers: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {v.name for v in g.output}
    made_by = {o: n for n in g.node for o in n.output}
    nodes, sizes, made = [], dict(sizes), {}
    fused: dict[str, str] = {}  # activation output -> the conv output it replaces
    for node in g.node:
        src = made_by.get(node.input[0]) if node.input else None
        if (node.op_type in FUSED_ACTIVATIONS and src is not None and src.op_type == "Conv"
                and readers.get(node.input[0]) == 1 and node.input[0] not in outputs):
            fused[node.output[0]] = node.input[0]
            made[node.input[0]].output = [node.output[0]]  # the conv writes the activation's output
            sizes[node.output[0]] = sizes[node.input[0]]
            continue
        nodes.append(_Node(node.op_type, node.input, node.output))
        made.update((o, nodes[-1]) for o in node.output)
    if not vector_width or vector_width <= 1:
        return nodes, sizes
    channels = channels if channels is not None else tensor_channels(model)

    def padded(name):
        c = channels.get(fused.get(name, name))
        return None if not c else sizes[name] * (-(-c // vector_width) * vector_width) // c

    blocked: dict[str, str] = {}   # NCHW name -> name of its blocked twin
    reordered: set[str] = set()    # blocked values already copied back to NCHW
    out_nodes: list[_Node] = []
    for node in nodes:
        ins = list(node.input)
        if node.op_type in ("Conv", "MaxPool") and node.input and node.input[0] in channels \
                and len(node.output) == 1 and node.output[0] not in outputs:
            w = node.input[1] if node.op_type == "Conv" and len(node.input) > 1 else None
            if node.op_type == "MaxPool" or w in constants:
                x = ins[0]
                if x not in blocked and (node.op_type == "MaxPool" or channels[x] >= vector_width):
                    copy = x + "#nchwc"
                    sizes[copy] = padded(x) or sizes[x]
                    out_nodes.append(_Node("ReorderInput", [x], [copy]))
                    ins[0] = copy
                elif x in blocked:
                    ins[0] = blocked[x]
                twin = node.output[0] + "#nchwc"
                sizes[twin] = padded(node.output[0]) or sizes[node.output[0]]
                blocked[node.output[0]] = twin
                out_nodes.append(_Node(node.op_type, ins, [twin]))
                continue
        if node.op_type in BLOCKED_OPS and ins and all(i in blocked for i in ins if i not in constants) \
                and any(i in blocked for i in ins) and node.output[0] not in outputs:
            twin = node.output[0] + "#nchwc"
            sizes[twin] = padded(node.output[0]) or sizes[node.output[0]]
            blocked[node.output[0]] = twin
            out_nodes.append(_Node(node.op_type, [blocked.get(i, i) for i in ins], [twin]))
            continue
        for name in ins:  # an NCHW reader of a blocked value: reorder it back once
            if name in blocked and name not in reordered:
                reordered.add(name)
                out_nodes.append(_Node("ReorderOutput", [blocked[name]], [name]))
        out_nodes.append(_Node(node.op_type, ins, node.output))
    for name in outputs & set(blocked):
        out_nodes.append(_Node("ReorderOutput", [blocked[name]], [name]))
    return out_nodes, sizes


def live_bytes(model: onnx.ModelProto, where: str = "graph",
               sizes: dict[str, int] | None = None, vector_width: int | None = None,
               channels: dict[str, int] | None = None) -> tuple[list[int], int, int]:
    """(live bytes while each node runs, bytes of the graph inputs, bytes of constants);
    `sizes` from tensor_bytes when the caller already has them. The nodes are those
    onnxruntime runs (see engine_graph; `vector_width` for its NCHWc layout)."""
    g = model.graph
    flow = sorted({n.op_type for n in g.node} & CONTROL_FLOW)
    if flow:
        raise ValueError(f"{where}: control flow ({', '.join(flow)}) is not supported by the planner")
    sizes = sizes if sizes is not None else tensor_bytes(model, where)
    nodes, sizes = engine_graph(model, sizes, vector_width, channels)
    inputs = {v.name for v in g.input}
    constants = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    outputs = {v.name for v in g.output}
    # Each value's buffer: its own, or (for a view) the buffer it views.
    buffer = {}
    for node in nodes:
        for name in node.output:
            viewed = node.input[0] if node.op_type in ALIASES and node.input else None
            buffer[name] = buffer.get(viewed, viewed) if viewed is not None else name
    last_use, kept = {}, set()
    for i, node in enumerate(nodes):
        for name in node.input:
            last_use[buffer.get(name, name)] = i
    for name in outputs:
        kept.add(buffer.get(name, name))
    timeline, live = [], 0
    freed_after: dict[int, list[str]] = {}
    for i, node in enumerate(nodes):
        for name in node.output:
            if not name or name in constants or buffer[name] != name:
                continue
            live += sizes[name]
            # A buffer nobody reads is freed right after it is made; outputs stay with the caller.
            if name not in kept:
                freed_after.setdefault(max(last_use.get(name, i), i), []).append(name)
        timeline.append(live)
        for name in freed_after.pop(i, []):
            live -= sizes[name]
    input_bytes = sum(sizes[n] for n in inputs)
    constant_bytes = sum(sizes[n] for n in constants if sizes.get(n) is not None)
    return timeline, input_bytes, constant_bytes


def _affine(a: int, b: int, batch: int) -> list[int]:
    """Figures at batch sizes `batch` and `batch + 1` -> [c, s] with bytes = c + s·B."""
    s = b - a
    return [a - s * batch, s]


def _frontier(points: list[list[int]]) -> list[list[int]]:
    """Drop every (c, s) that another point beats at every batch size: max(c + s·B) keeps its value."""
    keep = []
    for c, s in sorted({tuple(p) for p in points}, key=lambda p: (-p[1], -p[0])):
        if not any(kc >= c and ks >= s for kc, ks in keep):
            keep.append((c, s))
    return [list(p) for p in keep]


def memory_facts(at_batch: onnx.ModelProto, at_next_batch: onnx.ModelProto, batch: int,
                 loss_output: str | None = None, where: str = "graph") -> dict:
    """What the device-side planner needs to know about one graph, for any batch size B:

      peak     [[c, s], ...]: the working memory is max over the list of c + s·B
      inputs   [c, s]: bytes of the graph's inputs (state + batch)
      saved    [c, s]: live bytes when `loss_output` is computed, i.e. what a step keeps
               from its forward pass for its backward pass (back-prop would keep this for
               every block at once); for a forward graph (no `loss_output`), every tensor
               its nodes make, views and constants aside: what back-prop through it keeps
      constants  bytes of the graph's constant tensors (held by the engine)
      nodes      number of nodes
    """
    s0, s1 = tensor_bytes(at_batch, where), tensor_bytes(at_next_batch, where)
    t0, in0, const = live_bytes(at_batch, where, s0)
    t1, in1, _ = live_bytes(at_next_batch, where, s1)
    if len(t0) != len(t1):
        raise ValueError(f"{where}: the graph traced at batch {batch} and {batch + 1} differ in structure "
                         f"({len(t0)} vs {len(t1)} nodes); cannot plan other batch sizes")
    facts = {"batch": batch, "peak": _frontier([_affine(a, b, batch) for a, b in zip(t0, t1)]),
             "inputs": _affine(in0, in1, batch), "constants": const, "nodes": len(at_batch.graph.node)}
    # The peak under onnxruntime's NCHWc layout, per vector width, where it differs.
    blockable = any(n.op_type in ("Conv", "MaxPool") for n in at_batch.graph.node)
    c0, c1 = (tensor_channels(at_batch), tensor_channels(at_next_batch)) if blockable else ({}, {})
    for width in NCHWC_WIDTHS if blockable else ():
        w0 = live_bytes(at_batch, where, s0, width, c0)[0]
        w1 = live_bytes(at_next_batch, where, s1, width, c1)[0]
        peak = _frontier([_affine(a, b, batch) for a, b in zip(w0, w1)])
        if peak != facts["peak"]:
            facts.setdefault("nchwc_peak", {})[str(width)] = peak
    if loss_output is not None:
        nodes, _ = engine_graph(at_batch, s0)
        i = next(i for i, n in enumerate(nodes) if loss_output in n.output)
        facts["saved"] = _affine(t0[i], t1[i], batch)
    else:
        facts["saved"] = _affine(_made(at_batch, where), _made(at_next_batch, where), batch)
    return facts


def _made(model: onnx.ModelProto, where: str) -> int:
    sizes = tensor_bytes(model, where)
    return sum(sizes[o] for n in model.graph.node if n.op_type not in ALIASES | {"Constant"} for o in n.output if o)
