"""LiteRT (formerly TensorFlow Lite): `ai_edge_litert`, or `tflite_runtime` where that is what
the device has (a Raspberry Pi's older images; tflite-runtime 2.14 needs numpy < 2).

The bundle's `.tflite` graphs hold builtin ops only (no Flex delegate). Their signatures
name inputs args_0, args_1, ... and outputs output_0, output_1, ... in the order of the
step function; the manifest's graph entry gives edgeprop's names in that same order.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from edgeprop.errors import BundleError, EdgepropError
from edgeprop.memory import EngineMemory

FORMATS = (".tflite",)
# TFLite plans one static arena per interpreter when it allocates tensors. Measured on
# x86-64 with ai-edge-litert 2.3, numpy 2.4, CPython 3.11: interpreter and numpy 26 MiB,
# edgeprop 7 MiB, ai_edge_litert 10 MiB. The XNNPACK delegate (on by default) runs the nodes
# it takes in a workspace of its own, beside TFLite's arena: measured per interpreter on the
# digits bundle's graphs at batch 128 (each the second of its kind in a process, inputs left
# out), XNNPACK on against off added 1.30 MiB to the block step (live peak 1.38 MiB), 0.25
# to the block's inference graph (0.26) and 0.09 to the head step (2.6 KiB): the live peak
# again, and about 90 KB a graph.
MEMORY = EngineMemory("litert", 45_000_000, 2_500, 0, True,
                      "runtime measured on x86-64 (ai-edge-litert 2.3, CPython 3.11); arena = liveness "
                      "peak, and XNNPACK's workspace as much again",
                      delegate_workspace=1.0, delegate_per_graph=90_000)


@functools.cache
def interpreter():
    """(the Interpreter class, the package it came from), imported when first needed: the
    planner reads MEMORY on machines without either package."""
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter, "ai_edge_litert"
    except ImportError:
        from tflite_runtime.interpreter import Interpreter
        return Interpreter, "tflite_runtime"


def __getattr__(name):  # PACKAGE: which package runs the graphs here
    if name == "PACKAGE":
        return interpreter()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Graph:
    def __init__(self, interpreter, spec):
        self.runner = interpreter.get_signature_runner()
        self.input_names = [t.name for t in spec.inputs]
        self.output_names = [t.name for t in spec.outputs]
        sig = interpreter.get_signature_list()
        (_, names), = sig.items()
        if len(names["inputs"]) != len(self.input_names) or len(names["outputs"]) != len(self.output_names):
            raise BundleError(f"{spec.files['.tflite']}: the .tflite graph has {len(names['inputs'])} inputs and "
                              f"{len(names['outputs'])} outputs, the manifest lists {len(self.input_names)} "
                              f"and {len(self.output_names)}")
        self._check_shapes(spec)

    def _check_shapes(self, spec) -> None:
        """Each argument's shape against the manifest's tensor in the same place: a different
        graph with a recomputed checksum is refused here, not at its first run."""
        details = getattr(self.runner, "get_input_details", None)  # older tflite-runtime: counts only
        if details is None:
            return
        for kind, tensors, found in (("input", spec.inputs, details()),
                                     ("output", spec.outputs, self.runner.get_output_details())):
            for i, t in enumerate(tensors):
                d = found.get(f"{'args' if kind == 'input' else 'output'}_{i}")
                if d is None or tuple(int(n) for n in d["shape"]) != t.shape:
                    got = "absent" if d is None else [int(n) for n in d["shape"]]
                    raise BundleError(f"{spec.files['.tflite']}: graph {kind} {i} ('{t.name}') has shape {got}, "
                                      f"manifest.json says {list(t.shape)}")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BundleError(f"graph input(s) {missing} were not fed")
        out = self.runner(**{f"args_{i}": np.asarray(feeds[n]) for i, n in enumerate(self.input_names)})
        return {n: out[f"output_{i}"] for i, n in enumerate(self.output_names)}


class Engine:
    name = "litert"
    suffix = ".tflite"
    trains_itself = False

    def __init__(self, threads: int = 1, provider: str = "cpu"):
        interpreter()  # not installed: an ImportError now, not at the first graph
        if provider != "cpu":
            raise EdgepropError(f"--provider {provider}: the litert engine runs on the CPU only")
        self.threads = threads

    def load(self, path: Path, spec=None) -> Graph:
        if spec is None:
            raise EdgepropError("the litert engine needs the manifest's description of the graph (its names)")
        Interpreter, package = interpreter()
        try:
            loaded = Interpreter(model_path=str(path), num_threads=self.threads)
        except (ValueError, RuntimeError) as e:
            raise BundleError(f"{path}: {package} cannot load this graph ({e})") from None
        return Graph(loaded, spec)
