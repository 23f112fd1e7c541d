"""One step graph for every unit of an interleaved batch (desktop): `export --fused-step`.

A rule whose units are independent given a batch's feeds (NoProp-DT: every block and the head
read x, the labels and their own noise, never another unit's output) can step them all in one
engine call. The fused graph is the union of the units' own step graphs, each unit's tensors
renamed "UNIT/NAME" (its update written as "next.UNIT/K", so an engine that steps in place
sees the same next.K-over-K pairs as in a unit's graph). Inputs every unit of a batch is fed
identically (the rule's `batch_feeds`: x, mask) are fed once, under their own name.

Nothing is recomputed or reordered: the nodes are the units' nodes, so the fused step gives
what the per-unit steps give, from the same feeds (the trainer draws them the same way).
"""
from __future__ import annotations

import onnx

from edgeprop.bundle import FUSED, FusedStep
from edgeprop.errors import EdgepropError
from edgeprop.rules import rule_class

from .liveness import memory_facts
from .trace import describe, save_checked


def _rename(graph: onnx.GraphProto, unit: str, shared: set[str]) -> onnx.GraphProto:
    """A copy of a unit's graph with every tensor and node renamed for the fused graph."""
    g = onnx.GraphProto()
    g.CopyFrom(graph)

    def new(name: str) -> str:
        return name if not name or name in shared else FusedStep.name(unit, name)

    for node in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"{unit}: a step graph with control flow ({node.op_type}) cannot be fused")
        node.name = new(node.name) if node.name else ""
        node.input[:] = [new(n) for n in node.input]
        node.output[:] = [new(n) for n in node.output]
    for values in (g.input, g.output, g.value_info):
        for v in values:
            v.name = new(v.name)
    for t in g.initializer:
        t.name = new(t.name)
    return g


def fuse(models: list[tuple[str, onnx.ModelProto]], shared: set[str]) -> onnx.ModelProto:
    """The fused step graph of `models` ((unit name, its step graph), in the order the units
    step). `shared`: the input names fed once for every unit; each must be the same tensor
    type wherever it appears."""
    if not models:
        raise ValueError("no units to fuse")
    first = models[0][1]
    graph = onnx.helper.make_graph([], FUSED, [], [])
    seen: dict[str, onnx.ValueInfoProto] = {}
    for unit, model in models:
        if {(o.domain, o.version) for o in model.opset_import} != {(o.domain, o.version) for o in first.opset_import}:
            raise ValueError(f"{unit}: its step graph's opsets differ from {models[0][0]}'s")
        g = _rename(model.graph, unit, shared)
        for v in g.input:
            if v.name in shared:
                if v.name in seen:
                    if seen[v.name].type != v.type:
                        raise ValueError(f"{unit}: input '{v.name}' is fed to every unit, but its type differs")
                    continue
                seen[v.name] = v
            graph.input.append(v)
        graph.node.extend(g.node)
        graph.output.extend(g.output)
        graph.initializer.extend(g.initializer)
        graph.value_info.extend(g.value_info)
    model = onnx.helper.make_model(graph, opset_imports=list(first.opset_import), ir_version=first.ir_version)
    return model


def check_rule(rule: str, own_update: bool) -> None:
    """Refuse --fused-step, before any work, for a rule whose units cannot step together."""
    if own_update or rule_class(rule).batch_feeds is None:
        raise EdgepropError(f"--fused-step: rule {rule}'s units " + (
            "update without step graphs" if own_update else "read each other's outputs within a batch")
            + "; they cannot step as one graph")


def export_fused(rule: str, units: list[tuple[str, tuple[onnx.ModelProto, onnx.ModelProto]]], batch: int,
                 root) -> dict:
    """Write graphs/fused_step.onnx from each unit's step graph (at batch and batch + 1, so the
    planner can scale it like any graph) and return its manifest entry."""
    names = {n for _, (model, _) in units for n in (i.name for i in model.graph.input)}
    shared = sorted(names & set(rule_class(rule).batch_feeds))
    model = fuse([(u, m) for u, (m, _) in units], set(shared))
    bigger = fuse([(u, b) for u, (_, b) in units], set(shared))
    rel = f"graphs/{FUSED}.onnx"
    save_checked(model, [i.name for i in model.graph.input], [o.name for o in model.graph.output], root / rel)
    return {**describe(model, rel), "memory": memory_facts(model, bigger, batch, None, rel),
            "units": [u for u, _ in units], "shared": shared}
