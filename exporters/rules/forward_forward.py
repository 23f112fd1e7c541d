"""forward-forward, desktop side (Hinton 2022; docs/rules.md).

Every layer of a sequential MLP is a unit. Its step graph takes the previous layer's
outputs for positive data (the true label overlaid on the input) and negative data (a wrong
label), both detached, and pushes the goodness G = mean(h²) of positive data above θ and of
negative data below it:

    x̂ = x / (‖x‖ + 1e-4),  h = act(W x̂ + b),  loss = softplus(θ − G_pos) + softplus(G_neg − θ)

A `readout` unit (role head) is a linear softmax on the length-normalised activities of
layers 2..L (all layers when L = 1) under a neutral label: the one-pass prediction.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeprop.errors import EdgepropError

from .. import layers as L
from ..models import cross_entropy
from . import Spec, UnitSpec

# Measured on digits (docs/rules.md): at 1e-3 both layers first push every goodness up to θ through
# their biases and stay near chance for 100 epochs; 0.03 reaches 90% in 60.
DEFAULT_LR = 0.03

OPTIONS = {"input_shape", "threshold"}

DEFAULT_THRESHOLD = 2.0
FLAT_LAYERS = {"Linear", "ReLU", "LeakyReLU", "Tanh", "Sigmoid", "GELU", "Identity"}


def length_normalise(x):
    """No mean subtraction: the direction of x passes on, its length (the goodness) does not."""
    flat = x.flatten(1)
    return flat / (flat.norm(dim=1, keepdim=True) + 1e-4)


class FFLayer(nn.Module):
    def __init__(self, body: nn.Sequential):
        super().__init__()
        self.body = body

    def forward(self, x):  # -> (h, goodness per sample)
        h = self.body(length_normalise(x))
        return h, (h * h).mean(dim=1)


class Readout(nn.Module):
    def __init__(self, sizes: list[int], classes: int):
        super().__init__()
        self.sizes = sizes
        self.linear = nn.Linear(sum(sizes), classes)

    def forward(self, a):  # a: the read layers' activities side by side, each normalised on its own
        ends = np.cumsum([0, *self.sizes]).tolist()  # slices, not split: ONNX shape inference leaves Split unsized
        return self.linear(torch.cat([length_normalise(a[:, s:e]) for s, e in zip(ends, ends[1:])], dim=1))


def linears(model: dict) -> list[dict]:
    """Each unit's Linear layer."""
    return [next(d for d in model["layers"][a:b] if d["type"] == "Linear") for a, b in model["blocks"]]


def readout_layers(n_layers: int) -> list[int]:
    """Layer indices the readout reads: the first layer sees the label, so skip it if there are others."""
    return list(range(1, n_layers)) if n_layers > 1 else [0]


class ForwardForward:
    def __init__(self, model: dict):
        self.model = model
        self.classes = model["num_classes"]
        self.widths = [d["out"] for d in linears(model)]
        self.inputs = [int(np.prod(model["input_shape"]))] + self.widths[:-1]
        self.read = [self.widths[k] for k in model["readout_layers"]]

    def _index(self, unit) -> int:
        return self.model["unit_names"].index(unit.name)

    def module(self, unit):
        if unit.role == "head":
            return Readout(self.read, self.classes)
        a, b = self.model["blocks"][self._index(unit)]
        return FFLayer(L.build(self.model["layers"][a:b]))

    def _x(self, unit, batch, seed=0):
        features = sum(self.read) if unit.role == "head" else self.inputs[self._index(unit)]
        return torch.randn(batch, features, generator=torch.Generator().manual_seed(seed))

    def step_inputs(self, unit, batch):
        mask = torch.ones(batch)
        if unit.role == "head":
            return {"a": self._x(unit, batch), "target": torch.eye(self.classes)[torch.arange(batch) % self.classes],
                    "mask": mask}
        return {"x_pos": self._x(unit, batch), "x_neg": self._x(unit, batch, 1), "mask": mask}

    def infer_inputs(self, unit, batch):
        return {"a" if unit.role == "head" else "x": self._x(unit, batch)}

    def infer_outputs(self, unit):
        return ["logits"] if unit.role == "head" else ["h", "goodness"]

    def loss(self, unit, module, feeds):
        mask = feeds["mask"]
        if unit.role == "head":
            return cross_entropy(module(feeds["a"]), feeds["target"], mask), {}
        theta = self.model["threshold"]
        h_pos, g_pos = module(feeds["x_pos"])
        h_neg, g_neg = module(feeds["x_neg"])
        per_sample = F.softplus(theta - g_pos) + F.softplus(g_neg - theta)
        loss = (per_sample * mask).sum() / mask.sum().clamp(min=1.0)
        return loss, {"h_pos": h_pos.detach(), "h_neg": h_neg.detach()}


