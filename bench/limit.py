"""The practical limit of a bundle's training on this CPU, measured rather than assumed.

A training step of a unit cannot take less than its matrix products at the BLAS's speed for
their exact shapes plus one pass of the optimizer over the unit's state. So the limit, in
samples per second, is batch / sum over units of (the step graph's products, each timed
with OpenBLAS's cblas_sgemm on its own shapes and transposes + AdamW as one fused loop over
the unit's parameters: read param, m, v, gradient, write three), measured in this process
with one thread, built with the native engine's compiler flags and BLAS. Each part is the
median of 31 timings of `reps` repetitions, taken in the same run as the throughputs, so a
busy machine slows the limit as it slows the engines. The operands stay in cache between
repetitions, which the engines' (every unit's own weights) do not: a limit, not a forecast.

    from limit import practical_limit
    practical_limit("runs/digits")  # {"samples_per_s": ..., "gflops": ..., "units": {...}}
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HARNESS = r"""
#include <cblas.h>
#include <math.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
/* shapes: count rows of (transA, transB, M, N, K); seconds per pass over all of them */
double ep_products(const int *shapes, int count, int reps, const float *a, const float *b, float *c) {
    double t0 = now();
    for (int r = 0; r < reps; ++r)
        for (int i = 0; i < count; ++i) {
            const int *s = shapes + 5 * i;
            PREFIX(cblas_sgemm)(CblasRowMajor, s[0] ? CblasTrans : CblasNoTrans, s[1] ? CblasTrans : CblasNoTrans,
                                s[2], s[3], s[4], 1.0f, a, s[0] ? s[2] : s[4], b, s[1] ? s[4] : s[3], 0.0f, c, s[3]);
        }
    return (now() - t0) / reps;
}
/* AdamW, one loop: seconds per update of n parameters */
double ep_adamw(int n, int reps, float *p, float *m, float *v, const float *g) {
    double t0 = now();
    for (int r = 0; r < reps; ++r) {
        const float lr = 1e-3f, b1 = 0.9f, b2 = 0.999f, c1 = 1.0f / (1.0f - powf(b1, r + 1)),
                    c2 = 1.0f / sqrtf(1.0f - powf(b2, r + 1)), decay = 1.0f - lr * 0.01f;
        for (int i = 0; i < n; ++i) {
            m[i] = b1 * m[i] + (1.0f - b1) * g[i];
            v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
            p[i] = p[i] * decay - lr * c1 * m[i] / (sqrtf(v[i]) * c2 + 1e-8f);
        }
    }
    return (now() - t0) / reps;
}
"""


def graph_products(path: Path) -> list[tuple[int, int, int, int, int]]:
    """(transA, transB, M, N, K) of every 2-D product in a step graph, as the native engine
    computes them (constants folded, transposes folded into the products)."""
    import onnx
    from onnx import helper, shape_inference

    from edgeprop.targets.c99 import _optimised
    from edgeprop.targets.cblas import fold_transposes
    with tempfile.TemporaryDirectory() as tmp:
        _optimised(path, Path(tmp) / "g.onnx", fold_transposes)
        model = shape_inference.infer_shapes(onnx.load(str(Path(tmp) / "g.onnx")))
    g = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*g.value_info, *g.input)}
    shapes.update({t.name: list(t.dims) for t in g.initializer})
    found = []
    for node in g.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        if not a or not b or len(a) != 2 or len(b) != 2:
            continue
        attrs = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        ta, tb = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))
        m, k = (a[1], a[0]) if ta else (a[0], a[1])
        n = b[0] if tb else b[1]
        found.append((ta, tb, m, n, k))
    return found


def _harness(folder: Path):
    from edgeprop.runtimes.native import Engine
    engine = Engine(threads=1)
    if engine.blas is None:
        raise SystemExit(f"the practical limit needs OpenBLAS: {engine.warning}")
    src = folder / "limit.c"
    prefix = f"{engine.blas.prefix}##f" if engine.blas.prefix else "f"
    src.write_text(f"#define PREFIX(f) {prefix}\n" + HARNESS)
    lib = folder / "limit.so"
    flags = [f for f in engine.flags if f != "-fvisibility=hidden"]
    subprocess.run([engine.cc, *flags, *engine.blas.cflags, "-o", str(lib), str(src), *engine.blas.ldflags, "-lm"],
                   check=True)
    h = ctypes.CDLL(str(lib))
    h.ep_products.restype = h.ep_adamw.restype = ctypes.c_double
    h.ep_products.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_void_p]
    h.ep_adamw.argtypes = [ctypes.c_int, ctypes.c_int, *[ctypes.c_void_p] * 4]
    threads = getattr(h, f"{engine.blas.prefix}openblas_set_num_threads", None)
    if threads is not None:
        threads(1)
    return h, engine.blas.name


def _typical(f, reps: int, trials: int = 31) -> float:
    """The median of many short timings, so that the limit sees the machine as loaded as the
    throughput runs beside it do (the fastest timing would be an idle machine's)."""
    f(reps)  # warm: caches, BLAS buffers
    return float(np.median([f(reps) for _ in range(trials)]))


def practical_limit(bundle_path: str | Path, reps: int = 10) -> dict:
    from edgeprop import bundle as bundles
    b = bundles.load(bundle_path)
    with tempfile.TemporaryDirectory() as tmp:
        h, blas = _harness(Path(tmp))
        per_graph = {key: graph_products(b.graph_path(key)) for key in {u.step_graph for u in b.units}}
        big = max((m * k, k * n, m * n) for g in per_graph.values() for _, _, m, n, k in g)
        a, bb, c = (np.random.default_rng(0).standard_normal(max(big), dtype=np.float32) for _ in range(3))
        units, total, flops = {}, 0.0, 0
        for u in b.units:
            found = per_graph[u.step_graph]

            def timer(shape):
                row = np.array(shape, np.int32)
                return lambda reps: h.ep_products(row.ctypes.data, 1, reps, a.ctypes.data, bb.ctypes.data,
                                                  c.ctypes.data)

            p, m, v, g = (np.full(u.n_params, 0.01, np.float32) for _ in range(4))

            def adamw(reps, n=u.n_params, p=p, m=m, v=v, g=g):
                return h.ep_adamw(n, reps, p.ctypes.data, m.ctypes.data, v.ctypes.data, g.ctypes.data)

            t_products = sum(_typical(timer(shape), reps) for shape in found)
            t_opt = _typical(adamw, reps)
            unit_flops = sum(2 * m_ * n_ * k_ for _, _, m_, n_, k_ in per_graph[u.step_graph])
            units[u.name] = {"products": len(found), "mflop": unit_flops / 1e6, "products_us": t_products * 1e6,
                             "optimizer_us": t_opt * 1e6,
                             "gflops": unit_flops / t_products / 1e9 if t_products > 0 else None}
            total += t_products + t_opt
            flops += unit_flops
    product_time = sum(x["products_us"] for x in units.values()) / 1e6
    return {"samples_per_s": b.batch_size / total, "batch": b.batch_size, "blas": blas,
            "gflops": flops / product_time / 1e9, "products_share": product_time / total,
            "threads": 1, "cpu": os.uname().machine, "units": units}
