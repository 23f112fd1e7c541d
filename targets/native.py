"""The native target: a bundle and a data set -> a folder that trains on a Linux device with
no Python, only a C compiler (`edgeprop deploy BUNDLE --device rpi-zero-2w --target native`).

    out/
      graphs/*.c     every step and inference graph as the native engine compiles it (generate()):
                     emx-onnx-cgen's C, temporaries in one liveness-planned scratch area, the
                     optimizer's element-wise chain fused into loops, transposes folded into the
                     products, and the products through OpenBLAS where the device's compiler finds
                     it (-DEP_BLAS), the generated loops otherwise
      model.h/.c     the bundle's sizes, units, coefficients and label embedding (targets/c99.py)
      driver.c ...   c99/: the microcontroller's driver, built with EP_LINUX (every unit's state in
                     RAM, the run's order: interleaved or block-sequential), files.c (data,
                     state, atomic checkpoints), train.c and eval.c (the programs)
      Makefile       `make` (CC overridable; -O3, the profile's cflags, no fast-math)
      data.bin       the data (its format: c99/files.c, read_data() here)
      state.bin      every unit's initial state; layout.json says where each unit's lies

The driver feeds each step what edgeprop's numpy trainer feeds it in the same order from the
same seed, so `./train` ends with the weights `edgeprop train --data out/data.bin ...` would.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from edgeprop.bundle import Bundle
from edgeprop.bundle import load as load_bundle
from edgeprop.device_profile import Profile
from edgeprop.errors import EdgepropError
from edgeprop.rules import ORDERS
from edgeprop.schedule import check_temperature
from edgeprop.storage import check_output, new_folder

from . import c99
from .cblas import fold_transposes, use_blas
from .fuse import fuse_elementwise

SOURCES = ("edgeprop_fw.h", "prng.h", "driver.c", "host.c", "files.c", "files.h", "train.c", "eval.c")
DATA_MAGIC, CHECKPOINT_MAGIC = b"EPDATA1\0", b"EPCKPT1\0"


def generate(src: Path, c_file: Path, fn: str, key: str, inputs: list[str], outputs: list[str],
             blas_prefix: str | None, in_place: bool, guard: str | None = None) -> tuple[str, c99.GraphC, dict]:
    """One graph -> fast host C (the native engine's and this target's): emx-onnx-cgen with the
    transposes folded into products, temporaries planned (c99.plan_arena), element-wise runs
    fused, 2-D products through cblas_sgemm (`blas_prefix`: its symbols' prefix; None: loops;
    `guard`: a macro that chooses BLAS at build time). Returns the C, its plan, and counts."""
    folded = 0

    def rewrite(model):
        nonlocal folded
        folded = fold_transposes(model)

    c99.emit_c(src, c_file, fn, rewrite)
    text, graph = c99.plan_arena(c_file.read_text(), fn, key, inputs, outputs, in_place=in_place)
    text, fused = fuse_elementwise(text, fn)
    products = 0
    if blas_prefix is not None:
        text, products = use_blas(text, blas_prefix, guard)
    return text, graph, {"transposes_folded": folded, "elementwise_fused": fused, "products_on_blas": products}


def write_data(path: Path, x_train, y_train, x_test, y_test) -> None:
    """data.bin: the header files.c checks, then the samples (uint8 or float32) and labels."""
    kind = np.uint8 if c99.sample_type(x_train, x_test) == "uint8_t" else np.float32
    n_in = int(np.prod(x_train.shape[1:]))
    with open(path, "wb") as f:
        f.write(DATA_MAGIC + np.array([len(y_train), len(y_test), n_in, np.dtype(kind).itemsize], "<u4").tobytes())
        for x, y in ((x_train, y_train), (x_test, y_test)):
            f.write(np.ascontiguousarray(x, kind).reshape(len(y), n_in).astype(np.dtype(kind).newbyteorder("<"))
                    .tobytes())
            f.write(np.asarray(y, np.uint8).tobytes())


def read_data(path: Path) -> dict[str, np.ndarray]:
    """data.bin -> x_train, y_train, x_test, y_test (samples flat, n x n_in)."""
    raw = Path(path).read_bytes()
    if raw[:8] != DATA_MAGIC:
        raise EdgepropError(f"{path}: not an edgeprop data file (no EPDATA1 header)")
    n_train, n_test, n_in, size = np.frombuffer(raw, "<u4", 4, 8).tolist()
    kind = np.dtype("<f4" if size == 4 else "u1")
    out, at = {}, 24
    for split, n in (("train", n_train), ("test", n_test)):
        out[f"x_{split}"] = np.frombuffer(raw, kind, n * n_in, at).reshape(n, n_in)
        at += n * n_in * size
        out[f"y_{split}"] = np.frombuffer(raw, np.uint8, n, at).astype(np.int64)
        at += n
    return out


def read_checkpoint_state(folder: Path) -> np.ndarray:
    """The state floats of folder/checkpoint.bin (layout.json says whose each is)."""
    layout = json.loads((Path(folder) / "layout.json").read_text())
    raw = (Path(folder) / "checkpoint.bin").read_bytes()
    if raw[:8] != CHECKPOINT_MAGIC:
        raise EdgepropError(f"{folder}/checkpoint.bin: not an edgeprop checkpoint")
    return np.frombuffer(raw, "<f4", layout["state_floats"], layout["checkpoint_state_offset"])


def _check(bundle: Bundle, device: Profile, order: str) -> None:
    if device.kind != "linux":
        raise EdgepropError(f"--target native is for Linux devices; {device.name} is a {device.kind} device "
                            "(use --target c99)")
    if order not in ORDERS:
        raise EdgepropError(f"--order must be one of {', '.join(ORDERS)}")
    c99.check_bundle(bundle, "native")


_GENERATED: dict[tuple[str, str], tuple[str, c99.GraphC]] = {}  # (key, sha256) -> its C: a process makes it once


def compile_graphs(bundle: Bundle, out: Path) -> dict[str, c99.GraphC]:
    """Every graph -> out/graphs/<key>.c, BLAS chosen at build time (EP_BLAS), side by side."""
    from edgeprop.runtimes.native import graph_inputs
    (out / "graphs").mkdir(parents=True, exist_ok=True)

    def one(key):
        spec, path = bundle.graphs[key], bundle.graph_path(key)
        c_file = out / "graphs" / f"{key}.c"
        done = (key, bundle.manifest["files"][spec.file])
        if done not in _GENERATED:
            text, graph, _ = generate(path, c_file, f"ep_{key}", key, graph_inputs(path, spec),
                                      [t.name for t in spec.outputs], "", in_place=True, guard="EP_BLAS")
            _GENERATED[done] = text, graph
        c_file.write_text(_GENERATED[done][0])
        return key, _GENERATED[done][1]

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(pool.map(one, sorted(bundle.graphs)))


def write_folder(bundle_path: str | Path | Bundle, device: Profile, out: str | Path, data: str = "digits",
                 train_samples: int | None = None, test_samples: int | None = None, epochs: int = 1, seed: int = 0,
                 order: str = "interleaved", eval_seed: int = 0, temperature: float | None = None,
                 force: bool = False) -> dict:
    """Write the folder (see the module's docstring); return what it holds."""
    c99.require_cgen()
    bundle = bundle_path if isinstance(bundle_path, Bundle) else load_bundle(bundle_path)
    _check(bundle, device, order)
    temperature = bundle.temperature if temperature is None else check_temperature(temperature)
    if epochs < 1:
        raise EdgepropError("--epochs must be at least 1")
    x_train, y_train = c99.subset(data, "train", train_samples)
    x_test, y_test = c99.subset(data, "test", test_samples)
    if bundle.num_classes > 256:
        raise EdgepropError("--target native takes at most 256 classes (labels are bytes in data.bin)")
    out = Path(out)
    check_output(out, bundle.root, force)
    run = hashlib.sha256(json.dumps([bundle.id, epochs, seed, order, len(y_train)]).encode()).hexdigest()[:16]
    defines = {"EP_INTERLEAVED": int(order == "interleaved"), "EP_LINUX": 1, "EP_STATE_IN_RAM": 1,
               "EP_WIDE_INDEX": 1, "EP_RUN": f"UINT64_C(0x{run})"}
    with new_folder(out, mark=True) as tmp:
        graphs = compile_graphs(bundle, tmp)
        header, source, layout, _ = c99.model_sources(bundle, graphs, x_train, y_train, x_test, y_test, epochs,
                                                      seed, eval_seed, temperature, linux=defines)
        (tmp / "model.h").write_text(header)
        (tmp / "model.c").write_text(source)
        for name in SOURCES:
            shutil.copy(c99.FIRMWARE / name, tmp / name)
        (tmp / "Makefile").write_text((c99.FIRMWARE / "Makefile.linux.in").read_text().format(
            title=device.title, cflags=device.cflags or "", graphs=" ".join(g.file for g in graphs.values())))
        write_data(tmp / "data.bin", x_train, y_train, x_test, y_test)
        init, _ = bundle.initial_state()
        np.concatenate([init[u.name][t.name].reshape(-1) for u in bundle.units for t in u.state]) \
            .astype("<f4").tofile(tmp / "state.bin")
        report = {"device": device.name, "bundle": str(bundle.root), "epochs": epochs, "seed": seed, "order": order,
                  "eval_seed": eval_seed, "temperature": temperature, "train_samples": len(y_train),
                  "test_samples": len(y_test), "cflags": device.cflags, **layout,
                  "checkpoint_state_offset": 24 + 12 * len(bundle.units)}
        (tmp / "layout.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


class Target:
    """`edgeprop deploy --target native`: C sources, a Makefile and the data for a Linux device."""

    name = "native"

    def __init__(self, data: str = "digits", train_samples: int | None = None, test_samples: int | None = None,
                 epochs: int = 1, seed: int = 0, order: str = "interleaved", temperature: float | None = None):
        self.options = dict(data=data, train_samples=train_samples, test_samples=test_samples, epochs=epochs,
                            seed=seed, order=order, temperature=temperature)

    def check(self, bundle: Bundle, device: Profile) -> dict:
        _check(bundle, device, self.options["order"])
        return {"cflags": device.cflags}

    def write(self, bundle: Bundle, device: Profile, out: str | Path, force: bool = False) -> dict:
        return write_folder(bundle, device, out, force=force, **self.options)

    def summary(self, report: dict, device: Profile, out: Path) -> str:
        return (f"wrote {out} for {device.title}: {report['train_samples']} training and {report['test_samples']} "
                f"test samples, {report['epochs']} epochs, {report['order']} order\n"
                f"build on the device: make -C {out} (or here: make -C {out} CC=aarch64-linux-gnu-gcc); "
                f"then cd {out} && ./train && ./eval")
