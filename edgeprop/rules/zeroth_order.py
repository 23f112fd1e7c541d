"""zeroth-order: SPSA / MeZO fine-tuning that runs only the model's inference graph.

One step on a batch, for each of n directions d (MeZO, Malladi et al. 2023):

    θ += εz_d;  L+ = loss(θ);  θ −= 2εz_d;  L− = loss(θ);  θ += εz_d     (back to θ)
    g_d = (L+ − L−) / 2ε
then θ −= (lr / n) Σ_d g_d z_d.

z_d is never stored: it is regenerated chunk by chunk (manifest "chunk" elements, one
reused buffer) from a generator seeded by (seed, unit, step, direction, chunk), and every
change is made in place on the unit's "param". So a step needs the inference graph's
memory plus that one chunk: no activations kept, no gradient, no optimizer state. The loss
(masked mean cross-entropy) is computed here, in numpy, from the graph's logits.

The manifest's "zeroth_order" entry gives ε, n, the chunk size and the spans of "param"
that are perturbed (all of it, or the chosen layers': the sparse variant); the rest stays
fixed. Prediction is the logits' argmax, as for back-prop.
"""
from __future__ import annotations

import numpy as np

from ..errors import BundleError
from .chained import Chained


def cross_entropy(logits: np.ndarray, onehot: np.ndarray, mask: np.ndarray) -> float:
    """Masked mean cross-entropy, in float64 (the graph's logits are float32)."""
    z = logits.astype(np.float64)
    shift = z.max(axis=1, keepdims=True)
    per_sample = np.log(np.exp(z - shift).sum(axis=1)) + shift[:, 0] - (onehot * z).sum(axis=1)
    return float((per_sample * mask).sum() / max(float(mask.sum()), 1.0))


class ZerothOrder(Chained):
    updates_itself = True  # MeZO's perturbed forward passes: no step graph, no optimizer slots

    def __init__(self, bundle, data, seed, run_unit=None, state_of=None):
        super().__init__(bundle, data, seed, run_unit, state_of)
        where = f"{bundle.root}/manifest.json: zeroth_order"
        try:
            zo = bundle.manifest["zeroth_order"]
            self.eps, self.directions = float(zo["eps"]), int(zo["directions"])
            self.chunk = int(zo["chunk"])
            self.ranges = [(int(a), int(b)) for a, b in zo["ranges"]]
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{where}: missing or malformed ({e!r})") from None
        n = bundle.units[0].n_params
        if not (self.eps > 0 and self.directions >= 1 and self.chunk >= 1 and self.ranges
                and all(0 <= a < b <= n for a, b in self.ranges)):
            raise BundleError(f"{where}: eps > 0, directions ≥ 1, chunk ≥ 1 and spans inside the "
                              f"{n} parameters are needed")
        self._z = np.empty(min(self.chunk, max(b - a for a, b in self.ranges)), np.float32)

    def _perturb(self, theta: np.ndarray, unit: int, step: int, direction: int, scale: float) -> None:
        """θ += scale·z over the perturbed spans, z regenerated one chunk at a time."""
        c = 0
        for a, b in self.ranges:
            for start in range(a, b, self.chunk):
                z = self._z[:min(self.chunk, b - start)]
                np.random.default_rng([self.seed, unit, step, direction, c]).standard_normal(dtype=np.float32, out=z)
                z *= np.float32(scale)  # in place: no temporary the size of the chunk
                theta[start:start + len(z)] += z
                c += 1

    def update(self, unit_index: int, epoch: int, batch: int, state: dict, lr: float, n: int, graph) -> float:
        """One SPSA step on `state["param"]` in place; returns the mean of the 2n losses."""
        feeds = self.feeds(unit_index, epoch, batch)
        theta = state["param"]

        def loss() -> float:
            return cross_entropy(graph.run({"param": theta, "x": feeds["x"]})["logits"], feeds["target"],
                                 feeds["mask"])

        grads, losses = [], []
        for d in range(self.directions):
            self._perturb(theta, unit_index, n, d, self.eps)
            plus = loss()
            self._perturb(theta, unit_index, n, d, -2 * self.eps)
            minus = loss()
            self._perturb(theta, unit_index, n, d, self.eps)
            grads.append((plus - minus) / (2 * self.eps))
            losses += [plus, minus]
        if np.all(np.isfinite(grads)):  # else the trainer stops on the loss, weights untouched
            for d, g in enumerate(grads):
                self._perturb(theta, unit_index, n, d, -lr * g / self.directions)
        return float(np.mean(losses))


RULES = {"zeroth-order": ZerothOrder}
