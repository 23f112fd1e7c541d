"""The tflm engine: TensorFlow Lite Micro's interpreter (reference kernels, one static arena
per graph) runs the bundle's .tflite graphs on the host, and its exact arena is what the
memory planner uses for a microcontroller."""
import json
import shutil

import flatbuffers
import numpy as np
import pytest

from conftest import edgeprop
from edgeprop import bundle as bundles
from edgeprop import memory
from edgeprop.errors import BundleError
from edgeprop.runtimes import get_engine, memory_model

pytest.importorskip("tflite_micro")  # tflite-micro has wheels for x86-64 Linux only
from tflite_micro import runtime  # noqa: E402

from edgeprop.runtimes import tflm  # noqa: E402

pytestmark = pytest.mark.slow  # the every-engine bundle (.tflite conversion, TFLM arenas)

# The device side of the tflm engine needs numpy and tflite-micro: no torch, onnx, or other engine.
ABSENT = ("torch", "onnx", "onnxruntime", "ai_edge_litert")


def test_tflm_engine_trains_digits_end_to_end(engines_bundle, tmp_path):
    bundle = shutil.copytree(engines_bundle, tmp_path / "digits")
    edgeprop("train", bundle, "--engine", "tflm", "--data", "digits", "--epochs", "10", "--quiet", blocked=ABSENT)
    report = json.loads(edgeprop("eval", bundle, "--engine", "tflm", "--data", "digits", "--json",
                                 blocked=ABSENT).stdout)
    assert report["accuracy"] >= 0.92, report  # measured 0.956 (2 blocks of width 48, 10 epochs)


def _feeds(b, unit, rng) -> dict:
    """Feeds for one step from a mid-training optimizer state (from a zero state, AdamW turns
    float noise in a near-zero gradient into a full ±lr step, differently on each engine)."""
    init, _ = b.initial_state()
    feeds = {}
    for t in b.graphs[unit.step_graph].inputs:
        if t.name == "param":
            feeds[t.name] = init[unit.name]["param"]
        elif t.name.startswith("opt."):
            noise = rng.standard_normal(t.shape).astype(np.float32) * 1e-3
            feeds[t.name] = np.abs(noise) if t.name == "opt.v" else noise
        elif t.name == "target":
            feeds[t.name] = np.eye(b.num_classes, dtype=np.float32)[rng.integers(0, b.num_classes, t.shape[0])]
        elif t.name == "mask":
            feeds[t.name] = (np.arange(t.shape[0]) < t.shape[0] - 1).astype(np.float32)  # last sample is padding
        elif t.name == "lr":
            feeds[t.name] = np.array(unit.lr, np.float32)
        elif t.name == "step":
            feeds[t.name] = np.array(3, np.float32)
        elif t.name == "loss_scale":
            feeds[t.name] = np.array(b.schedule.weights[unit.t - 1], np.float32)
        else:
            feeds[t.name] = rng.standard_normal(t.shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("role", ["block", "head"])
def test_one_step_equals_onnxruntime_and_litert(engines_bundle, role):
    pytest.importorskip("ai_edge_litert")
    b = bundles.load(engines_bundle)
    unit = b.blocks[-1] if role == "block" else b.head
    feeds = _feeds(b, unit, np.random.default_rng(1))
    want = b.load_graph(get_engine("tflm"), unit.step_graph).run(feeds)
    assert np.abs(want["next.param"] - feeds["param"]).max() > 1e-4, "the step barely moved the weights"
    for engine in ("onnxruntime", "litert"):
        got = b.load_graph(get_engine(engine), unit.step_graph).run(feeds)
        for name in want:
            np.testing.assert_allclose(want[name], got[name], rtol=0, atol=1e-5, err_msg=f"{engine}: {name}")


def test_planner_uses_the_arena_the_interpreter_needs(engines_bundle):
    b = bundles.load(engines_bundle)
    engine = get_engine("tflm")
    arenas = {key: b.load_graph(engine, key).arena_bytes for key in {u.step_graph for u in b.units}}
    for key, n in arenas.items():  # the manifest's figure, c + s·B at the bundle's batch size
        c, slope = b.manifest["graphs"][key]["memory"]["tflm_arena"]
        assert c + slope * b.batch_size == n, (key, c, slope, n)
    # Exact: TFLM allocates the graph in that arena and not in one byte less.
    model = b.graph_path("block_step", ".tflite").read_bytes()
    assert not isinstance(tflm._interpreter(model, arenas["block_step"])[0], Exception)
    assert isinstance(tflm._interpreter(model, arenas["block_step"] - 1)[0], RuntimeError)

    plan = json.loads(edgeprop("profile", b.root, "--device", "stm32f746", "--json", check=False,
                               blocked=ABSENT).stdout)["plan"]
    assert plan["engine"] == "tflm" and "exact arena" in plan["engine_note"], plan["engine_note"]
    assert {u["name"]: u["engine"] for u in plan["units"]} == {u.name: arenas[u.step_graph] for u in b.units}
    # Other batch sizes scale it by its measured growth per sample.
    assert memory.plan(b, b.batch_size * 2, engine=memory_model("tflm")).units[0].engine > arenas["block_step"]


def test_too_small_an_arena_and_a_missing_op_are_clear_errors(engines_bundle, tmp_path):
    b = bundles.load(engines_bundle)
    path, spec = b.graph_path("head_infer", ".tflite"), b.graphs["head_infer"]
    need = get_engine("tflm").load(path, spec).arena_bytes
    with pytest.raises(BundleError, match=f"needs a tensor arena of {need} bytes.*given {need - 16}"):
        get_engine("tflm", arena_size=need - 16).load(path, spec)
    assert get_engine("tflm", arena_size=need).load(path, spec).arena_size == need

    # The same graph with its ADD turned into POW, an op TFLM has no kernel for.
    model = runtime.convert_bytearray_to_object(path.read_bytes())
    pow_code = tflm.schema.BuiltinOperator.POW
    for code in model.operatorCodes:
        if code.builtinCode == tflm.schema.BuiltinOperator.ADD:
            code.builtinCode = code.deprecatedBuiltinCode = pow_code
    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    (tmp_path / "pow.tflite").write_bytes(builder.Output())
    with pytest.raises(BundleError, match=r"pow\.tflite: TFLite Micro cannot load this graph \(.*POW"):
        get_engine("tflm").load(tmp_path / "pow.tflite", spec)

    (tmp_path / "junk.tflite").write_bytes(b"not a flatbuffer at all")
    with pytest.raises(BundleError, match="junk.tflite: not a .tflite flatbuffer"):
        get_engine("tflm").load(tmp_path / "junk.tflite", spec)
