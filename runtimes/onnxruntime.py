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
# Measured on x86-64 with onnxruntime 1.32, numpy 2.4, CPython 3.11 (model_memory.measure_onnx's
# baseline: interpreter 11 MiB, numpy 20 MiB, onnxruntime 31 MiB, edgeprop's engine module
# 6 MiB, the environment its first session makes 6 MiB); each loaded graph about 2.5 KB per
# node. The arena is onnxruntime's BFCArena with its defaults (initial chunk 1 MiB,
# kNextPowerOfTwo growth); the runs touch about 85% of its regions. The session build, fitted
# on bench/planner.py's 65 models: it keeps about 16 KB per node beside the weights, holds the
# weights once, the largest twice while reading it, constant-folded weights 1.45 times; MLAS's
# packed copy of a constant Gemm matrix stays beside the original, of a MatMul matrix in some
# runs and not in others as the allocator's state goes (ViT-B measured 0 to 0.6 copies: the
# plan takes 0.3); at LAYOUT/ALL on x86 the conv weights 2.2 more times (the NCHWc reorder and
# its packing); a folded conv weight fused with the BatchNormalization after it stays (0.7).
# On aarch64 (bench/runtime_arch.py: the guest's own pages under qemu-user, onnxruntime 1.20.1 as
# deploy ships for qemu, numpy 2.4.6, CPython 3.11.2) the same phases hold 50.8 MiB against
# 61.1 MiB measured on x86-64 in the same run: the aarch64 figure is x86-64's less that 10.3 MiB.
MEMORY = EngineMemory("onnxruntime", 77_000_000, 2_500, 1 << 20, True,
                      "runtime measured on x86-64 (onnxruntime 1.32, CPython 3.11)",
                      arch_runtimes=(("aarch64", 66_200_000, "runtime for aarch64: x86-64's less the 10.3 MiB the "
                                      "same phases measured smaller on emulated aarch64 (onnxruntime 1.20.1)"),),
                      conv_copies=(("layout", 2.2), ("all", 2.2)), packed_copies=(("Gemm", 1.0), ("MatMul", 0.3)),
                      fold_transient=0.45, fused_copies=0.7, session_per_node=16_000, arena_touched=0.85)
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
# Graph optimisation levels. "layout" and "all" add the NCHWc transform on x86: conv activations
# blocked and padded to the CPU's vector width (16 floats with AVX-512, 8 with AVX2), which
# bench/ort_levels.py measured at 1.1-2.8x the memory of "extended" for no speed gain on the
# step graphs; "extended" (still fusing Conv+activation) is the default. See docs/engines.md.
LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}  # names in ort.GraphOptimizationLevel
DEFAULT_LEVEL = "extended"


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


ONNX_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(uint8)": "uint8"}


def check_against_manifest(session, spec, path: Path) -> None:  # session: onnxruntime.InferenceSession
    """The graph file must be the graph the manifest describes: a different (valid, re-hashed)
    graph would otherwise fail only at its first run, with the engine's own error."""
    def same(value, t) -> bool:
        static = all(isinstance(d, int) for d in value.shape)
        return ONNX_TYPES.get(value.type) == t.dtype and (not static or tuple(value.shape) == t.shape)

    declared = {t.name: t for t in spec.inputs}
    for value in session.get_inputs():  # the exporter may drop an input the graph never reads
        t = declared.get(value.name)
        if t is None or not same(value, t):
            raise BundleError(f"{path}: graph input '{value.name}' ({value.type} {value.shape}) is not as "
                              f"manifest.json describes it ({'absent' if t is None else f'{t.dtype} {list(t.shape)}'})")
    made = {o.name: o for o in session.get_outputs()}
    for t in spec.outputs:
        if t.name not in made or not same(made[t.name], t):
            raise BundleError(f"{path}: graph output '{t.name}' is not as manifest.json describes it "
                              f"({t.dtype} {list(t.shape)})")


class Engine:
    name = "onnxruntime"
    suffix = ".onnx"
    trains_itself = False

    def __init__(self, threads: int = 1, provider: str = "cpu", optimization: str | None = None):
        ort = _ort()
        optimization = optimization or DEFAULT_LEVEL
        if optimization not in LEVELS:
            raise EdgepropError(f"--ort-optimization {optimization}: choose one of {', '.join(LEVELS)}")
        if provider not in PROVIDERS:
            raise EdgepropError(f"--provider {provider}: choose one of {', '.join(PROVIDERS)}")
        wanted = PROVIDERS[provider][0]
        if wanted not in ort.get_available_providers():
            raise EdgepropError(f"--provider {provider}: this onnxruntime ({ort.__version__}) has no {wanted} "
                                f"(it has {', '.join(ort.get_available_providers())}); install onnxruntime-gpu")
        self.threads, self.provider, self.optimization = threads, provider, optimization

    def load(self, path: Path, spec=None) -> Graph:  # the graph file names its inputs itself
        ort = _ort()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[self.optimization])
        try:
            session = ort.InferenceSession(str(path), opts, providers=PROVIDERS[self.provider])
        except Exception as e:  # onnxruntime raises its own exception types for a bad model
            raise BundleError(f"{path}: onnxruntime cannot load this graph ({e})") from None
        if spec is not None:
            check_against_manifest(session, spec, path)
        if session.get_providers()[0] != PROVIDERS[self.provider][0]:
            raise EdgepropError(f"--provider {self.provider}: onnxruntime could not start "
                                f"{PROVIDERS[self.provider][0]} (no GPU, or its CUDA libraries are missing)")
        return Graph(session)
