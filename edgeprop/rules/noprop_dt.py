"""NoProp-DT on the device: what each step is fed, and how a trained chain predicts.

T blocks each learn to denoise z_{t-1} ~ q(z_{t-1}|y) towards the clean label embedding u_y;
the head learns p(y | z_T) on z_T ~ q(z_T|y), never on a block's output (docs/noprop.md).
"""
from __future__ import annotations

import numpy as np

from .. import prng
from .base import Rule, RunUnit, normalise, padded


class NopropDT(Rule):
    def __init__(self, bundle, data, seed, run_unit=None):
        super().__init__(bundle, data, seed, run_unit)
        self.embedding = bundle.embedding.astype(np.float32)

    def feeds(self, index: int, epoch: int, batch: int) -> dict[str, np.ndarray]:
        unit = self.bundle.units[index]
        idx, mask = self.batch(epoch, batch)
        y = self.y[idx]
        u = self.embedding[y]
        eps = prng.normal(prng.key(self.seed, prng.NOISE, epoch, batch, index), u.shape)
        sched = self.bundle.schedule
        if unit.role == "block":
            # Block t denoises z_{t-1} ~ q(z_{t-1} | y) towards u_y.
            ab = sched.alpha_bar[unit.t - 1]
            z = (np.sqrt(ab) * u + np.sqrt(1 - ab) * eps).astype(np.float32)
            return {"x": normalise(self.bundle, self.x[idx]), "z": z, "target": u, "mask": mask,
                    "loss_scale": np.array(sched.weights[unit.t - 1], np.float32),
                    **self._dropout(epoch, batch, index, len(idx))}
        # The head learns p(y | z_T) on z_T ~ q(z_T | y): never on a block's output.
        ab = sched.alpha_bar[-1]
        z = (np.sqrt(ab) * u + np.sqrt(1 - ab) * eps).astype(np.float32)
        return {"z": z, "target": self.onehot[y], "mask": mask}

    def _dropout(self, epoch: int, batch: int, index: int, size: int) -> dict[str, np.ndarray]:
        """The block's dropout masks for this step (CNN blocks): 0, or 1/(1-p) for kept units."""
        p = float(self.bundle.model.get("dropout", 0.0))
        masks = {}
        for k, shape in enumerate(self.bundle.model.get("dropout_shapes", [])):
            draw = prng.uniform(prng.key(self.seed, prng.DROPOUT, epoch, batch, index, k), (size, *shape))
            masks[f"drop{k + 1}"] = ((draw >= p) / np.float32(1 - p)).astype(np.float32)
        return masks

    def evaluate(self, x, y, run_unit: RunUnit, seed: int = 0, runs: int = 1) -> dict:
        """Accuracy of the full stochastic chain, averaged over `runs`, and of each block's û."""
        accs, block_accs = [], []
        for r in range(runs):
            pred, block_pred = predict(self.bundle, self.embedding, x, run_unit, seed + r)
            accs.append(float(np.mean(pred == y)))
            block_accs.append(np.mean(block_pred == y[None, :], axis=1))
        return {"accuracy": float(np.mean(accs)), "accuracy_runs": accs,
                "per_unit_accuracy": [round(float(a), 4) for a in np.mean(block_accs, axis=0)],
                "per_unit_note": "each block's û_t alone"}


def predict(bundle, embedding: np.ndarray, x: np.ndarray, run_unit: RunUnit, seed: int):
    """Stochastic NoProp-DT inference on raw samples `x`; labels are never an input.

    z_0 ~ N(0, I);  z_t = a_t û_t(z_{t-1}, x) + b_t z_{t-1} + √c_t ε;  ŷ = argmax head(z_T).
    Returns (predicted classes (N,), per-block classes (T, N) read off each û_t).
    """
    B, N, d = bundle.batch_size, len(x), embedding.shape[1]
    preds, block_preds = [], []
    for start in range(0, N, B):
        xb, n = padded(bundle, x[start:start + B])
        z = prng.normal(prng.key(seed, prng.INFERENCE, start // B, 0), (B, d))
        per_block = []
        for unit in bundle.blocks:
            u_hat = run_unit(unit, {"x": xb, "z": z})["u_hat"]
            per_block.append(nearest_class(u_hat, embedding)[:n])
            a, b, c = bundle.schedule.coefficients(unit.t)
            eps = prng.normal(prng.key(seed, prng.INFERENCE, start // B, unit.t), (B, d))
            z = (a * u_hat + b * z + np.sqrt(c) * eps).astype(np.float32)
        logits = run_unit(bundle.head, {"z": z})["logits"]
        preds.append(np.argmax(logits, axis=1)[:n])
        block_preds.append(np.stack(per_block))
    return np.concatenate(preds), np.concatenate(block_preds, axis=1)


def nearest_class(u_hat: np.ndarray, embedding: np.ndarray) -> np.ndarray:
    d2 = (u_hat ** 2).sum(1, keepdims=True) - 2 * u_hat @ embedding.T + (embedding ** 2).sum(1)
    return np.argmin(d2, axis=1)


RULES = {"noprop-dt": NopropDT}
