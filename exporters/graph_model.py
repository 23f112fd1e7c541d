"""local, mono-forward, backprop and zeroth-order for any traceable torch.nn.Module (desktop).

The model is captured (capture.py), cut into units at the modules named by `blocks`
(graph_units.py) and each unit gets a classifier on its output, as for a Sequential:
    local         a default auxiliary head: global average pool + linear for a feature map
                  (C, H, W), linear otherwise
    backprop      one unit, the whole model: its output must be the class scores
`trainable` picks the parameters that train (capture._choose); the rest are constants.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeprop.bundle import INIT_STATE
from edgeprop.errors import EdgepropError
from edgeprop.storage import open_arrays

from . import capture
from .conv_grad import STEP_DECOMPOSITIONS
from .graph_units import GraphUnit, constants_of, cut, split_constants, unit_graph
from .models import cross_entropy
from .rules import Spec, UnitSpec


def head_for(kind: str, shape: list[int], classes: int, last: bool) -> tuple[str, nn.Module]:
    """(description, module) of the classifier a unit with output `shape` is scored by."""
    if last and len(shape) == 1:
        if shape != [classes]:
            raise EdgepropError(f"the model's output has {shape[0]} class scores but the data has {classes} "
                                f"classes; change the model's last layer to {classes} outputs")
        return "none", nn.Identity()
    if kind == "none":
        raise EdgepropError(f"the model's output has shape {shape}; back-prop needs its last layer to give "
                            f"the {classes} class scores")
    desc = "pool-linear" if len(shape) == 3 else "linear"
    return desc, _head_module(desc, shape, classes, bias=kind == "linear")


def _head_module(desc: str, shape: list[int], classes: int, bias: bool) -> nn.Module:
    if desc == "none":
        return nn.Identity()
    if desc == "pool-linear":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(shape[0], classes, bias))
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape)), classes, bias))


class GraphChainedUnit(nn.Module):
    """A captured unit and its classifier. forward(x, [stats], *dropout masks, mask=None):
    training (a sample mask): (h, class scores[, updated statistics]); inference: (h, class
    scores), or (class scores,) when h already is them."""

    decompositions = STEP_DECOMPOSITIONS  # its step graph's every gradient in elementary ops

    def __init__(self, body: GraphUnit, head: nn.Module):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x, *rest, mask=None):
        out = self.body(x, *rest, mask=mask)
        h, stats = out if isinstance(out, tuple) else (out, None)
        if mask is None:
            return (h,) if isinstance(self.head, nn.Identity) else (h, self.head(h))
        return (h, self.head(h)) + ((stats,) if stats is not None else ())


class GraphChained:
    """The desktop rule object of a captured model's bundle."""

    def __init__(self, model: dict, constants: dict[str, np.ndarray]):
        self.model, self.constants = model, constants
        self.units = {u["name"]: u for u in model["units"]}

    def module(self, unit) -> GraphChainedUnit:
        u = self.units[unit.name]
        consts = split_constants(u, self.constants.get(unit.name, np.zeros(0, np.float32)))
        bias = self.model["head"] == "linear"
        return GraphChainedUnit(GraphUnit(u, consts), _head_module(u["head"], u["out_shape"],
                                                                   self.model["num_classes"], bias))

    def _x(self, unit, batch):
        shape = self.units[unit.name]["in_shape"]
        return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))

    def _extra(self, unit, batch, train: bool) -> dict:
        u = self.units[unit.name]
        feeds = {}
        if u["stats"]:
            feeds["stats"] = torch.from_numpy(np.concatenate(
                [np.r_[np.zeros(n), np.ones(n)] for _, n in u["stats"]]).astype(np.float32))
        if train:
            feeds.update({f"drop{k + 1}": torch.ones(batch, *shape) for k, (_, shape, _) in enumerate(u["dropout"])})
        return feeds

    def step_inputs(self, unit, batch):
        classes = self.model["num_classes"]
        return {"x": self._x(unit, batch), **self._extra(unit, batch, True),
                "target": torch.eye(classes)[torch.arange(batch) % classes], "mask": torch.ones(batch)}

    def infer_inputs(self, unit, batch):
        return {"x": self._x(unit, batch), **self._extra(unit, batch, False)}

    def infer_outputs(self, unit):
        return ["logits"] if self.units[unit.name]["head"] == "none" else ["h", "logits"]

    def loss(self, unit, module, feeds):
        u = self.units[unit.name]
        args = [feeds["x"]] + ([feeds["stats"]] if u["stats"] else [])
        args += [feeds[f"drop{k + 1}"] for k in range(len(u["dropout"]))]
        out = module(*args, mask=feeds["mask"])
        extras = {"h": out[0].detach()}
        if u["stats"]:
            extras["next.stats"] = out[2].detach()
        return cross_entropy(out[1], feeds["target"], feeds["mask"]), extras


