"""The convolution gradient as forward convolutions: against autograd, and through ONNX."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeprop.exporters.conv_grad import DECOMPOSITIONS, conv2d_grads, max_pool2d_grad
from edgeprop.exporters.models import cross_entropy
from edgeprop.exporters.optim import Optimizer
from edgeprop.exporters.tflite import to_tflite
from edgeprop.exporters.trace import to_onnx, trace_step

CASES = [  # (n, c_in, c_out, h, w, k, stride, padding, dilation, groups)
    (2, 1, 8, 28, 28, 3, 1, 1, 1, 1),
    (3, 4, 6, 9, 11, 3, 2, 1, 1, 2),
    (1, 3, 5, 10, 7, (3, 2), (2, 3), (0, 1), (1, 2), 1),
    (2, 6, 6, 8, 8, 3, 1, 2, 2, 6),     # depthwise
    (4, 2, 4, 13, 13, 5, 3, 2, 1, 2),   # stride skips the last rows
    (1, 1, 1, 5, 5, 1, 1, 0, 1, 1),
]


@pytest.mark.parametrize("case", CASES)
def test_conv_gradients_match_autograd(case):
    n, c_in, c_out, h, w, k, stride, padding, dilation, groups = case
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    k, stride, padding, dilation = map(pair, (k, stride, padding, dilation))
    g = torch.Generator().manual_seed(sum(map(hash, map(str, case))) % 2**31)
    x = torch.randn(n, c_in, h, w, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(c_out, c_in // groups, *k, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(c_out, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
    grad_out = torch.randn(y.shape, dtype=torch.float64, generator=g)
    expected = torch.autograd.grad(y, (x, weight, bias), grad_out)
    got = conv2d_grads(grad_out, x.detach(), weight.detach(), stride, padding, dilation, groups)
    for name, e, a in zip(("input", "weight", "bias"), expected, got):
        assert a.shape == e.shape, name
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


POOLS = [  # (n, c, h, w, kernel, stride, padding, dilation, input: ties where values repeat)
    (2, 3, 8, 8, (2, 2), (2, 2), (0, 0), (1, 1), "relu"),     # the paper's 2x2 pool after a ReLU
    (1, 2, 9, 7, (3, 3), (2, 2), (1, 1), (1, 1), "normal"),   # overlapping windows, padding
    (2, 2, 10, 10, (3, 2), (1, 2), (1, 0), (2, 1), "relu"),   # rectangular, dilated, stride 1
    (1, 1, 5, 5, (2, 2), (2, 2), (0, 0), (1, 1), "normal"),   # the last row and column unused
    (2, 2, 9, 9, (3, 3), (2, 2), (1, 1), (1, 1), "integers"),  # ties everywhere: the first max wins
]


@pytest.mark.parametrize("case", POOLS)
def test_max_pool_gradient_matches_autograd(case):
    n, c, h, w, kernel, stride, padding, dilation, values = case
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    x = {"normal": x, "relu": x.clamp(min=0), "integers": x.mul(1.5).round()}[values].requires_grad_(True)
    y = F.max_pool2d(x, kernel, stride, padding, dilation)
    g = torch.randn_like(y)
    want, = torch.autograd.grad(y, x, g)
    got = max_pool2d_grad(g, x.detach(), kernel, stride, padding, dilation)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_traced_step_has_no_convolution_backward():
    from torch.fx.experimental.proxy_tensor import make_fx
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)

    def grads(weight, bias, x):
        return torch.func.grad(lambda w, b: torch.nn.functional.conv2d(x, w, b, 2, 1).square().sum(),
                               argnums=(0, 1))(weight, bias)

    graph = make_fx(grads, decomposition_table=DECOMPOSITIONS)(conv.weight.detach(), conv.bias.detach(),
                                                               torch.randn(2, 2, 9, 9))
    ops = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert not any("convolution_backward" in op for op in ops), ops


class SmallCNN(nn.Module):
    """A conv classifier: the pieces of the paper's image block (docs/noprop.md)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(8 * 4 * 4, 10))

    def forward(self, z):
        return self.net(z)


def run_exported(fmt, graph, args, inputs, outputs, folder):
    """The traced step exported as `fmt` and run by its engine: {output name: array}."""
    feeds = [a.numpy() for a in args]
    if fmt == "onnx":
        model = to_onnx(graph, args, inputs, outputs, folder / "cnn_step.onnx")
        assert {n.op_type for n in model.graph.node} >= {"Conv", "ConvTranspose", "MaxPool"}
        session = ort.InferenceSession(str(folder / "cnn_step.onnx"), providers=["CPUExecutionProvider"])
        return dict(zip(outputs, session.run(None, dict(zip(inputs, feeds)))))
    from ai_edge_litert.interpreter import Interpreter

    to_tflite(graph, args, folder / "cnn_step.tflite")
    interpreter = Interpreter(model_path=str(folder / "cnn_step.tflite"))
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert ops >= {"CONV_2D", "TRANSPOSE_CONV", "MAX_POOL_2D"}, ops
    got = interpreter.get_signature_runner()(**{f"args_{i}": a for i, a in enumerate(feeds)})
    return {name: got[f"output_{i}"] for i, name in enumerate(outputs)}


@pytest.mark.slow  # ONNX and .tflite exports
@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_conv_step_graph_exports_and_matches_torch(fmt, tmp_path):
    torch.manual_seed(0)
    module = SmallCNN()
    opt = Optimizer("adamw")
    batch = 4
    feeds = {"z": torch.randn(batch, 1, 14, 14), "target": torch.eye(10)[torch.arange(batch)],
             "mask": torch.ones(batch)}
    def loss_of(unit, module, feeds):
        return cross_entropy(module(feeds["z"]), feeds["target"], feeds["mask"]), {}

    graph, args, inputs, outputs = trace_step(module, loss_of, None, opt, feeds)
    backward = [str(n.target) for n in graph.graph.nodes if n.target in DECOMPOSITIONS]
    assert not backward, f"ops without an engine lowering left in the trace: {backward}"
    got = run_exported(fmt, graph, args, inputs, outputs, tmp_path)
    # torch eager: autograd through nn.Conv2d (its own convolution_backward), then the same update
    loss = cross_entropy(module(feeds["z"]), feeds["target"], feeds["mask"])
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(module.parameters()))])
    flat, lr, step = args[0], args[-2], args[-1]
    new_flat, slots = opt.update(flat, grad, {s: torch.zeros_like(flat) for s in opt.slots}, lr, step)
    expected = {"next.param": new_flat, "next.opt.m": slots["m"], "next.opt.v": slots["v"], "loss": loss}
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value.detach().numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
