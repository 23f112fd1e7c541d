"""Learning rules, device side: numpy only. `for_bundle` picks the bundle's rule.

A rule is a pair of modules with the same name: this package's half (what a step is fed,
how the trained units predict) and edgeprop.exporters.rules' half (its torch modules, local
losses and step-graph inputs). Each module here declares the rule names it runs:

    RULES = {"noprop-ct": NopropCT, "noprop-fm": NopropFM}

and the registry below is built from those declarations: adding a rule adds two files.
"""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import BundleError
from .base import ORDERS, Plan, Rule, RunUnit, StateOf, normalise

SHARED = ("base",)  # modules here that are not a rule's half


def rule_modules() -> list[str]:
    """The module names of every rule's device half (sorted)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in SHARED)


def _discover() -> dict[str, tuple[str, type[Rule]]]:
    found = {}
    for module in rule_modules():
        for name, cls in importlib.import_module(f"{__name__}.{module}").RULES.items():
            found[name] = (module, cls)
    return found


# rule name -> (module in this package and in edgeprop.exporters.rules, class)
RULES = _discover()


def rule_class(name: str) -> type[Rule]:
    if name not in RULES:
        raise BundleError(f"rule '{name}' is not one this edgeprop runs ({', '.join(RULES)})")
    return RULES[name][1]


def rule_module(name: str) -> str:
    """The module name both halves of rule `name` share."""
    rule_class(name)
    return RULES[name][0]


def for_bundle(bundle, data, seed: int, run_unit: RunUnit | None = None,
               state_of: StateOf | None = None) -> Rule:
    return rule_class(bundle.rule)(bundle, data, seed, run_unit, state_of)


__all__ = ["ORDERS", "Plan", "Rule", "RunUnit", "RULES", "StateOf", "for_bundle", "normalise", "rule_class",
           "rule_module"]
