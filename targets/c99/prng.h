/* edgeprop's portable counter-based random generator: the C twin of edgeprop/prng.py.
 *
 * Bit for bit the same specification (read it there):
 *   mix(z)           splitmix64's finaliser
 *   key(w1..wn)      k = 0; for each word: k = mix(k + GOLDEN + w)
 *   bits(k, i)       mix(k + (i + 1) * GOLDEN)                     the i-th 64-bit draw
 *   uniform(k)[i]    (bits(k, i) >> 40) * 2^-24                     float in [0, 1), exact
 *   normal(k)        Box-Muller on pairs in double, rounded to float:
 *                    u1 = ((bits(k, 2j) >> 40) + 1) * 2^-24, u2 = (bits(k, 2j+1) >> 40) * 2^-24
 *                    r = sqrt(-2 ln u1); out[2j] = r cos(2 pi u2); out[2j+1] = r sin(2 pi u2)
 *   permutation(k,n) 0..n-1 sorted by bits(k, i), ties by index
 *
 * C99, uint64_t arithmetic (wraps modulo 2^64 by definition), no allocation, no state:
 * every draw is addressed by (key, counter). normal() needs libm's log, cos and sin in
 * double precision; build without -ffast-math and with -ffp-contract=off.
 */
#ifndef EDGEPROP_PRNG_H
#define EDGEPROP_PRNG_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#ifdef EP_WIDE_INDEX
typedef uint32_t ep_index;  /* sample indices: more than 65536 samples (Linux) */
#else
typedef uint16_t ep_index;  /* two bytes each in a microcontroller's SRAM */
#endif

#define EP_GOLDEN UINT64_C(0x9E3779B97F4A7C15)
/* What each stream is for: the first word after the seed (edgeprop/prng.py names the same). */
#define EP_ORDER 1u     /* key(seed, ORDER, epoch): the epoch's sample order */
#define EP_NOISE 2u     /* key(seed, NOISE, epoch, batch, unit): a step's noise */
#define EP_DROPOUT 3u   /* key(seed, DROPOUT, epoch, batch, unit, site) */
#define EP_INFERENCE 4u /* key(seed, INFERENCE, batch, t): z_0 (t = 0) and block t's noise */

static inline uint64_t ep_mix(uint64_t z) {
    z ^= z >> 30;
    z *= UINT64_C(0xBF58476D1CE4E5B9);
    z ^= z >> 27;
    z *= UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

/* key(words[0], ..., words[n-1]) */
static inline uint64_t ep_key(const uint64_t *words, size_t n) {
    uint64_t k = 0;
    for (size_t i = 0; i < n; ++i) k = ep_mix(k + EP_GOLDEN + words[i]);
    return k;
}

static inline uint64_t ep_bits(uint64_t k, uint64_t i) { return ep_mix(k + (i + 1) * EP_GOLDEN); }

static inline float ep_uniform(uint64_t k, uint64_t i) {
    return (float)(ep_bits(k, i) >> 40) * (float)(1.0 / 16777216.0);  /* exact: 24 bits, power of 2 */
}

/* out[0..n-1] = normal(k, n): pairs j = 0, 1, ...; an odd n drops the last pair's sine. */
static inline void ep_normal(uint64_t k, float *out, size_t n) {
    const double ulp = 1.0 / 16777216.0, two_pi = 6.283185307179586;  /* numpy's 2*pi, as a double */
    for (size_t j = 0; 2 * j < n; ++j) {
        double u1 = ((double)(ep_bits(k, 2 * j) >> 40) + 1.0) * ulp;
        double u2 = (double)(ep_bits(k, 2 * j + 1) >> 40) * ulp;
        double r = sqrt(-2.0 * log(u1)), theta = two_pi * u2;
        out[2 * j] = (float)(r * cos(theta));
        if (2 * j + 1 < n) out[2 * j + 1] = (float)(r * sin(theta));
    }
}

/* (bits(k, a), a) < (bits(k, b), b): the permutation's total order. */
static inline int ep_before(uint64_t k, uint32_t a, uint32_t b) {
    uint64_t x = ep_bits(k, a), y = ep_bits(k, b);
    return x < y || (x == y && a < b);
}

/* Sift perm[root] down the max-heap perm[0..size-1]. */
static inline void ep_sift(uint64_t k, ep_index *perm, uint32_t root, uint32_t size) {
    for (;;) {
        uint32_t child = 2 * root + 1;
        if (child >= size) return;
        if (child + 1 < size && ep_before(k, perm[child], perm[child + 1])) ++child;
        if (!ep_before(k, perm[root], perm[child])) return;
        ep_index t = perm[root]; perm[root] = perm[child]; perm[child] = t;
        root = child;
    }
}

/* perm[0..n-1] = permutation(k, n), n <= 65536 unless EP_WIDE_INDEX. In place, with no buffer beyond perm: a heap
 * sort of the indices that recomputes each draw when it compares (the order is total, so any
 * correct sort gives numpy's stable argsort). */
static inline void ep_permutation(uint64_t k, ep_index *perm, uint32_t n) {
    for (uint32_t i = 0; i < n; ++i) perm[i] = (ep_index)i;
    for (uint32_t i = n / 2; i-- > 0;) ep_sift(k, perm, i, n);
    for (uint32_t end = n; end-- > 1;) {
        ep_index t = perm[0]; perm[0] = perm[end]; perm[end] = t;
        ep_sift(k, perm, 0, end);
    }
}

#endif
