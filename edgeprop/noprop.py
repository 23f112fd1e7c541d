"""NoProp-DT orchestration in numpy: what each step is fed, and how a trained chain predicts.

The device runtime and the torch reference both draw their batches and noise here, so the
two see identical inputs step for step. Every random draw comes from a generator seeded by
(seed, epoch, batch, unit): no generator state to checkpoint, and a resumed run replays
exactly what an uninterrupted one would have drawn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .bundle import Bundle, Unit
from .datasets import Dataset

ORDERS = ("interleaved", "block-sequential")


@dataclass(frozen=True)
class Plan:
    """The whole run as a flat sequence of work items (unit, epoch, batch)."""
    n_units: int
    n_batches: int
    epochs: int
    order: str

    @property
    def total(self) -> int:
        return self.n_units * self.n_batches * self.epochs

    def item(self, i: int) -> tuple[int, int, int]:
        U, B, E = self.n_units, self.n_batches, self.epochs
        if self.order == "interleaved":  # every unit steps on each batch
            return i % U, (i // (U * B)), (i // U) % B
        return i // (B * E), (i // B) % E, i % B  # block-sequential: one unit to completion


def normalise(bundle: Bundle, x: np.ndarray) -> np.ndarray:
    """Raw samples (N, ...) -> the model's float32 input (N, *input_shape)."""
    mean, std = bundle.input_norm
    out = x.reshape(len(x), *bundle.input_shape).astype(np.float32)  # the one new buffer
    out -= np.float32(mean)
    out /= np.float32(std)
    return out


class Feeder:
    """Builds the data inputs of a unit's step graph for one work item."""

    def __init__(self, bundle: Bundle, embedding: np.ndarray, data: Dataset, seed: int):
        self.bundle, self.embedding, self.seed = bundle, embedding.astype(np.float32), seed
        self.x, self.y = data.x, data.y
        self.n_batches = -(-len(self.y) // bundle.batch_size)
        self.onehot = np.eye(bundle.num_classes, dtype=np.float32)
        self._perm_epoch, self._perm, self._mask = None, None, None

    def _batch(self, epoch: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample indices of one batch, padded to the graph's fixed batch size, and the mask
        that keeps the padding (copies of a real sample) out of the loss."""
        if self._perm_epoch != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.y))
            B = self.bundle.batch_size
            self._perm = np.concatenate([perm, np.zeros(self.n_batches * B - len(perm), perm.dtype)])
            self._mask = (np.arange(len(self._perm)) < len(perm)).astype(np.float32)
            self._perm_epoch = epoch
        rows = slice(batch * self.bundle.batch_size, (batch + 1) * self.bundle.batch_size)
        return self._perm[rows], self._mask[rows]

    def feeds(self, unit_index: int, epoch: int, batch: int) -> dict[str, np.ndarray]:
        unit = self.bundle.units[unit_index]
        idx, mask = self._batch(epoch, batch)
        y = self.y[idx]
        u = self.embedding[y]
        rng = np.random.default_rng([self.seed, epoch, batch, unit_index])
        eps = rng.standard_normal(u.shape, dtype=np.float32)
        sched = self.bundle.schedule
        if unit.role == "block":
            # Block t denoises z_{t-1} ~ q(z_{t-1} | y) towards u_y.
            ab = sched.alpha_bar[unit.t - 1]
            z = (np.sqrt(ab) * u + np.sqrt(1 - ab) * eps).astype(np.float32)
            return {"x": normalise(self.bundle, self.x[idx]), "z": z, "target": u, "mask": mask,
                    "loss_scale": np.array(sched.weights[unit.t - 1], np.float32)}
        # The head learns p(y | z_T) on z_T ~ q(z_T | y): never on a block's output.
        ab = sched.alpha_bar[-1]
        z = (np.sqrt(ab) * u + np.sqrt(1 - ab) * eps).astype(np.float32)
        return {"z": z, "target": self.onehot[y], "mask": mask}


RunUnit = Callable[[Unit, dict[str, np.ndarray]], np.ndarray]


def predict(bundle: Bundle, embedding: np.ndarray, x: np.ndarray, run_unit: RunUnit, seed: int):
    """Stochastic NoProp-DT inference on raw samples `x`; labels are never an input.

    z_0 ~ N(0, I);  z_t = a_t û_t(z_{t-1}, x) + b_t z_{t-1} + √c_t ε;  ŷ = argmax head(z_T).
    `run_unit(unit, feeds)` runs a unit's inference graph on one fixed-size batch.
    Returns (predicted classes (N,), per-block classes (T, N) read off each û_t).
    """
    B, N, d = bundle.batch_size, len(x), embedding.shape[1]
    rng = np.random.default_rng([seed, 0x1FE2])
    preds, block_preds = [], []
    for start in range(0, N, B):
        xb = x[start:start + B]
        n = len(xb)
        xb = normalise(bundle, np.concatenate([xb, np.zeros((B - n, *xb.shape[1:]), xb.dtype)]))
        z = rng.standard_normal((B, d), dtype=np.float32)
        per_block = []
        for unit in bundle.blocks:
            u_hat = run_unit(unit, {"x": xb, "z": z})
            per_block.append(nearest_class(u_hat, embedding)[:n])
            a, b, c = bundle.schedule.coefficients(unit.t)
            z = (a * u_hat + b * z + np.sqrt(c) * rng.standard_normal((B, d), dtype=np.float32)).astype(np.float32)
        logits = run_unit(bundle.head, {"z": z})
        preds.append(np.argmax(logits, axis=1)[:n])
        block_preds.append(np.stack(per_block))
    return np.concatenate(preds), np.concatenate(block_preds, axis=1)


def nearest_class(u_hat: np.ndarray, embedding: np.ndarray) -> np.ndarray:
    d2 = (u_hat ** 2).sum(1, keepdims=True) - 2 * u_hat @ embedding.T + (embedding ** 2).sum(1)
    return np.argmin(d2, axis=1)
