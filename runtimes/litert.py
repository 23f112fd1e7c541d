"""LiteRT (formerly TensorFlow Lite): `ai_edge_litert`, or `tflite_runtime` where that is what
the device has (a Raspberry Pi's older images; tflite-runtime 2.14 needs numpy < 2).

The bundle's `.tflite` graphs hold builtin ops only (no Flex delegate). Their signatures
name inputs args_0, args_1, ... and outputs output_0, output_1, ... in the order of the
step function; the manifest's graph entry gives edgeprop's names in that same order.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeprop.errors import BundleError, EdgepropError

try:
    from ai_edge_litert.interpreter import Interpreter
    PACKAGE = "ai_edge_litert"
except ImportError:
    from tflite_runtime.interpreter import Interpreter
    PACKAGE = "tflite_runtime"


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

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BundleError(f"graph input(s) {missing} were not fed")
        out = self.runner(**{f"args_{i}": np.asarray(feeds[n]) for i, n in enumerate(self.input_names)})
        return {n: out[f"output_{i}"] for i, n in enumerate(self.output_names)}


class Engine:
    name = "litert"
    suffix = ".tflite"

    def __init__(self, threads: int = 1, provider: str = "cpu"):
        if provider != "cpu":
            raise EdgepropError(f"--provider {provider}: the litert engine runs on the CPU only")
        self.threads = threads

    def load(self, path: Path, spec=None) -> Graph:
        if spec is None:
            raise EdgepropError("the litert engine needs the manifest's description of the graph (its names)")
        try:
            interpreter = Interpreter(model_path=str(path), num_threads=self.threads)
        except (ValueError, RuntimeError) as e:
            raise BundleError(f"{path}: {PACKAGE} cannot load this graph ({e})") from None
        return Graph(interpreter, spec)
