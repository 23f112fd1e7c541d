"""zeroth-order, desktop side: SPSA / MeZO fine-tuning with the model's inference graph only.

The network is back-prop's single unit (a whole torch.nn.Sequential, named "model"), but
nothing is differentiated: the bundle holds its inference graph (param, x) -> logits and
no step graph (its device half declares `updates_itself`), and its state is "param" alone, no optimizer slots.
The device estimates the gradient from two forward passes per direction (edgeprop.rules.
zeroth_order). Options (export keywords, or `edgeprop export` flags):

    zo_eps         ε, the perturbation's scale (default 1e-3)
    zo_directions  n, random directions averaged per step (default 1)
    zo_layers      which layers are perturbed and updated: "all" (default), "last-K" (the
                   last K trainable layers) or indices of trainable layers ("4" or [2, 4])
    init           a bundle (path) whose trained weights are the starting point: one unit
                   with the same layers (a `backprop` bundle of the same --model/--width/
                   --depth, or another zeroth-order bundle); its checkpoint if it has one,
                   else its initial weights; and its input normalisation, which its weights
                   were trained with
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from edgeprop import bundle as bundles
from edgeprop.errors import EdgepropError

from .. import graph_model
from ..trace import layout
from . import Spec
from . import chained as chained_rule
from .chained import Chained

OPTIONS = {"input_shape", "zo_eps", "zo_directions", "zo_layers", "init", "trainable"}

CHUNK = 1 << 16  # perturbation elements generated at a time: the device's only scratch buffer


class ZerothOrder(Chained):
    """Back-prop's network and inference graph; the device half performs the update."""


def _number(options: dict, key: str, default, kind):
    value = options.get(key)
    if value is None:
        return default
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise EdgepropError(f"--{key.replace('_', '-')} must be a number, got {value!r}") from None


def _layers(choice, layers: list[dict]) -> list[int]:
    """The indices of the trainable layers that zo_layers picks."""
    trainable = [i for i, d in enumerate(layers) if d["type"] in ("Linear", "Conv2d")]
    if choice is None or choice == "all":
        return trainable
    if isinstance(choice, str) and choice.startswith("last-"):
        k = choice[len("last-"):]
        if not k.isdigit() or not 1 <= int(k) <= len(trainable):
            raise EdgepropError(f"--zo-layers {choice}: K in last-K must be 1..{len(trainable)} "
                                f"(the model has {len(trainable)} trainable layers)")
        return trainable[-int(k):]
    try:
        picked = sorted({int(i) for i in (choice.split(",") if isinstance(choice, str) else choice)})
    except (TypeError, ValueError):
        raise EdgepropError(f"--zo-layers {choice!r}: all, last-K, or indices of trainable layers "
                            f"({', '.join(map(str, trainable))})") from None
    wrong = [i for i in picked if i not in trainable]
    if wrong or not picked:
        raise EdgepropError(f"--zo-layers {choice!r}: {wrong or 'nothing'} is not a trainable layer; "
                            f"the trainable layers are {', '.join(map(str, trainable))}")
    return picked


def _ranges(views: list[dict], picked: list[int]) -> list[list[int]]:
    """[start, end) spans of the flat parameter buffer holding the picked layers' tensors
    (names are body.<layer>.weight/bias); adjacent spans merged."""
    spans = []
    for v in views:
        if int(v["name"].split(".")[1]) in picked:
            a, b = v["offset"], v["offset"] + math.prod(v["shape"])
            if spans and spans[-1][1] == a:
                spans[-1][1] = b
            else:
                spans.append([a, b])
    return spans


def _initial_weights(path, model: dict, views: list[dict]) -> tuple[np.ndarray, dict]:
    """The trained flat parameters and input normalisation of the bundle at `path`."""
    from edgeprop.trainer import load_trained_state
    other = bundles.load(path)
    if len(other.units) != 1 or other.model.get("layers") != model.get("layers"):
        raise EdgepropError(f"--init {path}: its model ({other.rule}, {len(other.units)} unit(s)) is not this "
                            f"one; give a backprop or zeroth-order bundle of the same --model/--width/--depth")
    unit = other.units[0]
    if [(v.name, list(v.shape)) for v in unit.layout] != [(v["name"], v["shape"]) for v in views]:
        raise EdgepropError(f"--init {path}: its parameters are laid out differently from this model's")
    state, _ = load_trained_state(other)
    mean, std = other.input_norm
    return state[unit.name]["param"], {"mean": mean, "std": std}


def create(o, train) -> Spec:
    x = o.extra
    eps = _number(x, "zo_eps", 1e-3, float)
    directions = _number(x, "zo_directions", 1, int)
    if not (np.isfinite(eps) and eps > 0):
        raise EdgepropError(f"--zo-eps must be a positive number, got {eps}")
    if directions < 1:
        raise EdgepropError(f"--zo-directions must be at least 1, got {directions}")
    if o.blocks not in (None, "none"):
        raise EdgepropError("--rule zeroth-order trains the whole model as one unit; leave --blocks out")
    # The network is back-prop's: one unit, the whole model, its last layer the class scores.
    # Inference graphs only: a captured model's BatchNorm keeps its running statistics.
    spec = chained_rule.create(replace(o, rule="backprop", extra={**x, "batch_statistics": False}), train)
    spec.model["unit_names"] = ["model"]
    unit = replace(spec.units[0], name="model", role="model", graph="model")
    views = layout(unit.module)
    if spec.model["kind"] == "graph":  # a captured model: `trainable` chose what is perturbed
        if x.get("zo_layers") is not None:
            raise EdgepropError("--zo-layers applies to a Sequential of the classic layers; for this model choose "
                                "what trains with --trainable")
        spec.model["units"][0]["name"] = "model"
        spec.arrays = {"model/constants": spec.arrays.pop("network/constants")}
        rule = graph_model.GraphChained(spec.model, {"model": spec.arrays["model/constants"]})
        picked, ranges = [], [[0, sum(math.prod(v["shape"]) for v in views)]]
    else:
        rule = ZerothOrder(spec.model)
        picked = _layers(x.get("zo_layers"), spec.model["layers"])
        ranges = _ranges(views, picked)
    manifest = {"optimizer": {"name": "zeroth-order-sgd", "slots": []},
                "zeroth_order": {"eps": eps, "directions": directions, "layers": picked, "ranges": ranges,
                                 "chunk": CHUNK}}
    if x.get("init") is not None:
        flat, manifest["input_norm"] = _initial_weights(x["init"], spec.model, views)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.from_numpy(flat.copy()), unit.module.parameters())
    unit.scratch = 4 * min(CHUNK, max(b - a for a, b in ranges))  # one float32 chunk of z
    return Spec(rule, spec.model, [unit], manifest, arrays=spec.arrays)


def from_bundle(bundle):
    return graph_model.from_bundle(bundle) if bundle.model.get("kind") == "graph" else ZerothOrder(bundle.model)
