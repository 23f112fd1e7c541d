"""TensorFlow Lite Micro (the `tflite-micro` package): the bundle's `.tflite` graphs on the
interpreter and reference kernels a microcontroller runs, here on the host, with the exact
tensor arena each graph needs.

TFLM plans one static arena per graph: every tensor the graph does not hold as a constant
(its inputs and outputs too) and TFLM's own bookkeeping. `arena_bytes` finds the smallest
arena with which TFLM allocates the graph, and the engine runs each graph in exactly that
arena (or in the `arena_size` it is given), so every step trained here proves the figure.
The export stores the same figure in the manifest (memory fact "tflm_arena" of each step
graph) for the memory planner. Measured on a 64-bit host: TFLM's bookkeeping holds pointers, so on a 32-bit
Cortex-M the same graph needs the same tensor bytes and somewhat less bookkeeping; the
figure is an upper bound there.

Inputs and outputs are in the order of the .tflite signature (args_0, ..., output_0, ...),
which is the manifest's order, as for the litert engine.
"""
from __future__ import annotations

import functools
import os
import re
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgeprop.errors import BundleError, EdgepropError
from edgeprop.memory import EngineMemory

FORMATS = (".tflite",)
# Static arenas; code and graphs live in flash, no interpreter. A bundle exported with
# --tflite where tflite-micro is installed carries TFLM's exact arena per graph (memory fact
# "tflm_arena"); without it, the liveness peak is the estimate.
MEMORY = EngineMemory(
    "tflm", 0, 0, 0, False, "arena = liveness peak (an estimate: export with --tflite, tflite-micro installed, "
    "for TFLM's exact arenas)", exact_arena="tflm_arena",
    exact_note="TFLite Micro's exact arena per step graph, measured at export on a 64-bit host (a 32-bit "
               "MCU's bookkeeping is a little smaller); it holds the stepping unit's state and batch")


def _tflm():
    """(tflite_micro's runtime, its flatbuffer schema), imported when first needed: the
    planner reads MEMORY on machines without tflite-micro (its wheels are x86-64 Linux only)."""
    from tflite_micro import runtime
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema
    return runtime, schema


def __getattr__(name):  # tflm.runtime, tflm.schema: tflite-micro's modules, imported on first use
    if name in ("runtime", "schema"):
        return _tflm()[("runtime", "schema").index(name)]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


RECORDED = re.compile(r"Arena allocation total (\d+) bytes")


def _quietly(fn):
    """(fn(), what TFLM printed). TFLM reports through C stdio, straight to the terminal:
    hold it, so that an error can quote it and a success prints nothing."""
    with tempfile.TemporaryFile("w+") as log:
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            result = fn()
        except (RuntimeError, ValueError, IndexError, struct.error) as e:
            result = e
        finally:
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
        log.seek(0)
        return result, log.read()


def _interpreter(model: bytes, arena: int):
    """(a TFLM interpreter with `arena` bytes, or the exception, and what TFLM printed)."""
    runtime, _ = _tflm()
    return _quietly(lambda: runtime.Interpreter.from_bytes(model, arena_size=arena))


def _problem(text: str, error: Exception) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(dict.fromkeys(lines[:4])) or str(error)  # TFLM repeats itself per tensor


def _no_reuse_bound(model: bytes) -> int:
    """More arena than the graph can need: every non-constant tensor in its own buffer at 8
    bytes an element, and ample bookkeeping per tensor and operator. (The graph's weights
    are inputs, not constants, so the file's size says nothing about its arena.)"""
    _, schema = _tflm()
    m = schema.Model.GetRootAsModel(model, 0)
    total = 1 << 16
    for i in range(m.SubgraphsLength()):
        graph = m.Subgraphs(i)
        total += 256 * graph.OperatorsLength()
        for j in range(graph.TensorsLength()):
            tensor = graph.Tensors(j)
            buffer = m.Buffers(tensor.Buffer())
            if buffer.DataLength() == 0 and buffer.Offset() <= 1:  # not stored in the file
                shape = tensor.ShapeAsNumpy()  # 0, not an array, for a scalar
                total += 256 + 8 * (int(np.prod(np.abs(shape))) if isinstance(shape, np.ndarray) else 1)
    return total