def create(o, train) -> Spec:
    classes = int(train.y.max()) + 1
    features = int(np.prod(train.x.shape[1:]))
    if features <= classes:
        raise EdgepropError(f"--rule forward-forward overlays the label on the first {classes} input features; "
                            f"samples have only {features}")
    theta = o.extra.get("threshold", DEFAULT_THRESHOLD)
    if not (isinstance(theta, (int, float)) and math.isfinite(theta) and theta > 0):
        raise EdgepropError(f"--threshold must be a positive number; got {theta!r}")
    if o.blocks not in (None, "every-layer"):
        raise EdgepropError("--rule forward-forward trains every layer on its own; leave --blocks out")
    if isinstance(o.model, nn.Module):
        model, source = o.model, "user"
    elif o.model == "mlp":
        torch.manual_seed(o.seed)
        model, source = L.mlp(features, classes, o.width or 128, o.depth)[:-1], "mlp"  # hidden layers only
    else:
        raise EdgepropError("--rule forward-forward: --model must be mlp or a torch.nn.Sequential (Python API)")
    layers = L.describe(model)
    other = sorted({d["type"] for d in layers} - FLAT_LAYERS)
    if other:
        raise EdgepropError(f"--rule forward-forward trains Linear layers and activations; "
                            f"the model has {', '.join(other)}")
    ranges = L.split(layers, "every-layer")
    for _, b in ranges:  # tanh and sigmoid outputs are at most 1 in size: no goodness above θ ≥ 1
        if layers[b - 1]["type"] in ("Tanh", "Sigmoid") and theta >= 1:
            raise EdgepropError(f"layer {b - 1} ({layers[b - 1]['type']}) keeps the goodness mean(h²) below 1; "
                                f"--threshold {theta:g} cannot be reached (use a threshold below 1, or ReLU)")
    lin = linears({"layers": layers, "blocks": ranges})
    for k, d in enumerate(lin):
        fed = features if k == 0 else lin[k - 1]["out"]
        if d["in"] != fed:
            raise EdgepropError(f"the model's Linear layer {k + 1} takes {d['in']} features; it is given {fed}")
    # The overlay value: the largest normalised input, as large as any real pixel (mpezeshki's x.max()).
    mean, std = float(train.x.mean(dtype=np.float64)), float(train.x.std(dtype=np.float64)) or 1.0
    names = [f"layer{k + 1}" for k in range(len(ranges))] + ["readout"]
    spec_model = {"kind": "sequential", "source": source, "input_shape": [features], "num_classes": classes,
                  "layers": layers, "blocks": ranges, "unit_names": names, "threshold": float(theta),
                  "overlay": float((float(train.x.max()) - mean) / std), "readout_layers": readout_layers(len(ranges))}
    rule = ForwardForward(spec_model)
    torch.manual_seed(o.seed)
    units, graph_of = [], {}  # layers of the same shape share graph files
    for k, (a, b) in enumerate(ranges):
        key = graph_of.setdefault(repr(layers[a:b]), names[k])
        unit = UnitSpec(names[k], "block", key, None, o.lr)
        unit.module = rule.module(unit)
        with torch.no_grad():  # the user's (or seeded) weights
            for mine, theirs in zip(unit.module.body.parameters(), model[a:b].parameters()):
                mine.copy_(theirs)
        units.append(unit)
    head = UnitSpec("readout", "head", "readout", None, o.head_lr)
    head.module = rule.module(head)
    units.append(head)
    return Spec(rule, spec_model, units)


def from_bundle(bundle) -> ForwardForward:
    return ForwardForward(bundle.model)
