"""Compile one unit's whole training step into an ordinary inference graph.

    step(params, optimizer state, inputs, lr, step) -> (params', optimizer state', loss)

torch.func.grad_and_value takes the in-block gradient, make_fx traces the step into an FX
graph of plain aten ops, and torch.onnx's dynamo exporter lowers that to ONNX.
(`torch.onnx.export` straight on a function that calls torch.func fails: docs/architecture.md.)
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from .conv_grad import DECOMPOSITIONS
from .optim import Optimizer

ONNX_OPSET = 18


def _build_torchlib_table_once() -> None:
    """torch.onnx rebuilds its op table from onnxscript's torchlib on every export, parsing
    every function's source again: measured 1.5 s of a small graph's 4.3 s export. The table
    depends only on the installed packages, so one per process does. (Private API: where it
    moves, exports stay correct and are only slower.)"""
    try:
        from torch.onnx._internal._lazy_import import onnxscript_apis
        onnxscript_apis.get_torchlib_ops = functools.cache(onnxscript_apis.get_torchlib_ops)
    except (ImportError, AttributeError):
        pass


_build_torchlib_table_once()


def layout(module: nn.Module) -> list[dict]:
    """Where each parameter lives in the unit's flat parameter buffer."""
    views, offset = [], 0
    for name, p in module.named_parameters():
        views.append({"name": name, "shape": list(p.shape), "offset": offset})
        offset += p.numel()
    return views


def flatten(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _views(flat: torch.Tensor, module: nn.Module) -> dict[str, torch.Tensor]:
    return {v["name"]: flat[v["offset"]:v["offset"] + math.prod(v["shape"])].reshape(v["shape"])
            for v in layout(module)}


def trace_step(module: nn.Module, loss, unit, opt: Optimizer, data: dict[str, torch.Tensor], fake: bool = False):
    """FX graph of one unit's step, its example arguments (their shapes fix the batch size),
    and its input and output names; `fake`: traced with fake tensors (nothing computed).
    `loss(unit, module, feeds)` gives (local loss, extras); the extras (detached tensors a
    later unit needs) become outputs after the loss.

    Parameters and each optimizer slot are one flat buffer per unit: the optimizer runs as a
    dozen element-wise ops over one buffer instead of a dozen per tensor (measured ~25% off
    onnxruntime's step time at batch 1), and a device keeps one block's state contiguous.
    The views are cut outside the differentiated function, so no slice is back-propagated.
    """
    state = ["param"] + [f"opt.{s}" for s in opt.slots]
    inputs = state + list(data) + ["lr", "step"]
    data_names, n_slots = list(data), len(opt.slots)
    flat = flatten(module)
    extra_names = []  # the extras' names, as the traced call returns them

    def step(flat, *args):
        slots = dict(zip(opt.slots, args[:n_slots]))
        feeds = dict(zip(data_names, args[n_slots:-2]))
        lr, n = args[-2], args[-1]

        def loss_of(params):
            return loss(unit, lambda *a, **k: torch.func.functional_call(module, params, a, k), feeds)

        grads, (value, extras) = torch.func.grad_and_value(loss_of, has_aux=True)(_views(flat, module))
        grad = torch.cat([grads[v["name"]].reshape(-1) for v in layout(module)])
        extra_names[:] = list(extras)
        new_flat, new_slots = opt.update(flat, grad, slots, lr, n)
        return (new_flat, *[new_slots[s] for s in opt.slots], value, *extras.values())

    args = [flat, *[torch.zeros_like(flat) for _ in opt.slots], *data.values(),
            torch.tensor(1e-3), torch.tensor(1.0)]  # example lr and step; both are inputs
    # Convolution gradients are traced as forward convolutions: engines have no conv backward op.
    # A module may ask for more (a captured model's: every gradient in elementary ops).
    table = getattr(module, "decompositions", DECOMPOSITIONS)
    graph = _make_fx(step, fake, decomposition_table=table)(*args)
    return graph, args, inputs, [f"next.{k}" for k in state] + ["loss", *extra_names]


def trace_infer(module: nn.Module, data: dict[str, torch.Tensor], outputs: list[str], fake: bool = False):
    def infer(flat, *args):
        return torch.func.functional_call(module, _views(flat, module), tuple(args))

    args = [flatten(module), *data.values()]
    return _make_fx(infer, fake)(*args), args, ["param", *data], list(outputs)


def _make_fx(fn, fake: bool, **kw):
    # The module's buffers (a captured unit's constants) stay real tensors: graph constants.
    return make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True, **kw) if fake else make_fx(fn, **kw)


def onnx_model(module, args, input_names, output_names) -> onnx.ModelProto:
    """torch.onnx's dynamo export of `module(*args)`, quietly, without desktop metadata."""
    # optimize=False: onnxscript's optimizer folds AdamW's `+ 1e-8` away as if it were `+ 0`
    # (a 1e-8 constant is within np.allclose's default atol of zero), which turns every
    # zero gradient into 0/0 = NaN. Seen at batch 1, where dead ReLUs make zero gradients.
    # onnxruntime applies its own graph optimisations when it loads the graph.
    quiet = contextlib.redirect_stdout(io.StringIO())
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with quiet, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, tuple(args), dynamo=True, optimize=False, verbose=False,
                                    opset_version=ONNX_OPSET, input_names=input_names, output_names=output_names)
    model = program.model_proto
    # The exporter annotates nodes with desktop stack traces and source paths: dead weight
    # in a device's flash, and nothing a device should learn about the desktop.
    for node in model.graph.node:
        del node.metadata_props[:]
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        del value.metadata_props[:]
    del model.metadata_props[:]
    return model


def to_onnx(graph_module, args, input_names, output_names, path: Path) -> onnx.ModelProto:
    """Export with standard ai.onnx ops only and check the result."""
    return save_checked(onnx_model(graph_module, args, input_names, output_names), input_names, output_names, path)


def save_checked(model: onnx.ModelProto, input_names, output_names, path: Path) -> onnx.ModelProto:
    """Save `model` at `path` after checking it has standard ops and the intended names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != input_names or got_out != output_names:
        raise RuntimeError(f"{path}: exported graph's inputs/outputs {got_in} -> {got_out} "
                           f"differ from the intended {input_names} -> {output_names}")
    domains = {n.domain for n in model.graph.node} - {"", "ai.onnx"}
    if domains:
        raise RuntimeError(f"{path}: graph uses non-standard op domains {domains}")
    return model


def describe(model: onnx.ModelProto, path: str) -> dict:
    """The manifest entry of a graph: file and every input/output's name, shape and dtype."""
    def tensors(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            out.append({"name": v.name, "shape": [d.dim_value for d in t.shape.dim],
                        "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name})
        return out
    return {"file": path, "inputs": tensors(model.graph.input), "outputs": tensors(model.graph.output)}
