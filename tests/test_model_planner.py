"""Planning models edgeprop did not export: read without their weights' bytes, constant
folding's weights, shape arithmetic ONNX's inference cannot follow, older opsets, and the
session build's model."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import edgeprop
from edgeprop.errors import EdgepropError
from edgeprop.exporters.model_memory import format_report, onnx_report
from edgeprop.exporters.onnx_skeleton import load_skeleton
from edgeprop.runtimes import memory_model

MiB = 1 << 20
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"  # the onnx package's opset-9 models


def _model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def big_matmul(rows: int) -> onnx.ModelProto:
    """y = x @ W with W (rows, 256) a real initializer, and a small shape constant kept."""
    w = numpy_helper.from_array(np.ones((rows, 256), np.float32), "W")
    shape = numpy_helper.from_array(np.array([-1, 256], np.int64), "shape")
    return _model([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", rows])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 256])], [w, shape])


def test_skeleton_keeps_shapes_and_small_values_but_not_the_weights(tmp_path):
    onnx.save(big_matmul(1024), tmp_path / "m.onnx")
    full, skeleton = onnx.load(tmp_path / "m.onnx"), load_skeleton(tmp_path / "m.onnx")
    w, shape = (next(i for i in skeleton.graph.initializer if i.name == n) for n in ("W", "shape"))
    assert list(w.dims) == [1024, 256] and not w.raw_data and w.data_type == TensorProto.FLOAT
    assert numpy_helper.to_array(shape).tolist() == [-1, 256]
    assert skeleton.ByteSize() < 2048 < full.ByteSize()
    assert skeleton.graph.node == full.graph.node
    (tmp_path / "bad.onnx").write_bytes(b"\x0a\xff\xff")
    with pytest.raises(ValueError):
        load_skeleton(tmp_path / "bad.onnx")


@pytest.mark.slow  # over 5 s alone
def test_profiler_holds_at_most_twice_the_largest_weight_plus_100_mib(tmp_path):
    # Four weights of 32 MiB: reading the whole model (128 MiB) beside onnx and numpy would
    # pass the bound of 2 * 32 + 100 MiB. Measured in a fresh process of its own.
    shapes = [(4096, 2048), (2048, 4096)] * 2
    ws = [numpy_helper.from_array(np.full(shape, i, np.float32), f"W{i}") for i, shape in enumerate(shapes)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"W{i}"], [f"h{i}" if i < 3 else "y"])
             for i in range(4)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4096])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4096])], ws)
    path = tmp_path / "big.onnx"
    onnx.save(model, path)
    del model, ws
    code = ("import sys\nfrom edgeprop import rss\nfrom edgeprop.exporters.model_memory import onnx_report\n"
            "r = onnx_report(sys.argv[1], 2)\nprint(r['weights'], rss.process_peak())")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    weights, peak = map(int, out.stdout.split())
    assert weights == 4 * 32 * MiB
    assert peak <= 2 * 32 * MiB + 100 * MiB, peak / MiB


def test_weights_a_node_makes_count_as_weights():
    """ConstantOfShape making a (512, 512) weight, as the onnx package's opset-9 models do:
    onnxruntime folds it at session build; it is 1 MiB of weights, not an activation."""
    dims = numpy_helper.from_array(np.array([512, 512], np.int64), "dims")
    model = _model([helper.make_node("ConstantOfShape", ["dims"], ["W"],
                                     value=numpy_helper.from_array(np.array([0.5], np.float32))),
                    helper.make_node("MatMul", ["x", "W"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512])], [dims])
    r = _report(model)
    assert r["weights"] == r["folded"] == 512 * 512 * 4
    assert r["peak"] == 512 * 4  # only y is made at run time
    assert r["backprop"]["gradients"] == 512 * 512 * 4
    unfolded = _report(model, optimization="disabled")
    assert unfolded["weights"] == 16 and unfolded["peak"] >= 512 * 512 * 4  # made at every run instead


def _report(model, **options):
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        onnx.save(model, Path(folder) / "m.onnx")
        return onnx_report(Path(folder) / "m.onnx", **options)


def test_shape_arithmetic_onnx_cannot_follow_is_evaluated():
    """A channel shuffle as torch's legacy exporter writes it: Shape -> Gather -> Div ->
    Concat -> Reshape. ONNX's data propagation stops at the Div; the planner computes it."""
    const = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
             (("one", 1), ("two", 2), ("axes", [0]), ("g", [2]), ("tail", [2, 2]))]
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "one"], ["c"], axis=0),
             helper.make_node("Div", ["c", "two"], ["half"]),
             helper.make_node("Unsqueeze", ["half", "axes"], ["half1"]),
             helper.make_node("Gather", ["s", "axes"], ["n"], axis=0),
             helper.make_node("Concat", ["n", "g", "half1", "tail"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Relu", ["t"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 2, 2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], const)
    plain = onnx.shape_inference.infer_shapes(model, data_prop=True)
    assert not any(v.name == "t" and v.type.tensor_type.shape.dim[1].HasField("dim_value")
                   for v in plain.graph.value_info)  # ONNX alone leaves it unknown
    r = _report(model, batch=3)
    assert r["inputs"] == 3 * 8 * 2 * 2 * 4
    assert r["peak"] == 2 * r["inputs"]  # the transposed copy and the Relu's output


@pytest.mark.skipif(not (LIGHT / "light_squeezenet.onnx").exists(), reason="onnx's test data not installed")
def test_an_older_opset_is_refused_with_the_way_out_and_converted_with_convert(tmp_path):
    path = LIGHT / "light_squeezenet.onnx"
    with pytest.raises(EdgepropError, match="opset 9.*--convert"):
        onnx_report(path)
    r = onnx_report(path, convert=True)
    assert r["converted"] and r["opset"] == 9 and r["weights"] > 4 * MiB  # its ConstantOfShape weights
    proc = edgeprop("profile", path, check=False, blocked=("torch",))
    assert proc.returncode == 2 and "--convert" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_session_build_model():
    ort = memory_model("onnxruntime")
    facts = {"weights": 100 * MiB, "largest": 10 * MiB, "folded": 0, "conv": 80 * MiB, "matrices": {"Gemm": 20 * MiB},
             "fused": 0, "nodes": 100}
    extended, full = ort.session_build(facts, "extended"), ort.session_build(facts, "all")
    packed = int(dict(ort.packed_copies)["Gemm"] * 20 * MiB)
    assert extended["loaded"] == 100 * MiB + 100 * ort.session_per_node + packed
    assert extended["peak"] == extended["loaded"] + 10 * MiB  # the largest weight read twice
    assert full["loaded"] > extended["loaded"] + 80 * MiB  # NCHWc's reordered copies of the conv weights
    folded = ort.session_build({**facts, "folded": 100 * MiB}, "extended")
    assert folded["peak"] - folded["loaded"] == int(ort.fold_transient * 100 * MiB)


def test_measure_prints_the_fresh_process_peak_beside_the_plan(tmp_path):
    onnx.save(big_matmul(512), tmp_path / "m.onnx")
    out = edgeprop("profile", tmp_path / "m.onnx", "--batch-size", 4, "--measure", blocked=("torch",)).stdout
    total = next(line for line in out.splitlines() if line.startswith("total"))
    measured = out.splitlines()[out.splitlines().index(total) + 1]
    assert "measured" in measured and "fresh process" in measured and "session build" in out
    ratio = float(measured.split("ratio ")[1].split()[0])
    assert 0.8 <= ratio <= 1.25, out  # a 0.5 MiB model: the runtime is nearly all of it


def mlp_chain(hidden: tuple[int, ...], dim: int = 256) -> onnx.ModelProto:
    """Residual MLP blocks x + W2·relu(W1·x) at a symbolic batch, block l `hidden[l]` wide."""
    nodes, weights, x = [], [], "x"
    for i, h in enumerate(hidden):
        weights += [numpy_helper.from_array(np.full(shape, 0.01, np.float32), f"w{i}{j}")
                    for j, shape in enumerate([(dim, h), (h, dim)])]
        nodes += [helper.make_node("MatMul", [x, f"w{i}0"], [f"h{i}"]), helper.make_node("Relu", [f"h{i}"], [f"r{i}"]),
                  helper.make_node("MatMul", [f"r{i}", f"w{i}1"], [f"o{i}"]),
                  helper.make_node("Add", [x, f"o{i}"], [f"y{i}"])]
        x = f"y{i}"
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
                  [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", dim])], weights)


# onnxruntime's arena, measured: the default arena's growth over three runs (the first run's
# regions and the memory pattern's block); then, in a same-as-requested arena (each request a
# region of its own), the second run's growth: the block alone.
_ARENA = """
import sys, numpy as np, onnxruntime as ort
from edgeprop import rss
def session(own_regions):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if own_regions:
        opts.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
x = np.ones((int(sys.argv[2]), 256), np.float32)
default = session(False)
before = rss.current()
for _ in range(3):
    y = default.run(None, {"x": x})[0]
arena = rss.current() - before - y.nbytes
info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))  # kSameAsRequested
own = session(True)
own.run(None, {"x": x})
first = rss.current()
own.run(None, {"x": x})
print(arena, rss.current() - first)
"""


def test_arena_and_memory_pattern_are_onnxruntimes(tmp_path):
    # Buffers shared in place and between equal symbolic shapes: the block is not the live peak
    # (liveness says 25 MiB, onnxruntime lays out 16).
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_chain((3072, 512, 3072)), path)
    planned = onnx_report(path, 1024)
    arena, block = map(int, subprocess.run([sys.executable, "-c", _ARENA, str(path), "1024"], capture_output=True,
                                           text=True, check=True).stdout.split())
    assert abs(block - planned["pattern"]) <= 64 * 1024, (block, planned["pattern"])
    assert 0.85 <= arena / planned["arena"] <= 1.15, (arena, planned["arena"])


def test_a_device_gets_the_runtime_figure_of_its_arch(tmp_path):
    onnx.save(big_matmul(512), tmp_path / "m.onnx")
    here = onnx_report(tmp_path / "m.onnx", 4)
    pi = onnx_report(tmp_path / "m.onnx", 4, arch="aarch64")
    assert pi["runtime"] != here["runtime"] and "aarch64" in pi["runtime_source"]
    assert pi["total"] - here["total"] == pi["runtime"] - here["runtime"]
    assert "runtime for aarch64" in format_report(pi, None)
