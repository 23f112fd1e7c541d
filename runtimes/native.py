"""The native engine: each graph compiled to C and built into a shared library on this host.

At load, a graph goes through what `deploy --target c99` does for a microcontroller
(emx-onnx-cgen, temporaries in one liveness-planned scratch area: edgeprop.targets.c99),
its transposes folded into the products and the products through OpenBLAS where this host
has one (edgeprop.targets.cblas; the generated loops otherwise), runs of element-wise nodes
(the optimizer) fused into one loop each (edgeprop.targets.fuse), then the host's C
compiler (`$CC`, else cc/gcc/clang) with -O3 for this CPU and without fast-math. The
library is cached by the content hash of everything that went into it (graph, generator,
compiler, flags, BLAS, edgeprop's code generators) under `$EDGEPROP_CACHE` (default
~/.cache/edgeprop)/native, written atomically, so a second load is a dlopen. A run passes
numpy buffers by pointer: no copies in or out.

Needs emx-onnx-cgen and onnxscript (`pip install 'edgeprop[native]'`) and a C compiler.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgeprop.errors import BundleError, EdgepropError
from edgeprop.memory import EngineMemory

FORMATS = (".onnx",)  # compiled to C at load
# The libraries' code and each graph's static scratch (the liveness peak the planner computes;
# the generated code's planned arena is at most that), on top of the interpreter, numpy,
# edgeprop and OpenBLAS. Measured by bench/engines.py (x86-64, CPython 3.11, numpy 2.4,
# scipy-openblas32 0.3.34): digits MLP training peaks at 58 MiB against onnxruntime's 89 MiB
# with the same working set, so about 35 MB of runtime (onnx and emx-onnx-cgen are imported
# only when a graph is compiled, not when its cached library is loaded).
MEMORY = EngineMemory("native", 36_000_000, 0, 0, True,
                      "runtime measured on x86-64 (CPython 3.11, numpy 2.4, OpenBLAS 0.3.34); arena = liveness "
                      "peak of the generated C's static scratch, one per graph")
DTYPES = {"float32": "float", "float64": "double", "int64": "int64_t", "int32": "int32_t", "bool": "bool",
          "uint8": "uint8_t"}
# edgeprop's code generators: a change to one rebuilds every library
CODEGEN = ("targets/c99.py", "targets/cblas.py", "targets/fuse.py", "targets/native.py", "runtimes/native.py")
WRAPPER = """/* edgeprop's native engine: one graph, its scratch, and the two entry points ctypes calls. */
extern unsigned char edgeprop_scratch[];  /* graph.c declares it only where it includes string.h */
#include "graph.c"
unsigned char edgeprop_scratch[{scratch} + 64] __attribute__((aligned(64)));
__attribute__((visibility("default"))) void ep_run(void *const *io) {{ ep_graph_run(io); }}
__attribute__((visibility("default"))) void ep_threads(int n) {{ {threads} }}
"""


def cache_root() -> Path:
    return Path(os.environ.get("EDGEPROP_CACHE") or Path.home() / ".cache" / "edgeprop") / "native"


def find_compiler(cc: str | None = None) -> str:
    """`cc`, else $CC, else the first of cc, gcc, clang on PATH."""
    wanted = cc or os.environ.get("CC")
    for name in [wanted] if wanted else ["cc", "gcc", "clang"]:
        if shutil.which(name):
            return shutil.which(name)
    raise EdgepropError(f"the native engine needs a C compiler{f' ({wanted} not found)' if wanted else ''}: "
                        "install gcc (apt install gcc) or set CC")


def arch_flags() -> list[str]:
    """Code for this CPU: x86's -march=native, Arm's -mcpu=native (GCC's spelling on aarch64)."""
    return ["-march=native"] if platform.machine() in ("x86_64", "AMD64", "i686") else ["-mcpu=native"]


def graph_inputs(path: Path, spec) -> list[str]:
    """The manifest's inputs that the graph file takes (an exporter may drop one it never reads)."""
    import onnx
    names = {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
    unknown = names - {t.name for t in spec.inputs}
    if unknown:
        raise BundleError(f"{path}: graph inputs {sorted(unknown)} are not in manifest.json")
    return [t.name for t in spec.inputs if t.name in names]


class Graph:
    def __init__(self, lib: ctypes.CDLL, spec, info: dict):
        self.lib = lib
        # run(feeds, out=...) writes into the caller's arrays, next.K over K: where the
        # generated code writes next.K only after its last read of K (plan_arena's check)
        self.fills_outputs = info["in_place"]
        self.input_names = [t.name for t in spec.inputs]
        self.output_names = [t.name for t in spec.outputs]
        self.info = info  # what went into the library (the cache's lib.json)
        taken = set(info["inputs"])
        self._inputs = [(t.name, np.dtype(t.dtype), tuple(t.shape)) for t in spec.inputs if t.name in taken]
        self._outputs = [(t.name, np.dtype(t.dtype), tuple(t.shape)) for t in spec.outputs]
        self._io = (ctypes.c_void_p * (len(self._inputs) + len(self._outputs)))()
        self._fn = lib.ep_run
        self._fn.argtypes, self._fn.restype = [ctypes.c_void_p], None

    def _array(self, name: str, dtype, shape, value) -> np.ndarray:
        a = np.ascontiguousarray(value, dtype)
        if a.shape != shape and not (a.size == 1 and shape == ()):
            raise BundleError(f"graph input '{name}' has shape {list(a.shape)}, the graph takes {list(shape)}")
        return a

    def run(self, feeds: dict[str, np.ndarray], out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """`out`: arrays to write outputs into instead of new ones (`fills_outputs`); next.K
        may be the fed K itself, which the generated code writes over only after its last read
        of K (checked when the graph was compiled, as for the microcontroller driver)."""
        io, keep = self._io, []
        for i, (name, dtype, shape) in enumerate(self._inputs):
            a = feeds.get(name)
            if a is None:
                raise BundleError(f"graph input(s) {[n for n in self.input_names if n not in feeds]} were not fed")
            if not (type(a) is np.ndarray and a.dtype == dtype and a.shape == shape and a.flags.c_contiguous):
                a = self._array(name, dtype, shape, a)  # converted once; a fed array of the right kind is used as is
            io[i] = _address(a, keep)
        made = {}
        for j, (name, dtype, shape) in enumerate(self._outputs, len(self._inputs)):
            a = out.get(name) if out and self.fills_outputs else None
            if not (type(a) is np.ndarray and a.dtype == dtype and a.shape == shape and a.flags.c_contiguous
                    and a.flags.writeable):
                a = np.empty(shape, dtype)
            made[name] = a
            io[j] = _address(a, keep)
        self._fn(io)
        return made


def _address(a: np.ndarray, keep: list) -> int:
    """The array's data address: through the buffer protocol (5x faster than a.ctypes.data,
    which matters at a dozen arrays per call), keeping the export alive for the call."""
    if a.flags.writeable and a.nbytes:
        view = ctypes.c_char.from_buffer(a)
        keep.append(view)
        return ctypes.addressof(view)
    keep.append(a)
    return a.ctypes.data


class Engine:
    name = "native"
    suffix = ".onnx"
    trains_itself = False

    def __init__(self, threads: int = 1, provider: str = "cpu", cc: str | None = None, blas: bool = True):
        if provider != "cpu":
            raise EdgepropError(f"--provider {provider}: the native engine runs on the CPU only")
        from edgeprop.targets.cblas import INSTALL_HINT, find_blas
        self.threads, self.cc = threads, find_compiler(cc)
        self.blas = find_blas() if blas else None
        self.warning = None if self.blas or not blas else \
            f"native engine: no BLAS found, matrix products run as generated loops ({INSTALL_HINT})"
        if self.warning:
            print(self.warning, file=sys.stderr)
        self.flags = ["-O3", *arch_flags(), "-std=gnu11", "-ffp-contract=off",
                      "-fno-math-errno",  # sqrtf as one instruction; the same IEEE results
                      "-fPIC", "-shared", "-fvisibility=hidden", "-w"]
        version = subprocess.run([self.cc, "--version"], capture_output=True, text=True).stdout.splitlines()
        self._compiler_id = version[0] if version else self.cc

    def _key(self, path: Path) -> str:
        from importlib.metadata import PackageNotFoundError, version
        try:
            generator = version("emx-onnx-cgen")
        except PackageNotFoundError:
            generator = None
        root = Path(__file__).resolve().parents[1]
        h = hashlib.sha256(path.read_bytes())
        for part in (generator, self._compiler_id, *self.flags, self.blas and self.blas.name):
            h.update(str(part).encode() + b"\0")
        for name in CODEGEN:
            source = root / name
            h.update(source.read_bytes() if source.is_file() else name.encode())
        return h.hexdigest()[:32]

    def _build(self, path: Path, spec, lib: Path) -> dict:
        """graph file -> lib (and lib.json: what went in), atomically: a half-built library is never loaded."""
        try:
            import emx_onnx_cgen  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise EdgepropError(f"the native engine compiles graphs with emx-onnx-cgen: "
                                f"pip install 'edgeprop[native]' ({e})") from None
        from edgeprop.targets.native import generate
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent, prefix=".build-") as tmp:
            work = Path(tmp)
            text, graph, counts = generate(path, work / "raw.c", "ep_graph", path.stem, graph_inputs(path, spec),
                                           [t.name for t in spec.outputs], self.blas.prefix if self.blas else None,
                                           in_place=False)
            (work / "graph.c").write_text(text)
            threads = f"{self.blas.prefix}openblas_set_num_threads(n);" if self.blas else "(void)n;"
            (work / "lib.c").write_text(WRAPPER.format(scratch=graph.scratch, threads=threads))
            cmd = [self.cc, *self.flags, *(self.blas.cflags if self.blas else ()), "-o", str(work / "lib.so"),
                   str(work / "lib.c"), *(self.blas.ldflags if self.blas else ()), "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
            if proc.returncode != 0:
                raise EdgepropError(f"{path}: {Path(self.cc).name} could not build the native graph: "
                                    f"{proc.stderr.strip()[-1500:]}")
            info = {"graph": str(path), "inputs": graph.inputs, "in_place": graph.in_place, "scratch": graph.scratch,
                    "blas": self.blas.name if self.blas else None, **counts,
                    "compiler": self._compiler_id, "flags": self.flags,
                    "source": lib.with_suffix(".c").name}
            (work / "lib.json").write_text(json.dumps(info, indent=1) + "\n")
            os.replace(work / "graph.c", lib.with_suffix(".c"))  # for reading, and for profiling
            os.replace(work / "lib.json", lib.with_suffix(".json"))
            os.replace(work / "lib.so", lib)  # last: its presence says the build is whole
        return info

    def load(self, path: Path, spec=None) -> Graph:
        if spec is None:
            raise EdgepropError("the native engine needs the manifest's description of the graph (its names)")
        for t in (*spec.inputs, *spec.outputs):
            if t.dtype not in DTYPES:
                raise BundleError(f"{path}: graph tensor '{t.name}' is {t.dtype}, which the native engine "
                                  "does not pass")
        path = Path(path)
        lib = cache_root() / f"{path.stem}-{self._key(path)}.so"
        if lib.is_file() and lib.with_suffix(".json").is_file():
            info = json.loads(lib.with_suffix(".json").read_text())
        else:
            info = self._build(path, spec, lib)
        loaded = ctypes.CDLL(str(lib), mode=os.RTLD_LOCAL)
        loaded.ep_threads.argtypes = [ctypes.c_int]
        loaded.ep_threads(self.threads)
        return Graph(loaded, spec, info)
