"""The default engine: stock onnxruntime (the inference build; aarch64 wheels exist).

`provider="cuda"` runs the graphs on a GPU (a Jetson's, with onnxruntime-gpu installed);
onnxruntime would silently fall back to the CPU when CUDA cannot start, so that is an error.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeprop.errors import BundleError, EdgepropError
from edgeprop.memory import EngineMemory

FORMATS = (".onnx",)
# Measured on x86-64 with onnxruntime 1.32, numpy 2.4, CPython 3.11 (bench/memory.py
# prints the parts): interpreter 11 MiB, numpy 15 MiB, edgeprop's modules 7 MiB,
# onnxruntime 19 MiB, its environment (made with the first session) 10 MiB; each loaded
# graph about 2.5 KB per node. The arena is onnxruntime's BFCArena with its defaults
# (initial chunk 1 MiB, kNextPowerOfTwo growth).
MEMORY = EngineMemory("onnxruntime", 66_000_000, 2_500, 1 << 20, True,
                      "runtime measured on x86-64 (onnxruntime 1.32, CPython 3.11)")
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def _ort():
    """onnxruntime, imported when an engine is made: the planner reads MEMORY without it."""
    import onnxruntime
    return onnxruntime


class Graph:
    def __init__(self, session):  # an onnxruntime.InferenceSession
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BundleError(f"graph input(s) {missing} were not fed")
        # Feed exactly the graph's inputs: an exporter may drop an input the graph never reads.
        outputs = self.session.run(self.output_names, {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, outputs))


class Engine:
    name = "onnxruntime"
    suffix = ".onnx"
    trains_itself = False

    def __init__(self, threads: int = 1, provider: str = "cpu"):
        ort = _ort()
        if provider not in PROVIDERS:
            raise EdgepropError(f"--provider {provider}: choose one of {', '.join(PROVIDERS)}")
        wanted = PROVIDERS[provider][0]
        if wanted not in ort.get_available_providers():
            raise EdgepropError(f"--provider {provider}: this onnxruntime ({ort.__version__}) has no {wanted} "
                                f"(it has {', '.join(ort.get_available_providers())}); install onnxruntime-gpu")
        self.threads, self.provider = threads, provider

    def load(self, path: Path, spec=None) -> Graph:  # the graph file names its inputs itself
        ort = _ort()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(path), opts, providers=PROVIDERS[self.provider])
        except Exception as e:  # onnxruntime raises its own exception types for a bad model
            raise BundleError(f"{path}: onnxruntime cannot load this graph ({e})") from None
        if session.get_providers()[0] != PROVIDERS[self.provider][0]:
            raise EdgepropError(f"--provider {self.provider}: onnxruntime could not start "
                                f"{PROVIDERS[self.provider][0]} (no GPU, or its CUDA libraries are missing)")
        return Graph(session)
