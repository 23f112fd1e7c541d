"""A portable, counter-based random generator: the same numbers from numpy and from C.

A microcontroller that trains must draw the very noise the host would draw from the same
seed, so that weights trained on either agree. numpy's generators are not written down
bit by bit; this one is, in a dozen lines (targets/c99/prng.h is the C twin):

    GOLDEN   = 0x9E3779B97F4A7C15
    mix(z)   = splitmix64's finaliser:  z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
                                        z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31
    key(w1, ..., wn)  k = 0; for each word w: k = mix(k + GOLDEN + w)
    bits(k, i)        mix(k + (i + 1) * GOLDEN)                  the i-th 64-bit draw

    uniform(k, n)[i]  = (bits(k, i) >> 40) * 2^-24               float32 in [0, 1), exact
    normal(k, n)      Box-Muller on pairs, in double precision then rounded to float32:
                      u1 = ((bits(k, 2j) >> 40) + 1) * 2^-24,  u2 = (bits(k, 2j + 1) >> 40) * 2^-24
                      r = sqrt(-2 ln u1),  out[2j] = r cos(2π u2),  out[2j+1] = r sin(2π u2)
    permutation(k, n) indices 0..n-1 sorted by bits(k, i), ties by index

All arithmetic on words is modulo 2^64. Every draw is addressed by its key and counter, so
there is no generator state to carry or checkpoint, and a block trained alone on a
microcontroller draws what it would have drawn in an interleaved run on the host. uniform
and permutation are bit-exact everywhere; normal is exact up to the C library's log, cos and
sin (correctly rounded to float32 on every libm we tried).
"""
from __future__ import annotations

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_TOP24 = np.uint64(40)
_ULP24 = 2.0 ** -24


def _mix(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> np.uint64(30))
    z = z * _M1
    z = z ^ (z >> np.uint64(27))
    z = z * _M2
    return z ^ (z >> np.uint64(31))


_WORD = (1 << 64) - 1


def _mix_int(z: int) -> int:
    """_mix on one Python int: a key is made for every step, and numpy's per-call cost on
    one-element arrays was a tenth of a native block step."""
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & _WORD
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & _WORD
    return z ^ (z >> 31)


def key(*words: int) -> int:
    """A stream's 64-bit key from non-negative integers (seed, purpose, epoch, ...)."""
    k = 0
    for w in words:
        if w < 0:
            raise ValueError(f"prng.key takes non-negative words, got {w}")
        k = _mix_int((k + int(GOLDEN) + int(w)) & _WORD)
    return k


def bits(k: int, n: int) -> np.ndarray:
    """The stream's first n 64-bit draws."""
    counter = np.arange(1, n + 1, dtype=np.uint64)
    return _mix(np.uint64(k) + counter * GOLDEN)


def uniform(k: int, shape) -> np.ndarray:
    n = int(np.prod(shape))
    return ((bits(k, n) >> _TOP24).astype(np.float32) * np.float32(_ULP24)).reshape(shape)


def normal(k: int, shape) -> np.ndarray:
    n = int(np.prod(shape))
    top = (bits(k, n + (n & 1)) >> _TOP24).astype(np.float64).reshape(-1, 2)
    r = np.sqrt(-2.0 * np.log((top[:, 0] + 1.0) * _ULP24))
    theta = 2.0 * np.pi * (top[:, 1] * _ULP24)
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1).reshape(-1)[:n].astype(np.float32).reshape(shape)


def permutation(k: int, n: int) -> np.ndarray:
    return np.argsort(bits(k, n), kind="stable")


# What each stream is for, the first word after the seed in its key (the C driver uses the same):
ORDER = 1      # key(seed, ORDER, epoch): the epoch's order of training samples (permutation)
NOISE = 2      # key(seed, NOISE, epoch, batch, unit): the noise a unit's step is fed (normal)
DROPOUT = 3    # key(seed, DROPOUT, epoch, batch, unit, site): dropout masks (uniform)
INFERENCE = 4  # key(seed, INFERENCE, batch, t): z_0 (t = 0) and block t's added noise (normal)
