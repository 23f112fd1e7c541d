"""Which units each sampled client trains this round.

    all        every client trains every unit
    blocks:K   each client K units, dealt round-robin from a start that moves every round,
               so every unit is trained each round when clients x K >= units
    by-memory  each client as many units as its device's memory plan holds (it reports that
               number with its first reply; until then it is offered all units and trims)

NoProp's blocks learn independently given (x, y), so a client that trains block t alone
needs nothing from the others; chained rules recompute earlier units' outputs with their
inference graphs (edgeprop.rules.chained).
"""
from __future__ import annotations

from dataclasses import dataclass

from edgeprop.errors import EdgepropError
from edgeprop.sizes import format_size

POLICIES = ("all", "blocks:K", "by-memory")


@dataclass(frozen=True)
class Policy:
    kind: str   # "all", "blocks" or "by-memory"
    k: int = 0  # units per client for "blocks"

    def __str__(self) -> str:
        return f"blocks:{self.k}" if self.kind == "blocks" else self.kind


def parse(text: str) -> Policy:
    kind, _, value = str(text).partition(":")
    if kind in ("all", "by-memory") and not value:
        return Policy(kind)
    if kind == "blocks" and value.isdigit() and int(value) >= 1:
        return Policy("blocks", int(value))
    raise EdgepropError(f"--assign {text!r}: expected one of {', '.join(POLICIES)} (K >= 1)")


def assign(policy: Policy, nodes: list[int], n_units: int, server_round: int,
           capacity: dict[int, int] | None = None) -> dict[int, list[int]]:
    """Unit indices for each node. `capacity`: units each node's memory holds, where known."""
    if policy.kind == "all":
        return {node: list(range(n_units)) for node in nodes}
    capacity = capacity or {}
    sizes = [min(policy.k, n_units) if policy.kind == "blocks" else min(capacity.get(n, n_units), n_units)
             for n in nodes]
    # The deal starts one unit further each round, so over rounds a client meets different
    # units and each unit different clients.
    cursor = (server_round - 1) % n_units
    out = {}
    for node, size in zip(sorted(nodes), sizes):
        out[node] = sorted({(cursor + j) % n_units for j in range(size)})
        cursor = (cursor + size) % n_units
    return out


def check_coverage(policy: Policy, per_round: int, n_units: int) -> None:
    """blocks:K must reach every unit each round: refuse a setting that cannot."""
    if policy.kind == "blocks" and per_round * min(policy.k, n_units) < n_units:
        raise EdgepropError(f"--assign {policy}: {per_round} clients per round x {policy.k} units cover fewer than "
                            f"the bundle's {n_units} units; raise --fraction, --clients or K")


def units_that_fit(bundle, device, engine_name: str, data_bytes: int) -> int:
    """How many of the bundle's units a client on `device` can train in one round: the
    runtime, its data and the largest units' weights and slots, graphs' arenas and a batch
    (edgeprop.memory's figures) must fit the profile's training budget."""
    from edgeprop.memory import plan
    from edgeprop.runtimes import memory_model
    engine = memory_model(engine_name, device.arch)
    p = plan(bundle, None, not engine.holds_units, engine=engine, data_bytes=data_bytes)
    base = (p.runtime or 0) + p.data

    def need(chosen) -> int:  # units sharing a step graph share its arena
        arenas = {u.graph: u.engine for u in chosen}
        return base + sum(u.state for u in chosen) + sum(arenas.values()) + max(u.batch + u.scratch for u in chosen)

    units = sorted(p.units, key=lambda u: u.state + u.engine, reverse=True)
    fits = 0
    while fits < len(units) and need(units[:fits + 1]) <= device.budget:
        fits += 1
    if fits == 0:
        smallest = min(need([u]) for u in units)
        raise EdgepropError(f"device {device.name} ({format_size(device.budget)} for training) cannot hold even one "
                            f"unit of {bundle.root} (the smallest needs {format_size(smallest)} with the runtime and "
                            f"data)")
    return fits
