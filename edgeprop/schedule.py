"""NoProp-DT's noise schedule, in the paper's index direction: t=0 is pure noise, t=T clean.

    ᾱ_t increases with t;  q(z_t | y) = N(√ᾱ_t · u_y, (1 − ᾱ_t) I);  SNR(t) = ᾱ_t / (1 − ᾱ_t)
    block t's loss weight   w_t = (T/2) · η · (SNR(t) − SNR(t−1))           (> 0, finite)
    inference  z_t = a_t · û_t(z_{t−1}, x) + b_t · z_{t−1} + τ · √c_t · ε,  α_{t−1} = ᾱ_{t−1} / ᾱ_t

τ is the inference temperature. The paper's chain (τ = 1) *samples* a label from p(y|x): with
ideal blocks z_T ~ Σ_y p(y|x) q(z_T|y), so its accuracy is E_x[p(y*|x)], not the argmax's.
τ = 0 (the mean chain, the default) follows the posterior mean instead (research/noprop.md §5).

Copying DDPM's cosine schedule without flipping it gives negative weights (docs/noprop.md,
pitfall 1), and ᾱ_T = 1 gives SNR(T) = ∞ (pitfall 2): the schedule is flipped, ᾱ clamped and w_t capped,
and `check()` asserts what must hold.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .errors import BundleError


@dataclass(frozen=True)
class NoiseSchedule:
    alpha_bar: np.ndarray  # (T+1,), index t = 0 (noise) .. T (clean)
    eta: float
    # The cap on block weights w_t. Uncapped, the flipped cosine (s = 0.008, T = 10, η = 0.1)
    # gives w_t from 0.012 (block 1) to 13 (block 9), and w_T = ∞ but for ᾱ_T's clamp to
    # 0.9999, which makes it 4982. The paper names no cap. Under AdamW (the default, as in the paper) the weight is
    # a constant factor on one block's loss, and Adam's update m̂/(√v̂ + ε) does not see a
    # constant factor (only ε does; weight decay is decoupled): capping changes nothing
    # (Fashion-MNIST MLP 81.06 / 81.14 / 80.97 % capped at 5 / uncapped / all weights 1,
    # research notes). With SGD the weight multiplies the block's learning rate, and there the
    # cap matters: digits MLP, SGD lr 0.05 (head 0.5), 40 epochs, 10 blocks: capped at 5,
    # 96.9% (mean chain); uncapped (w_9 = 13, w_10 = 4982) blocks 9 and 10 diverge and the
    # chain is at chance, 10.2%. (Under SGD blocks 1-4, w_t < 0.2, barely learn either way:
    # 12-46% alone; the late blocks carry the chain.)
    max_weight: float

    @classmethod
    def cosine(cls, T: int, eta: float = 0.1, s: float = 0.008, clamp=(1e-4, 0.9999), max_weight: float = 5.0):
        k = np.arange(T + 1, dtype=np.float64)  # DDPM's index: 0 is clean
        f = np.cos((k / T + s) / (1 + s) * np.pi / 2) ** 2
        alpha_bar = np.clip((f / f[0])[::-1], *clamp)  # flipped: t = T − k
        return cls(alpha_bar.copy(), float(eta), float(max_weight))

    @property
    def T(self) -> int:
        return len(self.alpha_bar) - 1

    @property
    def snr(self) -> np.ndarray:
        return self.alpha_bar / (1 - self.alpha_bar)

    @cached_property
    def weights(self) -> np.ndarray:
        """w_t for t = 1..T (index 0 is block 1)."""
        w = self.T / 2 * self.eta * np.diff(self.snr)
        return np.minimum(w, self.max_weight)

    def coefficients(self, t: int) -> tuple[float, float, float]:
        """(a_t, b_t, c_t) for the step from z_{t−1} to z_t, t = 1..T."""
        ab_t, ab_prev = self.alpha_bar[t], self.alpha_bar[t - 1]
        alpha_prev = ab_prev / ab_t
        a = np.sqrt(ab_t) * (1 - alpha_prev) / (1 - ab_prev)
        b = np.sqrt(alpha_prev) * (1 - ab_t) / (1 - ab_prev)
        c = (1 - ab_t) * (1 - alpha_prev) / (1 - ab_prev)
        return float(a), float(b), float(c)

    def check(self) -> NoiseSchedule:
        ab = self.alpha_bar
        if ab.ndim != 1 or len(ab) < 2 or not np.all(np.isfinite(ab)):
            raise BundleError("noise schedule: alpha_bar must be a finite list of T+1 values")
        if not np.all((ab > 0) & (ab < 1)):
            raise BundleError("noise schedule: every alpha_bar must lie strictly between 0 and 1")
        if not np.all(np.diff(ab) > 0):
            raise BundleError("noise schedule: alpha_bar must increase with t (t=0 noise, t=T clean)")
        w = self.weights
        if not np.all(np.isfinite(w) & (w > 0)):
            raise BundleError(f"noise schedule: block weights must be positive and finite, got {w}")
        return self

    def to_json(self) -> dict:
        return {"kind": "cosine", "alpha_bar": self.alpha_bar.tolist(), "eta": self.eta,
                "max_weight": self.max_weight, "weights": self.weights.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> NoiseSchedule:
        try:
            return cls(np.asarray(d["alpha_bar"], dtype=np.float64), float(d["eta"]), float(d["max_weight"])).check()
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest.json: bad noise schedule ({e!r})") from None


# Inference temperature τ (see the module's docstring): 0 the mean chain, 1 the paper's sampled one.
MEAN, SAMPLE = 0.0, 1.0
INFERENCE_MODES = {"mean": MEAN, "sample": SAMPLE}


def check_temperature(value, what: str = "--temperature") -> float:
    """τ as a float, or a clear error: it scales a standard deviation, so it must be a finite
    number ≥ 0 (0: the mean chain, 1: the paper's sampled chain)."""
    try:
        tau = float(value)
    except (TypeError, ValueError):
        raise BundleError(f"{what}: inference temperature must be a number, got {value!r}") from None
    if not np.isfinite(tau) or tau < 0:
        raise BundleError(f"{what}: inference temperature must be a finite number >= 0 "
                          f"(0 the mean chain, 1 the paper's sampled chain), got {value!r}")
    return tau
