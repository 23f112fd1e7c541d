"""Device-side engines behind one small interface. numpy and the engine itself; never torch.

An engine loads a graph file and runs it on named numpy arrays:

    engine = get_engine("onnxruntime", threads=1)
    graph = load_graph(engine, bundle, "block_step")   # graphs/block_step<engine.suffix>
    outputs = graph.run({"x": x, "z": z, ...})        # {output name: array}

Engines are found by file name: `runtimes/<name>.py` defines `Engine` (tinygrad's habit).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

import numpy as np

from edgeprop.errors import EdgepropError

ENGINES = ("onnxruntime", "litert", "tflm", "ort-training")


class LoadedGraph(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Engine(Protocol):
    name: str
    suffix: str  # graph file suffix this engine loads

    def load(self, path: Path, spec=None) -> LoadedGraph: ...  # spec: the manifest's bundle.Graph


def get_engine(name: str = "onnxruntime", **options) -> Engine:
    if name not in ENGINES:
        raise EdgepropError(f"unknown engine '{name}'; available: {', '.join(ENGINES)}")
    try:
        module = importlib.import_module(f"edgeprop.runtimes.{name.replace('-', '_')}")
    except ImportError as e:
        raise EdgepropError(f"engine '{name}' is not installed here ({e})") from None
    return module.Engine(**options)


def load_graph(engine: Engine, bundle, key: str) -> LoadedGraph:
    """A bundle's graph `key` in the engine's format, described by the manifest."""
    return engine.load(bundle.graph_path(key, engine.suffix), bundle.graphs[key])