def wants_capture(o) -> bool:
    """A user model goes through capture unless it is a Sequential of the classic layers
    with indices for blocks and every parameter training (bundles as they always were)."""
    from .layers import describe
    if "trainable" in o.extra or isinstance(o.blocks, list) and any(isinstance(b, str) for b in o.blocks):
        return True
    try:
        describe(o.model)
    except EdgepropError:
        return True
    return False


def create(o, train, head_kind: str, names_for) -> Spec:
    """The units of `o.model` (a torch.nn.Module) for a chained rule. `names_for(n)`: the
    units' names when there are n."""
    classes = int(train.y.max()) + 1
    trainable = o.extra.get("trainable", "all")
    shape, prepared = _prepared(o, train.x.shape[1:], trainable)
    example = torch.zeros(2, *shape)
    steps = capture.trace(prepared, example, train=True)
    infers = capture.trace(prepared, example, train=False)
    capture.check_ops(steps)
    blocks = _blocks(o.blocks, head_kind)
    cuts_train, outs_train = cut(steps, blocks)
    cuts_infer, outs_infer = cut(infers, blocks)
    tensors = {**dict(prepared.module.named_parameters()), **dict(prepared.module.named_buffers())}
    names = names_for(len(cuts_train))
    shapes = [list(shape)] + [_shape(infers, node) for node in outs_infer]
    units_json, units, arrays = [], [], {}
    torch.manual_seed(o.seed)
    for k, name in enumerate(names):
        g_train = unit_graph(steps, cuts_train[k], outs_train[k])
        g_infer = unit_graph(infers, cuts_infer[k], outs_infer[k])
        params = [r[len("param:"):] for r in g_train["inputs"] if r.startswith("param:")]
        consts = [r[len("const:"):] for r in g_train["inputs"] if r.startswith("const:")]
        consts += [r[len("const:"):] for r in g_infer["inputs"] if r.startswith("const:") and r[6:] not in consts]
        stats = [r[len("stats:"):] for r in g_train["inputs"] if r.startswith("stats:")]
        drops = [r[len("drop:"):] for r in g_train["inputs"] if r.startswith("drop:")]
        last = k == len(names) - 1
        desc, head = head_for(head_kind, shapes[k + 1], classes, last)
        spec = {"name": name, "in_shape": shapes[k], "out_shape": shapes[k + 1], "head": desc,
                "params": [[n, list(tensors[n].shape)] for n in params],
                "constants": [[n, list(tensors[n].shape)] for n in consts],
                "stats": [[s, prepared.stats[s]] for s in stats],
                "dropout": [[d, _drop_shape(steps, d), prepared.dropout[d]] for d in drops],
                "train": g_train, "eval": g_infer}
        if not params and isinstance(head, nn.Identity):
            raise EdgepropError(f"unit {name} has nothing to train with --trainable {trainable}; start units later "
                                f"(--blocks) or train more")
        body = GraphUnit(spec, {n: tensors[n] for n in consts})
        with torch.no_grad():
            for n, p in body.named_parameters():
                p.copy_(tensors[n])
        module = GraphChainedUnit(body, head)
        if stats:
            module.initial_stats = lambda s=stats: torch.cat([prepared.running[p] for p in s]).numpy()
        arrays[f"{name}/constants"] = constants_of(spec, tensors).numpy()
        units_json.append(spec)
        role = "network" if head_kind == "none" else "block"
        units.append(UnitSpec(name, role, name, module, o.lr))
    model = {"kind": "graph", "source": "user", "input_shape": [int(s) for s in shape], "num_classes": classes,
             "head": head_kind, "unit_names": names, "trainable": trainable if isinstance(trainable, str) else
             list(trainable), "units": units_json}
    constants = {name: arrays[f"{name}/constants"] for name in names}
    return Spec(GraphChained(model, constants), model, units, arrays=arrays)