def arena_bytes(model: bytes, where: str = "graph") -> int:
    """The smallest tensor arena (bytes) with which TFLM allocates this .tflite graph."""
    if model[4:8] != b"TFL3":
        raise BundleError(f"{where}: not a .tflite flatbuffer (no TFL3 identifier)")
    try:
        generous = _no_reuse_bound(model)
    except (struct.error, IndexError, ValueError) as e:
        raise BundleError(f"{where}: not a readable .tflite flatbuffer ({e})") from None
    # Too small an arena can crash TFLM (some kernels do not check a failed persistent
    # allocation), so the first load has more than enough, and the search stays near what it used.
    interpreter, text = _interpreter(model, generous)
    if isinstance(interpreter, Exception):
        raise BundleError(f"{where}: TFLite Micro cannot load this graph ({_problem(text, interpreter)})")
    _, text = _quietly(interpreter.print_allocations)
    recorded = RECORDED.search(text)
    if not recorded:
        raise EdgepropError(f"{where}: tflite-micro did not report its arena (is this a TFLM build without "
                            f"the recording allocator?): {text[:200]!r}")
    recorded = int(recorded.group(1))

    def fits(arena: int) -> bool:
        return not isinstance(_interpreter(model, arena)[0], Exception)

    # What TFLM records is what the final plan holds; planning itself borrows the free arena
    # as scratch (a few bytes per tensor), so the minimum can be a little above it, or (by
    # the end's alignment) a few bytes below.
    lo, step = recorded - 64, 64
    while fits(lo):
        lo -= step
    hi = recorded
    while not fits(hi):
        lo, hi, step = hi, min(hi + step, generous), step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def _exactly(details, count: int):
    """[details(0), ..., details(count - 1)] if the graph has exactly `count` of them, else None."""
    found = [details(i) for i in range(count)]
    try:
        details(count)
    except IndexError:
        return found
    return None


class Graph:
    def __init__(self, path: Path, spec, arena_size: int | None):
        model = path.read_bytes()
        self.arena_bytes = arena_bytes(model, str(path))
        if arena_size is not None and arena_size < self.arena_bytes:
            raise BundleError(f"{path}: TFLite Micro needs a tensor arena of {self.arena_bytes} bytes for this "
                              f"graph; the engine was given {arena_size}")
        self.arena_size = arena_size or self.arena_bytes
        interpreter, text = _interpreter(model, self.arena_size)
        if isinstance(interpreter, Exception):
            raise BundleError(f"{path}: TFLite Micro cannot load this graph ({_problem(text, interpreter)})")
        self.interpreter, self.path = interpreter, path
        self.input_names = [t.name for t in spec.inputs]
        self.output_names = [t.name for t in spec.outputs]
        self.inputs = spec.inputs
        for kind, tensors in (("input", spec.inputs), ("output", spec.outputs)):
            details = interpreter.get_input_details if kind == "input" else interpreter.get_output_details
            found, _ = _quietly(functools.partial(_exactly, details, len(tensors)))
            if found is None or isinstance(found, Exception):
                raise BundleError(f"{path}: the .tflite graph's {kind}s are not the {len(tensors)} the manifest lists")
            for t, d in zip(tensors, found):
                shape, dtype = [int(s) for s in d["shape"]], np.dtype(d["dtype"]).name
                if shape != list(t.shape) or dtype != t.dtype:
                    raise BundleError(f"{path}: {kind} '{t.name}' is {dtype}{shape} in the .tflite graph, the "
                                      f"manifest says {t.dtype}{list(t.shape)}")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BundleError(f"graph input(s) {missing} were not fed")
        for i, t in enumerate(self.inputs):
            # TFLM copies each input into its arena; it takes exactly the declared dtype and shape.
            self.interpreter.set_input(np.ascontiguousarray(feeds[t.name], dtype=t.dtype).reshape(t.shape), i)
        try:  # not captured as loading is: that costs 80 us, a fifth of a block step
            self.interpreter.invoke()
        except RuntimeError as e:
            raise EdgepropError(f"{self.path}: TFLite Micro failed to run the graph ({e}; its own message "
                                f"is above)") from None
        # get_output returns a copy, so the next invoke cannot overwrite what the trainer keeps.
        return {n: self.interpreter.get_output(i) for i, n in enumerate(self.output_names)}


class Engine:
    name = "tflm"
    suffix = ".tflite"
    trains_itself = False

    def __init__(self, threads: int = 1, provider: str = "cpu", arena_size: int | None = None):
        """arena_size: run every graph in an arena of this many bytes, as a microcontroller
        build would (an error when a graph needs more); default: each graph's exact arena."""
        _tflm()  # not installed: an ImportError now, not at the first graph
        if provider != "cpu":
            raise EdgepropError(f"--provider {provider}: the tflm engine runs TFLM's reference kernels on the CPU")
        self.threads = threads  # TFLM is single-threaded; accepted so that --threads works for every engine
        self.arena_size = arena_size

    def load(self, path: Path, spec=None) -> Graph:
        if spec is None:
            raise EdgepropError("the tflm engine needs the manifest's description of the graph (its names)")
        return Graph(Path(path), spec, self.arena_size)
