"""local, mono-forward and backprop, desktop side: a sequential model cut into units.

Each unit is a slice of the model's layers and a classifier on its output:
    local         a linear auxiliary head (with bias) per block; blocks from --blocks
    mono-forward  a projection M_i (no bias) to class scores per layer; blocks = every layer
    backprop      one unit, the whole model; its last layer gives the class scores
A unit whose output already is the class scores (the model's last layer) needs no head.
The unit's output h goes to the next unit detached: no gradient crosses units.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeprop.errors import EdgepropError

from .. import graph_model
from .. import layers as L
from ..models import cross_entropy
from . import Spec, UnitSpec
from .noprop_dt import model_input_shape

HEADS = {"local": "linear", "mono-forward": "projection", "backprop": "none"}

OPTIONS = {"input_shape", "trainable"}  # rule-specific export options it reads (rules.create refuses others)


class ChainedUnit(nn.Module):
    def __init__(self, body: nn.Sequential, head: nn.Module):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x):  # -> (h, class scores), or (class scores,) when h already is them
        h = self.body(x)
        return (h,) if isinstance(self.head, nn.Identity) else (h, self.head(h))


def _head(kind: str, out_shape: list[int], classes: int, last: bool) -> nn.Module:
    if last and out_shape == [classes]:
        return nn.Identity()
    if kind == "none":
        raise EdgepropError(f"the model's output has shape {out_shape}; back-prop needs its last layer to give "
                            f"the {classes} class scores")
    features = int(np.prod(out_shape))
    linear = nn.Linear(features, classes, bias=(kind == "linear"))
    return linear if len(out_shape) == 1 else nn.Sequential(nn.Flatten(), linear)


class Chained:
    def __init__(self, model: dict):
        self.model = model
        self.layers = model["layers"]
        self.shapes = [model["input_shape"]]  # input shape of each unit, then the output's
        for a, b in model["blocks"]:
            self.shapes.append(L.output_shape(L.build(self.layers[a:b]), self.shapes[-1]))


    def _index(self, unit) -> int:
        return next(i for i, name in enumerate(self.model["unit_names"]) if name == unit.name)

    def module(self, unit) -> ChainedUnit:
        k = self._index(unit)
        a, b = self.model["blocks"][k]
        last = k == len(self.model["blocks"]) - 1
        return ChainedUnit(L.build(self.layers[a:b]),
                           _head(self.model["head"], self.shapes[k + 1], self.model["num_classes"], last))

    def _x(self, unit, batch):
        return torch.randn(batch, *self.shapes[self._index(unit)], generator=torch.Generator().manual_seed(0))

    def step_inputs(self, unit, batch):
        classes = self.model["num_classes"]
        return {"x": self._x(unit, batch), "target": torch.eye(classes)[torch.arange(batch) % classes],
                "mask": torch.ones(batch)}

    def infer_inputs(self, unit, batch):
        return {"x": self._x(unit, batch)}

    def infer_outputs(self, unit):
        k = self._index(unit)
        scores_only = k == len(self.model["blocks"]) - 1 and self.shapes[-1] == [self.model["num_classes"]]
        return ["logits"] if scores_only else ["h", "logits"]

    def loss(self, unit, module, feeds):
        out = module(feeds["x"])
        return cross_entropy(out[-1], feeds["target"], feeds["mask"]), {"h": out[0].detach()}


def create(o, train) -> Spec:
    classes = int(train.y.max()) + 1
    head = HEADS[o.rule]
    if isinstance(o.model, nn.Module) and graph_model.wants_capture(o):
        if o.rule == "mono-forward":
            raise EdgepropError("--rule mono-forward takes a Sequential of the classic layers; use local")
        names = (lambda n: ["network"]) if o.rule == "backprop" else (lambda n: [f"block{k + 1}" for k in range(n)])
        return graph_model.create(o, train, head, names)
    if isinstance(o.model, nn.Module):
        model, source = o.model, "user"
        first = next(d["type"] for d in L.describe(model) if d["type"] in L.TRAINABLE)
        kind = "mlp" if first == "Linear" else "cnn"
        input_shape = o.extra.get("input_shape") or model_input_shape(kind, train.x.shape[1:])
    elif o.model == "mlp" and "trainable" in o.extra:
        raise EdgepropError("--trainable applies to your own model (--model FILE.py:FUNCTION); the built-in mlp "
                            "trains every parameter")
    elif o.model == "mlp":
        source, input_shape = "mlp", [int(np.prod(train.x.shape[1:]))]
        torch.manual_seed(o.seed)
        model = L.mlp(input_shape[0], classes, o.width or 128, o.depth)
        if o.rule == "mono-forward":  # every hidden layer is scored by its own projection
            model = model[:-1]
    else:
        raise EdgepropError(f"--rule {o.rule}: --model must be mlp or a torch.nn.Sequential (Python API)")
    layers = L.describe(model)
    if o.rule == "backprop":
        boundaries = "none"
    elif o.rule == "mono-forward":
        if o.blocks not in (None, "every-layer"):
            raise EdgepropError("--rule mono-forward trains every layer on its own; leave --blocks out")
        boundaries = "every-layer"
    else:
        boundaries = "every-layer" if o.blocks is None else o.blocks
    ranges = L.split(layers, boundaries)
    names = ["network"] if o.rule == "backprop" else [f"block{k + 1}" for k in range(len(ranges))]
    spec_model = {"kind": "sequential", "source": source, "input_shape": [int(s) for s in input_shape],
                  "num_classes": classes, "layers": layers, "blocks": ranges, "head": head, "unit_names": names}
    try:
        rule = Chained(spec_model)
    except RuntimeError as e:  # a layer cannot take the previous one's output
        raise EdgepropError(f"the model cannot run on inputs of shape {list(input_shape)}: {e}") from None
    torch.manual_seed(o.seed)
    units = []
    for k, name in enumerate(names):
        probe = UnitSpec(name, "network" if o.rule == "backprop" else "block", name, None, o.lr)
        module = rule.module(probe)
        a, b = ranges[k]
        with torch.no_grad():  # the user's (or seeded) weights
            for mine, theirs in zip(module.body.parameters(), model[a:b].parameters()):
                mine.copy_(theirs)
        probe.module = module
        units.append(probe)
    return Spec(rule, spec_model, units)


def from_bundle(bundle):
    return graph_model.from_bundle(bundle) if bundle.model.get("kind") == "graph" else Chained(bundle.model)
