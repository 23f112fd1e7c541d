"""What the core asks of an engine. The engines themselves live in edgeprop.runtimes (one
module each) and are handed to the trainer and the evaluator by whoever runs them (the CLI):
the core never imports one.

    graph = bundle.load_graph(engine, "block_step")   # the file in engine.suffix's format
    outputs = graph.run({"x": x, "z": z, ...})        # {output name: array}

An engine that trains by itself (`trains_itself`, ort-training) owns each unit's weights and
optimizer state: the trainer asks it for a `TrainingUnit` per unit and steps that instead of
running the unit's step graph.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class LoadedGraph(Protocol):
    input_names: list[str]
    output_names: list[str]
    # Optional, `fills_outputs = True`: run(feeds, out={name: array}) writes those outputs
    # into the given arrays, next.K possibly over the fed K itself (the native engine).

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class TrainingUnit(Protocol):
    """One unit held by an engine that trains by itself."""

    def step(self, feeds: dict[str, np.ndarray], lr: float) -> dict[str, np.ndarray]: ...

    def params(self) -> np.ndarray: ...

    def get_state(self) -> tuple[dict[str, np.ndarray], int]: ...

    def set_state(self, state: dict[str, np.ndarray], steps: int) -> None: ...


class Engine(Protocol):
    name: str
    suffix: str            # the graph file format it loads: ".onnx", ".tflite"
    trains_itself: bool    # True: it performs the weight update itself (see load_unit)

    def load(self, path: Path, spec=None) -> LoadedGraph: ...  # spec: the manifest's bundle.Graph

    def load_unit(self, bundle, unit) -> TrainingUnit: ...      # only where trains_itself
