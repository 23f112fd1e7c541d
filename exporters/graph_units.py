"""A captured model cut into units at named modules, each unit's graph as JSON data.

A unit's graph is stored in the manifest as a list of aten ops (no pickle, no code): the
torch reference rebuilds the very graph that was exported and runs it eagerly with
autograd, and the exporter traces the step through the same GraphUnit. The units' trained
parameters live in the flat "param" buffer; frozen ones and fixed buffers are constants
("UNIT/constants" in state/init.npz, baked into the graphs).
"""
from __future__ import annotations

import math
import operator

import torch
from torch import nn

from edgeprop.errors import EdgepropError

from .capture import SENTINEL_BATCH, SUPPORTED, Captured, op_name

aten = torch.ops.aten


def cut(c: Captured, blocks: list[str]) -> tuple[list[set[str]], list[str | None]]:
    """Node names of each unit, and the node whose value each unit hands on (None for the
    last: the model's output). Unit k starts at the first node inside module blocks[k]; the
    first unit starts at the input."""
    nodes = [n for n in c.graph.graph.nodes if n.op == "call_function"]
    starts = []
    for name in blocks:
        first = next((i for i, n in enumerate(nodes) if name in c.modules.get(n.name, ())), None)
        if first is None:
            known = sorted({m for t in c.modules.values() for m in t if "." not in m})
            raise EdgepropError(f"--blocks: the model has no module {name!r} that computes anything; its top-level "
                                f"modules: {', '.join(known)}")
        if starts and first <= starts[-1]:
            raise EdgepropError(f"--blocks: {name!r} runs before {blocks[len(starts) - 1]!r}; list the modules "
                                "where units start in execution order")
        starts.append(first)
    if starts and starts[0] == 0:
        starts = starts[1:]
        blocks = blocks[1:]
    units = [set() for _ in range(len(starts) + 1)]
    owner, outputs = {}, []
    for i, n in enumerate(nodes):
        k = sum(i >= s for s in starts)
        units[k].add(n.name)
        owner[n.name] = k
    # A boundary must be crossed by one tensor, made by the unit just before it.
    x = _placeholder(c, "x").name
    for k, name in enumerate(blocks, start=1):
        crossing = {a.name for n in nodes if owner[n.name] >= k for a in n.all_input_nodes
                    if a.name == x or a.op == "call_function" and owner[a.name] < k}
        if len(crossing) != 1 or owner.get(next(iter(crossing))) != k - 1:
            raise EdgepropError(f"--blocks: a unit cannot start at module {name!r}: {len(crossing)} tensors cross "
                                f"into it (a residual connection spans the boundary); choose a module that starts "
                                f"after the skip rejoins, e.g. the next stage")
        outputs.append(next(iter(crossing)))
    return units, outputs + [None]


def _placeholder(c: Captured, role: str):
    return [n for n in c.graph.graph.nodes if n.op == "placeholder"][c.inputs.index(role)]


