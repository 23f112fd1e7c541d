"""Compile one unit's whole training step into an ordinary inference graph.

    step(params, optimizer state, inputs, lr, step) -> (params', optimizer state', loss)

torch.func.grad_and_value takes the in-block gradient, make_fx traces the step into an FX
graph of plain aten ops, and torch.onnx's dynamo exporter lowers that to ONNX.
(`torch.onnx.export` straight on a function that calls torch.func fails: DESIGN.md.)
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from .models import unit_loss
from .optim import Optimizer

ONNX_OPSET = 18


def step_signature(module: nn.Module, opt: Optimizer, data: dict[str, torch.Tensor]):
    """Input and output names of a unit's step graph, in order."""
    pnames = [n for n, _ in module.named_parameters()]
    state = [f"param.{n}" for n in pnames] + [f"opt.{s}.{n}" for s in opt.slots for n in pnames]
    inputs = state + list(data) + ["lr", "step"]
    outputs = [f"next.{k}" for k in state] + ["loss"]
    return pnames, inputs, outputs


def trace_step(module: nn.Module, role: str, opt: Optimizer, data: dict[str, torch.Tensor]):
    """FX graph of one unit's step and its example arguments (shapes fix the batch size)."""
    pnames, inputs, outputs = step_signature(module, opt, data)
    k, data_names = len(pnames), list(data)

    def step(*args):
        params = dict(zip(pnames, args[:k]))
        slots = {s: dict(zip(pnames, args[k * (i + 1):k * (i + 2)])) for i, s in enumerate(opt.slots)}
        feeds = dict(zip(data_names, args[k * (1 + len(opt.slots)):-2]))
        lr, n = args[-2], args[-1]

        def loss_of(p):
            return unit_loss(role, lambda *a: torch.func.functional_call(module, p, a), feeds)

        grads, loss = torch.func.grad_and_value(loss_of)(params)
        new_p, new_s = [], {s: [] for s in opt.slots}
        for name in pnames:
            p, st = opt.update(params[name], grads[name], {s: slots[s][name] for s in opt.slots}, lr, n)
            new_p.append(p)
            for s in opt.slots:
                new_s[s].append(st[s])
        return (*new_p, *[t for s in opt.slots for t in new_s[s]], loss)

    params = [p.detach().clone() for p in module.parameters()]
    args = [*params, *[torch.zeros_like(p) for _ in opt.slots for p in params], *data.values(),
            torch.tensor(1e-3), torch.tensor(1.0)]  # example lr and step; both are inputs
    return make_fx(step)(*args), args, inputs, outputs


def trace_infer(module: nn.Module, data: dict[str, torch.Tensor], output: str):
    pnames = [n for n, _ in module.named_parameters()]
    k = len(pnames)

    def infer(*args):
        return torch.func.functional_call(module, dict(zip(pnames, args[:k])), tuple(args[k:]))

    args = [p.detach().clone() for p in module.parameters()] + list(data.values())
    return make_fx(infer)(*args), args, [f"param.{n}" for n in pnames] + list(data), [output]


def to_onnx(graph_module, args, input_names, output_names, path: Path) -> onnx.ModelProto:
    """Export with standard ai.onnx ops only and check the result."""
    # optimize=False: onnxscript's optimizer folds AdamW's `+ 1e-8` away as if it were `+ 0`
    # (a 1e-8 constant is within np.allclose's default atol of zero), which turns every
    # zero gradient into 0/0 = NaN. Seen at batch 1, where dead ReLUs make zero gradients.
    # onnxruntime applies its own graph optimisations when it loads the graph.
    quiet = contextlib.redirect_stdout(io.StringIO())
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with quiet, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph_module, tuple(args), dynamo=True, optimize=False, verbose=False,
                                    opset_version=ONNX_OPSET, input_names=input_names, output_names=output_names)
    model = program.model_proto
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
