"""The c99 engine: the graphs compiled to C (emx-onnx-cgen) and run by the firmware that
`edgeprop deploy --target c99` writes (edgeprop.targets.c99). It runs on the microcontroller,
not in this process, so this module only declares what the memory planner needs.
"""
from __future__ import annotations

from edgeprop.memory import EngineMemory

FORMATS = (".onnx",)  # compiled to C at deploy time
MEMORY = EngineMemory("c99", 0, 0, 0, False, "arena = liveness peak of the generated C's static arena")
