"""Rules where unit k learns on unit k−1's output for the same batch, never its gradient:

    local         greedy local learning: each block of a sequential model has a small
                  auxiliary classifier; block and head take a cross-entropy step together
    mono-forward  every layer has a projection M_i to class scores (no bias) and its own
                  cross-entropy; prediction from the last layer's scores (Gong et al. 2025)
    backprop      the whole network as one unit: end-to-end back-prop, the reference row

A unit's step graph takes `x` (the previous unit's output, detached) and returns `h` (its
own output, computed before its update) beside the new state, so in interleaved order the
next unit's input costs nothing. In block-sequential order the earlier units are already
trained, and their inference graphs recompute it.
"""
from __future__ import annotations

import numpy as np

from .. import prng
from ..errors import BundleError, EdgepropError
from .base import Rule, RunUnit, normalise, padded


class Chained(Rule):
    def __init__(self, bundle, data, seed, run_unit=None, state_of=None):
        super().__init__(bundle, data, seed, run_unit, state_of)
        self._carry = None  # ((epoch, batch, unit index), that unit's output h)
        self._dropout_sites = _dropout_sites(bundle)

    def _input(self, index: int, epoch: int, batch: int, idx: np.ndarray) -> np.ndarray:
        if self._carry is not None and self._carry[0] == (epoch, batch, index - 1):
            return self._carry[1]
        h = normalise(self.bundle, self.x[idx])
        for unit in self.bundle.units[:index]:
            h = self.run_unit(unit, {"x": h})["h"]
        return h

    def feeds(self, index: int, epoch: int, batch: int) -> dict[str, np.ndarray]:
        idx, mask = self.batch(epoch, batch)
        return {"x": self._input(index, epoch, batch, idx), "target": self.onehot[self.y[idx]], "mask": mask,
                **self._dropout(index, epoch, batch, len(idx))}

    def _dropout(self, index: int, epoch: int, batch: int, size: int) -> dict[str, np.ndarray]:
        """A captured model's dropout masks for this step (manifest model.units[i].dropout:
        [module, shape, p] per site): 0, or 1/(1-p) for kept elements."""
        masks = {}
        for k, (shape, p) in enumerate(self._dropout_sites[index]):
            draw = prng.uniform(prng.key(self.seed, prng.DROPOUT, epoch, batch, index, k), (size, *shape))
            masks[f"drop{k + 1}"] = ((draw >= p) / np.float32(1 - p)).astype(np.float32)
        return masks

    def observe(self, index: int, epoch: int, batch: int, outputs: dict) -> None:
        if index + 1 < len(self.bundle.units):
            self._carry = ((epoch, batch, index), np.asarray(outputs["h"]))

    eval_options = ("predict_with",)

    def evaluate(self, x, y, run_unit: RunUnit, seed: int = 0, runs: int = 1, predict_with: str = "last") -> dict:
        """Deterministic: the class scores of the last unit (or of unit K, `predict_with`,
        1-based: an earlier unit's classifier is sometimes the better one); also every
        unit's own classifier."""
        units = len(self.bundle.units)
        chosen = units if predict_with in (None, "last") else _unit_number(predict_with, units)
        B = self.bundle.batch_size
        per_unit = np.zeros(len(self.bundle.units))
        for start in range(0, len(x), B):
            h, n = padded(self.bundle, x[start:start + B])
            for k, unit in enumerate(self.bundle.units):
                out = run_unit(unit, {"x": h})
                h = out.get("h")
                per_unit[k] += np.sum(np.argmax(out["logits"][:n], axis=1) == y[start:start + n])
        per_unit /= len(x)
        accuracy = float(per_unit[chosen - 1])
        return {"accuracy": accuracy, "accuracy_runs": [accuracy], "predicted_by_unit": chosen,
                "per_unit_accuracy": [round(float(a), 4) for a in per_unit],
                "per_unit_note": "each unit's own classifier"}


def _dropout_sites(bundle) -> list[list[tuple[tuple[int, ...], float]]]:
    """Each unit's dropout sites (a captured model's manifest model.units[i].dropout, entries
    [module, shape, p]) as (shape, p), checked before any step."""
    units = bundle.model.get("units")
    if units is None:
        return [[] for _ in bundle.units]
    try:
        sites = [[(tuple(int(d) for d in shape), float(p)) for _, shape, p in u["dropout"]] for u in units]
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{bundle.root}/manifest.json: model.units[].dropout is malformed ({e!r})") from None
    if len(sites) != len(bundle.units) or any(not 0 <= p < 1 or min(s, default=1) < 1 for u in sites for s, p in u):
        raise BundleError(f"{bundle.root}/manifest.json: model.units[].dropout needs one list per unit of "
                          "[module, shape, p] with p in [0, 1)")
    return sites


def _unit_number(text, units: int) -> int:
    try:
        k = int(text)
    except (TypeError, ValueError):
        k = 0
    if not 1 <= k <= units:
        raise EdgepropError(f"--predict-with {text}: last or a unit number 1..{units}")
    return k


RULES = {"local": Chained, "mono-forward": Chained, "backprop": Chained}
