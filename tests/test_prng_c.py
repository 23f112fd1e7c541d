"""targets/c99/prng.h, compiled with the host's C compiler, draws what edgeprop.prng draws:
keys, bits, uniforms and permutations bit for bit, normals equal as float32."""
import shutil
import subprocess

import numpy as np
import pytest

from conftest import ROOT
from edgeprop import prng

# Reads (kind, n, words...) lines on stdin, writes each result's raw bytes to stdout.
HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include "prng.h"
static float f[1 << 17];
static uint16_t p[1 << 16];
int main(void) {
    char kind;
    unsigned long n, nw;
    uint64_t w[8];
    while (scanf(" %c %lu %lu", &kind, &n, &nw) == 3) {
        for (unsigned long i = 0; i < nw; ++i) scanf("%llu", (unsigned long long *)&w[i]);
        uint64_t k = ep_key(w, nw);
        if (kind == 'k') fwrite(&k, 8, 1, stdout);
        for (unsigned long i = 0; kind == 'b' && i < n; ++i) { uint64_t b = ep_bits(k, i); fwrite(&b, 8, 1, stdout); }
        for (unsigned long i = 0; kind == 'u' && i < n; ++i) f[i] = ep_uniform(k, i);
        if (kind == 'n') ep_normal(k, f, n);
        if (kind == 'u' || kind == 'n') fwrite(f, 4, n, stdout);
        if (kind == 'p') { ep_permutation(k, p, (uint32_t)n); fwrite(p, 2, n, stdout); }
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_prng(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("no host C compiler (gcc)")
    folder = tmp_path_factory.mktemp("prng")
    (folder / "harness.c").write_text(HARNESS)
    exe = folder / "harness"
    subprocess.run(["gcc", "-std=c99", "-O2", "-ffp-contract=off", "-Wall", "-Werror", "-I",
                    str(ROOT / "targets" / "c99"), str(folder / "harness.c"), "-o", str(exe), "-lm"], check=True)

    def draw(kind: str, n: int, *words: int) -> bytes:
        line = f"{kind} {n} {len(words)} {' '.join(map(str, words))}\n"
        return subprocess.run([str(exe)], input=line.encode(), capture_output=True, check=True).stdout
    return draw


WORDS = [(0,), (7, prng.NOISE, 3, 11, 2), (2**64 - 1, 5), (123456789, prng.ORDER, 40), (1, 2, 3, 4, 5, 6, 7)]


@pytest.mark.parametrize("words", WORDS)
def test_keys_bits_uniforms_permutations_are_bit_exact(c_prng, words):
    k = prng.key(*words)
    assert np.frombuffer(c_prng("k", 0, *words), np.uint64)[0] == k
    assert np.array_equal(np.frombuffer(c_prng("b", 1000, *words), np.uint64), prng.bits(k, 1000))
    assert np.array_equal(np.frombuffer(c_prng("u", 1000, *words), np.float32), prng.uniform(k, 1000))
    for n in (1, 2, 17, 300, 1347):
        assert np.array_equal(np.frombuffer(c_prng("p", n, *words), np.uint16), prng.permutation(k, n)), n


@pytest.mark.parametrize("words", WORDS)
def test_normals_are_equal_as_float32(c_prng, words):
    k = prng.key(*words)
    for n in (1, 7, 100_001):  # odd lengths drop the last pair's sine
        c = np.frombuffer(c_prng("n", n, *words), np.float32)
        py = prng.normal(k, n)
        ulps = np.abs(c.view(np.int32).astype(np.int64) - py.view(np.int32).astype(np.int64))
        assert ulps.max() == 0, f"{int((ulps > 0).sum())} of {n} differ, by up to {int(ulps.max())} ulp"
