"""What every rule shares on the device: the work plan, batches, input normalisation.

Every random draw comes from a generator keyed by (seed, epoch, batch, ...): no generator
state to checkpoint, and a resumed run replays exactly what an uninterrupted one would have
drawn. The batch order (and NoProp-DT's noise) come from edgeprop.prng, which firmware in C
reproduces bit for bit. The device runtime and the torch reference both take their batches from a Rule, so
the two see identical inputs step for step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from .. import prng

if TYPE_CHECKING:  # the bundle checks its rule's name against the rules: no import back at run time
    from ..bundle import Bundle, Unit
    from ..datasets import Dataset

ORDERS = ("interleaved", "block-sequential")

# run_unit(unit, feeds) -> outputs: one unit's inference graph on one fixed-size batch.
RunUnit = Callable[["Unit", dict], dict]
# state_of(unit name) -> that unit's current state {"param": ..., ...}: for a rule whose feeds
# read another unit's weights (NoProp-DT's blocks read the W_embed its head learns).
StateOf = Callable[[str], dict]


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
        if self.order == "interleaved":  # every unit steps on each batch, in order
            return i % U, (i // (U * B)), (i // U) % B
        return i // (B * E), (i // B) % E, i % B  # block-sequential: one unit to completion


def normalise(bundle: Bundle, x: np.ndarray) -> np.ndarray:
    """Raw samples (N, ...) -> the model's float32 input (N, *input_shape)."""
    mean, std = bundle.input_norm
    out = x.reshape(len(x), *bundle.input_shape).astype(np.float32)  # the one new buffer
    out -= np.float32(mean)
    out /= np.float32(std)
    return out


def padded(bundle: Bundle, x: np.ndarray) -> tuple[np.ndarray, int]:
    """One evaluation batch: normalised and padded with zeros to the graphs' batch size."""
    n, B = len(x), bundle.batch_size
    return normalise(bundle, np.concatenate([x, np.zeros((B - n, *x.shape[1:]), x.dtype)])), n


class Rule:
    """Base of the device-side rules. A rule says what a unit's step graph is fed
    (`feeds`), keeps what later units need from a step's outputs (`observe`), and predicts
    with the trained units' inference graphs (`evaluate`). A rule whose update is not one
    step-graph run (zeroth-order) declares `updates_itself` and defines `update`."""

    orders = ORDERS
    updates_itself = False  # True: `update` changes the weights; the bundle has no step graphs
    # Feeds every unit of a batch gets alike, for a rule whose units are independent given a
    # batch's feeds (no unit reads another's output): their step graphs can run as one fused
    # graph (`export --fused-step`) that takes these once. None: the units cannot be fused.
    batch_feeds: tuple[str, ...] | None = None

    def __init__(self, bundle: Bundle, data: Dataset, seed: int, run_unit: RunUnit | None = None,
                 state_of: StateOf | None = None):
        self.bundle, self.seed, self.run_unit, self.state_of = bundle, seed, run_unit, state_of
        self.x, self.y = data.x, data.y
        self.n_batches = -(-len(self.y) // bundle.batch_size)
        self.onehot = np.eye(bundle.num_classes, dtype=np.float32)
        self._perm_epoch, self._perm, self._mask = None, None, None

    def batch(self, epoch: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample indices of one batch, padded to the graph's fixed batch size, and the mask
        that keeps the padding (copies of a real sample) out of the loss."""
        if self._perm_epoch != epoch:
            perm = prng.permutation(prng.key(self.seed, prng.ORDER, epoch), len(self.y))
            B = self.bundle.batch_size
            self._perm = np.concatenate([perm, np.zeros(self.n_batches * B - len(perm), perm.dtype)])
            self._mask = (np.arange(len(self._perm)) < len(perm)).astype(np.float32)
            self._perm_epoch = epoch
        rows = slice(batch * self.bundle.batch_size, (batch + 1) * self.bundle.batch_size)
        return self._perm[rows], self._mask[rows]

    def feeds(self, index: int, epoch: int, batch: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def observe(self, index: int, epoch: int, batch: int, outputs: dict) -> None:
        """Called with every step's outputs; chained rules keep a unit's output for the next."""

    def evaluate(self, x: np.ndarray, y: np.ndarray, run_unit: RunUnit, seed: int = 0, runs: int = 1) -> dict:
        raise NotImplementedError
