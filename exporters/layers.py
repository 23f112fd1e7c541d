"""Sequential models as data: the layers edgeprop can compile, to and from the manifest.

A bundle describes its network as a list of layers (JSON), so the torch reference can
rebuild exactly what was exported, and a user's model is checked layer by layer before any
tracing: an unsupported layer is an export error naming it and listing what is supported.
"""
from __future__ import annotations

import torch
from torch import nn

from edgeprop.errors import EdgepropError


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


# type -> (attributes read off the module, constructor from those attributes)
LAYERS = {
    "Linear": (lambda m: {"in": m.in_features, "out": m.out_features, "bias": m.bias is not None},
               lambda d: nn.Linear(d["in"], d["out"], bias=d["bias"])),
    "Conv2d": (lambda m: {"in": m.in_channels, "out": m.out_channels, "kernel": _pair(m.kernel_size),
                          "stride": _pair(m.stride), "padding": _pair(m.padding), "dilation": _pair(m.dilation),
                          "groups": m.groups, "bias": m.bias is not None},
               lambda d: nn.Conv2d(d["in"], d["out"], d["kernel"], d["stride"], d["padding"], d["dilation"],
                                   d["groups"], bias=d["bias"])),
    "ReLU": (lambda m: {}, lambda d: nn.ReLU()),
    "LeakyReLU": (lambda m: {"slope": m.negative_slope}, lambda d: nn.LeakyReLU(d["slope"])),
    "Tanh": (lambda m: {}, lambda d: nn.Tanh()),
    "Sigmoid": (lambda m: {}, lambda d: nn.Sigmoid()),
    "GELU": (lambda m: {"approximate": m.approximate}, lambda d: nn.GELU(approximate=d["approximate"])),
    "Flatten": (lambda m: {"start": m.start_dim, "end": m.end_dim}, lambda d: nn.Flatten(d["start"], d["end"])),
    "MaxPool2d": (lambda m: {"kernel": _pair(m.kernel_size), "stride": _pair(m.stride or m.kernel_size),
                             "padding": _pair(m.padding)},
                  lambda d: nn.MaxPool2d(d["kernel"], d["stride"], d["padding"])),
    "AvgPool2d": (lambda m: {"kernel": _pair(m.kernel_size), "stride": _pair(m.stride or m.kernel_size),
                             "padding": _pair(m.padding)},
                  lambda d: nn.AvgPool2d(d["kernel"], d["stride"], d["padding"])),
    "Identity": (lambda m: {}, lambda d: nn.Identity()),
}
TRAINABLE = ("Linear", "Conv2d")


def describe(model: nn.Module) -> list[dict]:
    """The layers of a torch.nn.Sequential as JSON; refuses anything edgeprop cannot compile."""
    if not isinstance(model, nn.Sequential):
        raise EdgepropError(f"edgeprop exports a torch.nn.Sequential; got {type(model).__name__}")
    layers = []
    for i, layer in enumerate(model):
        kind = type(layer).__name__
        if kind not in LAYERS or type(layer) is not getattr(nn, kind):
            raise EdgepropError(f"layer {i} ({kind}) is not supported; supported layers: {', '.join(LAYERS)}")
        layers.append({"type": kind, **LAYERS[kind][0](layer)})
    if not any(layer["type"] in TRAINABLE for layer in layers):
        raise EdgepropError("the model has no trainable layer (Linear or Conv2d)")
    return layers


def build(layers: list[dict]) -> nn.Sequential:
    return nn.Sequential(*(LAYERS[d["type"]][1](d) for d in layers))


def split(layers: list[dict], boundaries="every-layer") -> list[list[int]]:
    """Block boundaries -> [[start, end), ...]. "every-layer": each trainable layer starts a
    block and takes the parameter-free layers after it (ReLU, pooling, ...); a list of layer
    indices: where blocks start (0 is implied); "none": one block."""
    n = len(layers)
    if boundaries == "none":
        starts = [0]
    elif boundaries == "every-layer":
        starts = [i for i, d in enumerate(layers) if d["type"] in TRAINABLE]
        starts[0] = 0
    else:
        try:
            starts = sorted({0, *(int(i) for i in boundaries)})
        except (TypeError, ValueError):
            raise EdgepropError(f"block boundaries must be 'every-layer', 'none' or layer indices; "
                                f"got {boundaries!r}") from None
        if starts[-1] >= n or starts[0] < 0:
            raise EdgepropError(f"block boundaries {list(boundaries)} must be layer indices in 0..{n - 1}")
    ranges = [[a, b] for a, b in zip(starts, starts[1:] + [n])]
    for a, b in ranges:
        if not any(layers[i]["type"] in TRAINABLE for i in range(a, b)):
            raise EdgepropError(f"block of layers {a}..{b - 1} has nothing to train (no Linear or Conv2d)")
    return ranges


def mlp(in_features: int, classes: int, width: int, depth: int) -> nn.Sequential:
    """The built-in `--model mlp` for sequential rules: `depth` hidden ReLU layers."""
    if depth < 1:
        raise EdgepropError("--depth must be at least 1")
    dims = [in_features] + [width] * depth
    layers = []
    for a, b in zip(dims, dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def output_shape(layers: nn.Module, input_shape: list[int]) -> list[int]:
    with torch.no_grad():
        return list(layers(torch.zeros(1, *input_shape)).shape[1:])
