"""Device-side engines, one module each. numpy and the engine itself; never torch.

An engine module `runtimes/<name>.py` (name with "_" for "-") declares

    FORMATS   the graph formats it runs (".onnx", ".tflite")
    MEMORY    its memory model (edgeprop.memory.EngineMemory) for the planner
    Engine    the class that loads and runs graphs (edgeprop.engine.Engine); a module
              without one (c99) runs elsewhere and is only planned for

and is found by its file name (tinygrad's habit): adding an engine adds one file. Modules
import their engine package when an Engine is made, so the planner reads MEMORY anywhere.

    engine = get_engine("onnxruntime", threads=1)
    graph = bundle.load_graph(engine, "block_step")   # graphs/block_step<engine.suffix>
"""
from __future__ import annotations

import importlib
import pkgutil

from edgeprop.engine import Engine
from edgeprop.errors import EdgepropError
from edgeprop.memory import EngineMemory


def engine_names() -> list[str]:
    """Every engine this edgeprop knows (sorted; found by file name, nothing imported)."""
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(__path__))


def engine_module(name: str):
    if name not in engine_names():
        raise EdgepropError(f"unknown engine '{name}'; available: {', '.join(runnable())}")
    return importlib.import_module(f"{__name__}.{name.replace('-', '_')}")


def runnable() -> list[str]:
    """The engines that run graphs in this process (those with an Engine class)."""
    return [n for n in engine_names() if hasattr(importlib.import_module(f"{__name__}.{n.replace('-', '_')}"),
                                                    "Engine")]


def memory_model(name: str, arch: str | None = None) -> EngineMemory:
    """What engine `name` holds while training, for the memory planner; with the runtime
    figure of CPU architecture `arch` (a device profile's) where one was measured."""
    if name not in engine_names():
        raise EdgepropError(f"no memory model for engine '{name}' (known: {', '.join(engine_names())})")
    return engine_module(name).MEMORY.on(arch)


def get_engine(name: str = "onnxruntime", **options) -> Engine:
    module = engine_module(name)
    if not hasattr(module, "Engine"):
        raise EdgepropError(f"unknown engine '{name}'; available: {', '.join(runnable())}")
    try:
        return module.Engine(**options)
    except ImportError as e:
        raise EdgepropError(f"engine '{name}' is not installed here ({e})") from None
