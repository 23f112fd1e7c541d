"""What a manifest.json must hold, checked field by field before anything uses it.

A small declarative check rather than jsonschema: the device side stays numpy + an engine
(jsonschema brings four packages, one with a compiled Rust extension), and most of what can
go wrong is a cross-reference (units ↔ graphs ↔ schedule) that a schema cannot say anyway.
Each problem is reported as one line naming the field: `units[2].lr: must be a finite number > 0`.
"""
from __future__ import annotations

import math

from .errors import BundleError

FUSED = "fused_step"  # the manifest's entry of the optional fused step graph

MAX_BATCH = 1 << 20
MAX_CLASSES = 1 << 20


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _text(v) -> bool:
    return isinstance(v, str) and bool(v)


def check(manifest: dict, where: str) -> None:
    """Raise BundleError naming the first field that is missing, of the wrong type or out of range."""
    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise BundleError(f"{where}: field '{field}' {what}")

    need(_text(manifest.get("rule")), "rule", "must be a rule's name (a string)")
    need(_int(manifest.get("batch_size"), 1, MAX_BATCH), "batch_size", f"must be an integer in 1..{MAX_BATCH}")
    model = manifest.get("model")
    need(isinstance(model, dict), "model", "must be an object")
    need(_text(model.get("kind")), "model.kind", "must be a string")
    shape = model.get("input_shape")
    need(isinstance(shape, list) and len(shape) in (1, 3) and all(_int(s, 1, 1 << 16) for s in shape),
         "model.input_shape", "must be [features] or [channels, height, width] of positive integers")
    need(_int(model.get("num_classes"), 2, MAX_CLASSES), "model.num_classes", f"must be an integer in 2..{MAX_CLASSES}")
    if "embed_dim" in model:
        need(_int(model["embed_dim"], 1, 1 << 16), "model.embed_dim", "must be a positive integer")
    need(isinstance(model.get("learned_embedding", False), bool), "model.learned_embedding", "must be true or false")
    optimizer = manifest.get("optimizer")
    need(isinstance(optimizer, dict) and _text(optimizer.get("name")), "optimizer.name", "must be a string")
    norm = manifest.get("input_norm")
    need(isinstance(norm, dict) and _finite(norm.get("mean")), "input_norm.mean", "must be a finite number")
    need(_finite(norm.get("std")) and norm["std"] > 0, "input_norm.std", "must be a finite number > 0")
    graphs = manifest.get("graphs")
    need(isinstance(graphs, dict) and graphs and all(isinstance(g, dict) for g in graphs.values()),
         "graphs", "must be a non-empty object of graph entries")
    units = manifest.get("units")
    need(isinstance(units, list) and units and all(isinstance(u, dict) for u in units),
         "units", "must be a non-empty list of units")
    names = [u.get("name") for u in units]
    blocks = sum(u.get("role") == "block" for u in units)
    for i, u in enumerate(units):
        at = f"units[{i}]"
        need(_text(u.get("name")), f"{at}.name", "must be a string")
        need(u["name"] not in names[:i], f"{at}.name", f"'{u['name']}' names an earlier unit too")
        need(_text(u.get("role")), f"{at}.role", "must be a string")
        need(u.get("t") is None or _int(u["t"], 1, blocks), f"{at}.t", f"must be a block index in 1..{blocks}")
        need(_finite(u.get("lr")) and u["lr"] > 0, f"{at}.lr", "must be a finite number > 0")
        for key in ("step_graph", "infer_graph"):
            need(u.get(key) in graphs, f"{at}.{key}", f"must name a graph listed under 'graphs' (got {u.get(key)!r})")
        need(isinstance(u.get("state"), list) and u["state"], f"{at}.state", "must be a non-empty list of tensors")
        need(isinstance(u.get("layout"), list) and u["layout"], f"{at}.layout", "must be a non-empty list")
    fused = manifest.get(FUSED)
    if fused is not None:
        need(isinstance(fused, dict) and _text(fused.get("file")), f"{FUSED}.file", "must be a graph file")
        need(fused.get("units") == names, f"{FUSED}.units", "must list every unit, in the manifest's order")
        need(isinstance(fused.get("shared"), list) and all(_text(n) for n in fused["shared"]),
             f"{FUSED}.shared", "must be a list of input names")
        for key in ("inputs", "outputs"):
            need(isinstance(fused.get(key), list) and fused[key], f"{FUSED}.{key}", "must be a non-empty list")
    noise = manifest.get("noise")
    if noise is not None:
        alpha = noise.get("alpha_bar") if isinstance(noise, dict) else None
        need(isinstance(alpha, list) and len(alpha) == blocks + 1, "noise.alpha_bar",
             f"must list ᾱ_0..ᾱ_T, {blocks + 1} numbers for {blocks} blocks")
