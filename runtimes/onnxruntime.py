"""The default engine: stock onnxruntime (the inference build; aarch64 wheels exist)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeprop.errors import BundleError


class Graph:
    def __init__(self, session: ort.InferenceSession):
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

    def __init__(self, threads: int = 1):
        self.threads = threads

    def load(self, path: Path) -> Graph:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for a bad model
            raise BundleError(f"{path}: onnxruntime cannot load this graph ({e})") from None
        return Graph(session)