def _encode(value, names: dict):
    if isinstance(value, torch.fx.Node):
        return {"ref": names[value.name]}
    if isinstance(value, (list, tuple)):
        return [_encode(v, names) for v in value]
    if isinstance(value, dict):  # kwargs
        return {"kwargs": {k: _encode(v, names) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": "cpu"}
    if isinstance(value, torch.layout):
        return {"layout": "strided"}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, int) and not isinstance(value, bool) and value and value % SENTINEL_BATCH == 0:
        return {"batch": value // SENTINEL_BATCH}  # a size made from the batch size
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise EdgepropError(f"cannot record argument {value!r} of a traced op")


def _decode(value, env: dict):
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if isinstance(value, dict):
        if "batch" in value:
            return value["batch"] * env["x"].shape[0]
        if "kwargs" in value:
            return {k: _decode(v, env) for k, v in value["kwargs"].items()}
        if "ref" in value:
            return env[value["ref"]]
        if "dtype" in value:
            return getattr(torch, value["dtype"])
        if "device" in value:
            return torch.device("cpu")
        if "layout" in value:
            return torch.strided
        if "memory_format" in value:
            return getattr(torch, value["memory_format"])
    return value


def unit_graph(c: Captured, members: set[str], output_of_unit: str | None) -> dict:
    """One unit's nodes as JSON: {"inputs": [role...], "nodes": [...], "outputs": [...]}.
    `output_of_unit`: the node whose value leaves the unit (the model's output for the last)."""
    gm = c.graph
    placeholders = {n.name: role for n, role in zip([n for n in gm.graph.nodes if n.op == "placeholder"], c.inputs)}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outs = list(out_node.args[0])
    names, nodes, inputs = {}, [], []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.name not in members:
            continue
        for a in n.all_input_nodes:
            if a.name in names:
                continue
            if a.op == "placeholder":
                role = placeholders[a.name]
            elif a.op == "call_function":
                role = "x"  # the one tensor crossing from the previous unit (cut() checked)
            else:
                raise EdgepropError(f"cannot record {a.op} node {a.name} of the traced model")
            names[a.name] = role
            if role not in inputs:
                inputs.append(role)
        names[n.name] = f"n{len(nodes)}"
        where = c.modules.get(n.name) or ("",)
        nodes.append({"op": op_name(n.target), "args": _encode(n.args, names), "kwargs": _encode(n.kwargs, names),
                      "module": where[-1]})
    produced = output_of_unit or outs[0].name
    result = [names[produced]]
    # updated running statistics, in the order the unit reads them (its "stats" buffer's layout)
    updated = {role: o.name for role, o in zip(c.outputs, outs) if role.startswith("stats:") and o.name in members}
    result += [names[updated[role]] for role in inputs if role in updated]
    return {"inputs": inputs, "nodes": nodes, "outputs": result}


def _op(name: str):
    if name == "getitem":
        return operator.getitem
    if name not in SUPPORTED or not name.startswith("aten."):
        raise EdgepropError(f"graph op {name!r} is not one edgeprop runs")
    _, packet, overload = name.split(".")
    return getattr(getattr(aten, packet), overload)


def run_graph(graph: dict, feeds: dict):
    """Execute a unit graph (JSON) on tensors fed by input role; returns its outputs."""
    env = {role: feeds[role] for role in graph["inputs"]}
    for i, node in enumerate(graph["nodes"]):
        env[f"n{i}"] = _op(node["op"])(*_decode(node["args"], env), **_decode(node["kwargs"], env))
    return [env[o] for o in graph["outputs"]]


def _holder(root: nn.Module, path: str) -> nn.Module:
    """The (empty) container module at `path` under root, made on the way."""
    m = root
    for part in path.split(".") if path else []:
        if not hasattr(m, part):
            m.add_module(part, nn.Module())
        m = getattr(m, part)
    return m


class GraphUnit(nn.Module):
    """One unit of a captured model: its trained parameters under their own names, its
    constants as buffers, and its step and inference graphs. forward(x, [stats], *masks,
    mask=None): with a sample `mask` (training) the step's graph, which also returns the
    updated BatchNorm statistics; without, the inference graph."""

    def __init__(self, spec: dict, constants: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.spec = spec
        for name, shape in spec["params"]:
            path, _, leaf = name.rpartition(".")
            _holder(self, path).register_parameter(leaf, nn.Parameter(torch.zeros(shape)))
        for name, shape in spec["constants"]:
            path, _, leaf = name.rpartition(".")
            value = constants[name] if constants is not None else torch.zeros(shape)
            _holder(self, path).register_buffer(leaf, value.detach().reshape(shape).clone())

    @property
    def has_stats(self) -> bool:
        return bool(self.spec["stats"])

    def forward(self, x, *rest, mask=None):
        named = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        feeds = {"x": x, "mask": mask}
        feeds.update({f"param:{n}": named[n] for n, _ in self.spec["params"]})
        feeds.update({f"const:{n}": named[n] for n, _ in self.spec["constants"]})
        rest = list(rest)
        if self.has_stats:
            flat, offset = rest.pop(0), 0
            for path, n in self.spec["stats"]:
                feeds[f"stats:{path}"] = flat[offset:offset + 2 * n]
                offset += 2 * n
        graph = self.spec["eval"] if mask is None else self.spec["train"]
        if mask is not None:
            feeds.update({f"drop:{path}": m for (path, _, _), m in zip(self.spec["dropout"], rest)})
        out = run_graph(graph, feeds)
        if mask is None or not self.has_stats:
            return out[0]
        return out[0], torch.cat(out[1:])


def constants_of(spec: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The unit's constants as one flat float32 buffer, in the spec's order."""
    parts = [tensors[n].detach().float().reshape(-1) for n, _ in spec["constants"]]
    return torch.cat(parts) if parts else torch.zeros(0)


def split_constants(spec: dict, flat) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, shape in spec["constants"]:
        size = math.prod(shape)
        out[name] = torch.as_tensor(flat[offset:offset + size]).reshape(shape)
        offset += size
    return out
