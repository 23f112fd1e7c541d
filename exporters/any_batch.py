"""One ONNX export that serves every batch size (desktop).

torch.onnx's export is most of an export's time, and the memory planner needs each graph at
two batch sizes (B and B + 1, to scale every figure). So a graph is traced once, with fake
tensors, at SENTINEL_BATCH (a prime no layer size is a multiple of) and exported once; the
graph at any batch size B is that export with every integer that is a multiple of the
sentinel (tensor shapes, Reshape/Expand targets, attributes) multiplied down to B. A graph
whose floating-point constants depend on the batch size (a mean over the batch baked in as
1/B) cannot be rewritten so: `at_batch` refuses it and the caller exports at each size.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from .capture import SENTINEL_BATCH

SENTINEL = SENTINEL_BATCH
FLOAT32_STEPS = 2 * 2.0 ** -23  # two float32 rounding steps, relative
# Past this a float32's spacing is wider than the sentinel, so "a multiple of it" means
# nothing: such a value (max pooling's padding of -FLT_MAX, inf) cannot carry the batch size.
TOO_LARGE = SENTINEL * 2.0 ** 23


class NotBatchGeneric(Exception):
    """The sentinel export bakes the batch size into something other than an integer."""


def sentinel_inputs(make_inputs) -> dict[str, torch.Tensor]:
    """`make_inputs(batch)`'s example tensors at SENTINEL: zeros (their pages untouched:
    tracing with fake tensors reads only shapes). An input whose first axis does not grow
    with the batch (running statistics) keeps its shape."""
    one, two = make_inputs(1), make_inputs(2)
    out = {}
    for name, t in one.items():
        grows = t.dim() > 0 and two[name].shape[0] == 2 * t.shape[0]
        shape = (SENTINEL * t.shape[0], *t.shape[1:]) if grows else t.shape
        out[name] = torch.zeros(shape, dtype=t.dtype) if grows else t
    return out


def _batch_derived(value: float) -> bool:
    """A nonzero float that is, within two float32 steps, a multiple of SENTINEL or the
    reciprocal of one (a tolerance relative to the multiple would call every large number
    batch-derived, the 1e8 of an epsilon 1e-8 among them)."""
    v = abs(value)
    if not v:
        return False
    for x, f in ((v, lambda k: k * SENTINEL), (1 / v, lambda k: 1 / (k * SENTINEL))):
        if x >= TOO_LARGE:
            continue
        k = round(x / SENTINEL)
        if k >= 1 and abs(v - f(k)) <= FLOAT32_STEPS * v:
            return True
    return False


def check_generic(model: onnx.ModelProto) -> None:
    """Raise NotBatchGeneric if a scalar float constant is derived from the sentinel, or an
    integer is one off a multiple of it (B - 1: not a multiple of B at every B)."""
    tensors = list(model.graph.initializer)
    for n in model.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                tensors.append(a.t)
            elif a.type == onnx.AttributeProto.FLOAT and _batch_derived(a.f):
                raise NotBatchGeneric(f"{n.op_type} attribute {a.name} = {a.f}")
    for t in tensors:
        if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            a = np.abs(numpy_helper.to_array(t).astype(np.int64))
            if ((a > SENTINEL) & np.isin(a % SENTINEL, [1, 2, SENTINEL - 2, SENTINEL - 1])).any():
                raise NotBatchGeneric(f"integer constant {t.name} is near a multiple of the batch size")
        elif t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16) \
                and np.prod(t.dims, dtype=np.int64) == 1:
            value = float(numpy_helper.to_array(t).reshape(-1)[0])
            if _batch_derived(value):
                raise NotBatchGeneric(f"constant {t.name} = {value}")


def _scaled(v: int, batch: int) -> int:
    return v // SENTINEL * batch if v and v % SENTINEL == 0 else v


def _rewrite_tensor(t: onnx.TensorProto, batch: int) -> None:
    if t.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
        return
    a = numpy_helper.to_array(t)
    hit = (a != 0) & (a % SENTINEL == 0)
    if hit.any():
        t.CopyFrom(numpy_helper.from_array(np.where(hit, a // SENTINEL * batch, a).astype(a.dtype), t.name))


def at_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy of the sentinel export `model` at `batch`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for t in g.initializer:
        _rewrite_tensor(t, batch)
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                _rewrite_tensor(a.t, batch)
            elif a.type == onnx.AttributeProto.INT:
                a.i = _scaled(a.i, batch)
            elif a.type == onnx.AttributeProto.INTS:
                a.ints[:] = [_scaled(v, batch) for v in a.ints]
    for v in [*g.input, *g.output, *g.value_info]:
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                d.dim_value = _scaled(d.dim_value, batch)
    return out