def _blocks(blocks, head_kind) -> list[str]:
    if head_kind == "none" or blocks in (None, "none"):
        if head_kind == "none" and blocks not in (None, "none"):
            raise EdgepropError("--rule backprop trains the whole model as one unit; leave --blocks out")
        return []
    if not isinstance(blocks, list) or not all(isinstance(b, str) for b in blocks):
        raise EdgepropError(f"--blocks {blocks!r}: for a model that is not a plain Sequential, name the modules "
                            "where units start, e.g. layer2,layer3,fc")
    return blocks


def input_shape(o, sample_shape) -> list[int]:
    """The model's input shape for samples of `sample_shape` (see _prepared)."""
    return _prepared(o, sample_shape, "all")[0]


def _prepared(o, sample_shape, trainable) -> tuple[list[int], capture.Prepared]:
    """The model's input shape (example_input's, else the data's as images, else flat) and
    the model prepared for capture."""
    def prepare(shape):
        return capture.prepare(o.model, torch.zeros(2, *shape), trainable, o.extra.get("batch_statistics", True))
    if o.extra.get("input_shape"):
        shape = o.extra["input_shape"]
        return shape, prepare(shape)
    flat = [int(np.prod(sample_shape))]
    try:
        image = _input_shape(sample_shape)
    except EdgepropError:
        image = flat
    try:
        return image, prepare(image)
    except capture.InputShapeError:
        if image == flat:
            raise
        return flat, prepare(flat)  # an MLP's first Linear


def _input_shape(sample_shape) -> list[int]:
    if len(sample_shape) == 3:
        return [int(s) for s in sample_shape]
    if len(sample_shape) == 2:
        return [1, int(sample_shape[0]), int(sample_shape[1])]
    side = int(round(np.sqrt(sample_shape[0])))
    if side * side != int(np.prod(sample_shape)):
        raise EdgepropError(f"samples have shape {list(sample_shape)}; pass example_input for the model's input shape")
    return [1, side, side]


def _shape(c: capture.Captured, node: str | None) -> list[int]:
    """The traced value's shape (batch dropped) of `node`, or of the model's output (None)."""
    nodes = {n.name: n for n in c.graph.graph.nodes}
    if node is None:
        node = next(n for n in c.graph.graph.nodes if n.op == "output").args[0][0].name
    return list(nodes[node].meta["val"].shape[1:])


def _drop_shape(c: capture.Captured, path: str) -> list[int]:
    node = [n for n in c.graph.graph.nodes if n.op == "placeholder"][c.inputs.index(f"drop:{path}")]
    return list(node.meta["val"].shape[1:])


def from_bundle(bundle) -> GraphChained:
    with open_arrays(bundle.path(INIT_STATE)) as (arrays, _):
        constants = {u["name"]: np.array(arrays[f"{u['name']}/constants"]) for u in bundle.model["units"]}
    return GraphChained(bundle.model, constants)
