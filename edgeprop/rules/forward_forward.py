"""forward-forward, device side (Hinton 2022): label overlays, negative labels, prediction.

The label is written over the first C input features (one-hot × the bundle's overlay
value). Positive data carries the true label, negative data a wrong one drawn from a
generator seeded by (seed, epoch, batch). Each layer's step graph returns its outputs for
both (computed before its update); in interleaved order the next layer takes them as they
are, in block-sequential order the earlier layers' inference graphs recompute them.

Prediction: overlay each of the C labels, run every layer, sum goodness over the layers
(all but the first when there are two or more) and take the argmax: C forward passes. The
readout predicts in one pass, from the layers' activities under a neutral label (1/C each).
"""
from __future__ import annotations

import numpy as np

from .base import Rule, RunUnit, normalise, padded


class ForwardForward(Rule):
    def __init__(self, bundle, data, seed, run_unit=None, state_of=None):
        super().__init__(bundle, data, seed, run_unit, state_of)
        self.layers = [u for u in bundle.units if u.role == "block"]
        self.value = np.float32(bundle.model["overlay"])
        self._carry = None  # ((epoch, batch, layer index), (h_pos, h_neg))

    def overlay(self, x: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        """x (normalised) with the labels' one-hot × value over its first C features; None: neutral."""
        C = self.bundle.num_classes
        out = x.reshape(len(x), -1).copy()
        out[:, :C] = self.value / C if labels is None else self.onehot[labels] * self.value
        return out

    def negatives(self, epoch: int, batch: int, y: np.ndarray) -> np.ndarray:
        """A wrong label for every sample, uniform over the other C − 1 classes."""
        C = self.bundle.num_classes
        return (y + np.random.default_rng([self.seed, epoch, batch]).integers(1, C, len(y))) % C

    def _layers(self, x: np.ndarray, n: int, run_unit: RunUnit | None = None) -> list[dict]:
        """The outputs of the first n layers' inference graphs on x."""
        outs = []
        for unit in self.layers[:n]:
            outs.append((run_unit or self.run_unit)(unit, {"x": x}))
            x = outs[-1]["h"]
        return outs

    def _readout_input(self, outs: list[dict]) -> np.ndarray:
        return np.concatenate([outs[k]["h"] for k in self.bundle.model["readout_layers"]], axis=1)

    def feeds(self, index: int, epoch: int, batch: int) -> dict[str, np.ndarray]:
        idx, mask = self.batch(epoch, batch)
        y = self.y[idx]
        if index == len(self.layers):  # the readout, on a neutral-label pass
            outs = self._layers(self.overlay(normalise(self.bundle, self.x[idx]), None), len(self.layers))
            return {"a": self._readout_input(outs), "target": self.onehot[y], "mask": mask}
        if self._carry is not None and self._carry[0] == (epoch, batch, index - 1):
            x_pos, x_neg = self._carry[1]
        else:
            x = normalise(self.bundle, self.x[idx])
            x_pos, x_neg = self.overlay(x, y), self.overlay(x, self.negatives(epoch, batch, y))
            if index:
                x_pos, x_neg = (self._layers(v, index)[-1]["h"] for v in (x_pos, x_neg))
        return {"x_pos": x_pos, "x_neg": x_neg, "mask": mask}

    def observe(self, index: int, epoch: int, batch: int, outputs: dict) -> None:
        if index + 1 < len(self.layers):
            self._carry = ((epoch, batch, index), (np.asarray(outputs["h_pos"]), np.asarray(outputs["h_neg"])))

    def evaluate(self, x, y, run_unit: RunUnit, seed: int = 0, runs: int = 1) -> dict:
        """Deterministic. Per unit: each layer's goodness alone, and the readout."""
        B, C, L = self.bundle.batch_size, self.bundle.num_classes, len(self.layers)
        skip = 1 if L > 1 else 0  # the first layer sees the label pixels directly
        correct = np.zeros(L + 2)  # each layer's goodness, the readout, the summed goodness
        for start in range(0, len(x), B):
            base, n = padded(self.bundle, x[start:start + B])
            goodness = np.zeros((L, n, C))
            for c in range(C):
                outs = self._layers(self.overlay(base, np.full(B, c)), L, run_unit)
                goodness[:, :, c] = [o["goodness"][:n] for o in outs]
            truth = y[start:start + n]
            correct[:L] += np.sum(np.argmax(goodness, axis=2) == truth, axis=1)
            neutral = self._layers(self.overlay(base, None), L, run_unit)
            logits = run_unit(self.bundle.units[-1], {"a": self._readout_input(neutral)})["logits"]
            correct[L] += np.sum(np.argmax(logits[:n], axis=1) == truth)
            correct[L + 1] += np.sum(np.argmax(goodness[skip:].sum(axis=0), axis=1) == truth)
        acc = correct / len(x)
        return {"accuracy": float(acc[-1]), "accuracy_runs": [float(acc[-1])], "accuracy_readout": float(acc[L]),
                "per_unit_accuracy": [round(float(a), 4) for a in acc[:L + 1]],
                "per_unit_note": "each layer's goodness alone; readout on a neutral label"}


RULES = {"forward-forward": ForwardForward}
