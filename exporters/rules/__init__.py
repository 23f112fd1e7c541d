"""Learning rules, desktop side (torch): each rule's units, local losses and graph inputs.

A rule module defines `create(options, train) -> Spec` (fresh modules for a new bundle) and a
rule object whose `from_bundle(bundle)` rebuilds (for the torch reference), which knows:

    module(unit)                 an untrained torch module of that unit's shape
    step_inputs(unit, batch)     example data inputs of its step graph (their shapes fix B)
    infer_inputs(unit, batch)    ... of its inference graph; infer_outputs(unit): their names
    loss(unit, module, feeds)    (local loss, extras): extras are step-graph outputs the
                                 device rule reads (a chained unit's output h)

The device half of each rule is edgeprop.rules.<same module name>, which declares the rule
names (edgeprop.rules.RULES, the one registry) and whether the rule updates the weights itself.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from edgeprop import rules as device_rules
from edgeprop.errors import EdgepropError


@dataclass
class Options:
    """What `edgeprop export` was asked for (the rule reads what applies to it)."""
    rule: str = "noprop-dt"
    model: str | nn.Module = "mlp"   # "mlp", "cnn" (NoProp-DT), or a torch.nn.Sequential
    blocks: int | str | list = None  # NoProp-DT: T; sequential rules: "every-layer", "none" or layer indices
    width: int | None = None
    depth: int = 2                   # hidden layers of the built-in MLP for sequential rules
    embedding: str = "one-hot"
    embed_dim: int | None = None
    lr: float | None = None          # None: the rule module's DEFAULT_LR (1e-3 unless it says otherwise)
    head_lr: float = 1e-2
    eta: float = 0.1
    seed: int = 0
    extra: dict = field(default_factory=dict)  # rule-specific options (the rule module's OPTIONS)


@dataclass
class UnitSpec:
    name: str
    role: str
    graph: str             # units with the same graph key share step/infer graph files
    module: nn.Module
    lr: float
    t: int | None = None
    scratch: int = 0       # bytes the device rule allocates beyond the graph (the memory planner counts them)


@dataclass
class Spec:
    rule: object           # the rule's desktop object (step_inputs, loss, ...)
    model: dict            # manifest "model"
    units: list[UnitSpec]
    manifest: dict = field(default_factory=dict)   # rule-specific manifest entries
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # extra arrays in state/init.npz
    name: str = ""         # the rule's name (filled in by create)


def rule_module(name: str):
    if name not in device_rules.RULES:
        raise EdgepropError(f"--rule {name}: choose one of {', '.join(device_rules.RULES)}")
    return importlib.import_module(f"{__name__}.{device_rules.rule_module(name)}")


def updates_itself(name: str) -> bool:
    """Rule `name` changes the weights in its device half (no step graph, no optimizer slots)."""
    return device_rules.rule_class(name).updates_itself


def create(options: Options, train) -> Spec:
    module = rule_module(options.rule)
    unknown = sorted(set(options.extra) - getattr(module, "OPTIONS", set()))
    if unknown:  # an option meant for another rule would otherwise be silently ignored
        flags = ", ".join("example_input" if k == "input_shape" else "--" + k.replace("_", "-") for k in unknown)
        raise EdgepropError(f"--rule {options.rule} takes no {flags}")
    if options.lr is None:
        options.lr = getattr(module, "DEFAULT_LR", 1e-3)
    spec = module.create(options, train)
    spec.name = options.rule
    return spec


def from_bundle(bundle):
    """The desktop object of a loaded bundle's rule (for the torch reference and parity tests)."""
    return rule_module(bundle.rule).from_bundle(bundle)
