"""Learning rules, device side: numpy only. `for_bundle` picks the bundle's rule.

Each rule's desktop half (its torch modules, local losses and step-graph inputs) lives in
edgeprop.exporters.rules under the same module name.
"""
from __future__ import annotations

import importlib

from ..errors import BundleError
from .base import ORDERS, Plan, Rule, RunUnit, normalise

# rule name -> (module in this package, class)
RULES = {
    "noprop-dt": ("noprop_dt", "NopropDT"),
    "local": ("chained", "Chained"),
    "mono-forward": ("chained", "Chained"),
    "backprop": ("chained", "Chained"),
    "noprop-ct": ("noprop_continuous", "NopropCT"),
    "noprop-fm": ("noprop_continuous", "NopropFM"),
    "zeroth-order": ("zeroth_order", "ZerothOrder"),
    "forward-forward": ("forward_forward", "ForwardForward"),
}


def rule_class(name: str) -> type[Rule]:
    if name not in RULES:
        raise BundleError(f"rule '{name}' is not one this edgeprop runs ({', '.join(RULES)})")
    module, cls = RULES[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def for_bundle(bundle, data, seed: int, run_unit: RunUnit | None = None) -> Rule:
    return rule_class(bundle.rule)(bundle, data, seed, run_unit)


__all__ = ["ORDERS", "Plan", "Rule", "RunUnit", "RULES", "for_bundle", "normalise", "rule_class"]
