"""The native engine: graphs compiled to C, built into shared libraries, called with numpy
buffers. Small hand-made graphs check the build (BLAS products, folded transposes, the cache,
the errors); exported bundles check every step graph and a few trained steps against
onnxruntime, for the MLP rules and the CNN."""
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("emx_onnx_cgen")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from edgeprop.errors import EdgepropError  # noqa: E402
from edgeprop.runtimes import get_engine, native  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    """One library cache per session, never the user's."""
    root = tmp_path_factory.getbasetemp() / "native-cache"
    monkeypatch.setenv("EDGEPROP_CACHE", str(root))
    return root / "native"


def _tensor(name, shape, dtype="float32"):
    return SimpleNamespace(name=name, shape=tuple(shape), dtype=dtype)


def _graph(tmp_path, name, nodes, inputs, outputs, initializers=()):
    """A hand-made ONNX graph and the manifest-like spec the engine checks it against."""
    value = lambda t: helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.shape))  # noqa: E731
    model = helper.make_model(helper.make_graph(nodes, name, [value(t) for t in inputs],
                                                [value(t) for t in outputs], list(initializers)),
                              opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path, SimpleNamespace(inputs=inputs, outputs=outputs)


def _products(tmp_path):
    """y = relu(a @ b^T + c) and g = a^T @ y: a Gemm with C, a Transpose into a MatMul."""
    nodes = [helper.make_node("Transpose", ["b"], ["bt"], perm=[1, 0]),
             helper.make_node("Gemm", ["a", "bt", "c"], ["h"]),
             helper.make_node("Relu", ["h"], ["y"]),
             helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]),
             helper.make_node("MatMul", ["at", "y"], ["g"])]
    return _graph(tmp_path, "products", nodes, [_tensor("a", (5, 7)), _tensor("b", (3, 7)), _tensor("c", (3,))],
                  [_tensor("y", (5, 3)), _tensor("g", (7, 3))])


@pytest.mark.slow  # over 5 s alone
def test_products_and_folded_transposes_compute_what_numpy_does(tmp_path, cache):
    path, spec = _products(tmp_path)
    graph = get_engine("native").load(path, spec)
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(s, dtype=np.float32) for s in ((5, 7), (3, 7), (3,)))
    out = graph.run({"a": a, "b": b, "c": c})
    y = np.maximum(a @ b.T + c, 0)
    np.testing.assert_allclose(out["y"], y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["g"], a.T @ y, rtol=1e-5, atol=1e-6)
    info = graph.info
    assert info["transposes_folded"] == 2
    if get_engine("native").blas is not None:
        assert info["products_on_blas"] == 2 and "cblas_sgemm" in (cache / info["source"]).read_text()


def test_no_blas_says_what_to_install(monkeypatch, capsys):
    import edgeprop.targets.cblas as cblas
    monkeypatch.setattr(cblas, "find_blas", lambda: None)
    engine = get_engine("native")
    assert engine.blas is None
    assert "no BLAS found" in capsys.readouterr().err and "pip install scipy-openblas32" in engine.warning


@pytest.mark.slow  # a second C build: 7 s
def test_without_blas_the_generated_loops_compute_the_same(tmp_path):
    path, spec = _products(tmp_path)
    rng = np.random.default_rng(1)
    feeds = {"a": rng.standard_normal((5, 7), dtype=np.float32), "b": rng.standard_normal((3, 7), dtype=np.float32),
             "c": rng.standard_normal(3, dtype=np.float32)}
    engine = native.Engine(blas=False)
    loops = engine.load(path, spec)
    assert loops.info["blas"] is None and loops.info["products_on_blas"] == 0
    blas = get_engine("native").load(path, spec)
    for name, value in loops.run(feeds).items():
        np.testing.assert_allclose(value, blas.run(feeds)[name], rtol=1e-5, atol=1e-6)


def test_a_built_library_is_reused_not_rebuilt(tmp_path, cache, monkeypatch):
    path, spec = _products(tmp_path)
    get_engine("native").load(path, spec)
    built = sorted(p.name for p in cache.iterdir())
    assert not [p for p in built if p.startswith(".")], built  # no half-built leftovers
    monkeypatch.setattr(native.Engine, "_build", lambda *a: pytest.fail("rebuilt a cached graph"))
    get_engine("native").load(path, spec)
    assert sorted(p.name for p in cache.iterdir()) == built


def test_inputs_are_checked_and_passed_without_copies(tmp_path):
    path, spec = _products(tmp_path)
    graph = get_engine("native").load(path, spec)
    a, b, c = np.ones((5, 7), np.float32), np.ones((3, 7), np.float32), np.zeros(3, np.float32)
    with pytest.raises(EdgepropError, match=r"'b' has shape \[7, 3\]"):
        graph.run({"a": a, "b": b.T.copy(), "c": c})
    with pytest.raises(EdgepropError, match=r"\['c'\] were not fed"):
        graph.run({"a": a, "b": b})
    out = graph.run({"a": a.astype(np.float64), "b": b, "c": c})  # converted, not refused
    np.testing.assert_allclose(out["y"], 7.0)


def test_an_op_the_generator_cannot_compile_is_refused_at_load_by_name(tmp_path):
    path, spec = _graph(tmp_path, "sampler", [helper.make_node("Multinomial", ["x"], ["y"])],
                        [_tensor("x", (2, 4))], [_tensor("y", (2, 1))])
    with pytest.raises(EdgepropError, match="cannot compile op Multinomial"):
        get_engine("native").load(path, spec)


def test_no_c_compiler_says_what_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(EdgepropError, match="needs a C compiler.*apt install gcc"):
        get_engine("native")
    monkeypatch.setenv("CC", "no-such-cc")
    with pytest.raises(EdgepropError, match=r"no-such-cc not found"):
        get_engine("native")


# -- exported bundles against onnxruntime ---------------------------------------------------------

torch_needed = pytest.mark.skipif(not __import__("importlib.util").util.find_spec("torch"), reason="export needs torch")
BUNDLES = {"noprop-dt-b1": {"blocks": 2, "batch_size": 1}, "noprop-dt-b16": {"blocks": 2},
           "noprop-dt-sgd": {"blocks": 2, "optimizer": "sgd", "lr": 0.05}, "local": {"rule": "local", "depth": 2},
           "forward-forward": {"rule": "forward-forward", "depth": 2}, "noprop-ct": {"rule": "noprop-ct", "blocks": 2},
           "cnn": {"model": "cnn", "blocks": 2, "width": 16, "batch_size": 4}}


@pytest.fixture(scope="module", params=sorted(BUNDLES))
def bundle(request, tmp_path_factory):
    from edgeprop import bundle as bundles
    from edgeprop.exporters import export
    options = {"width": 48, "batch_size": 16, "progress": False, **BUNDLES[request.param]}
    return bundles.load(export(tmp_path_factory.mktemp("native") / request.param, **options))


def _feeds(bundle, key, rng):
    """Random inputs for a graph, the unit's initial state where the graph takes state."""
    spec = bundle.graphs[key]
    unit = next(u for u in bundle.units if key in (u.step_graph, u.infer_graph))
    state, _ = bundle.initial_state()
    feeds = {}
    for t in spec.inputs:
        if t.name in state[unit.name]:
            feeds[t.name] = state[unit.name][t.name]
        elif t.name in ("lr", "step", "loss_scale"):
            feeds[t.name] = np.array({"lr": 1e-3, "step": 1.0, "loss_scale": 0.5}[t.name], t.dtype)
        elif t.name == "mask" or t.name.startswith("drop"):
            feeds[t.name] = np.ones(t.shape, t.dtype)
        else:
            feeds[t.name] = rng.standard_normal(t.shape).astype(t.dtype)
    return feeds


@torch_needed
@pytest.mark.slow
def test_every_graph_matches_onnxruntime(bundle):
    rng = np.random.default_rng(0)
    ort, nat = get_engine("onnxruntime"), get_engine("native")
    for key in sorted(bundle.graphs):
        feeds = _feeds(bundle, key, rng)
        want = bundle.load_graph(ort, key).run(feeds)
        graph = bundle.load_graph(nat, key)
        got = graph.run(feeds)
        assert got.keys() == want.keys()
        for name in want:
            # OpenBLAS and onnxruntime's MLAS sum the products in different orders: NoProp-CT's
            # block gradients (entries up to ~80) differ by up to 5e-4 relative in a few entries.
            np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-4, err_msg=f"{key}: {name}")
        # In place, as the trainer runs it: next.K written over K gives the same numbers.
        state = {n[5:]: feeds[n[5:]].copy() for n in want if n.startswith("next.") and n[5:] in feeds}
        inplace = graph.run({**feeds, **state}, out={f"next.{k}": v for k, v in state.items()})
        for k, v in state.items():
            assert (inplace[f"next.{k}"] is v) == graph.fills_outputs
            np.testing.assert_array_equal(inplace[f"next.{k}"], got[f"next.{k}"], err_msg=f"{key}: next.{k} in place")


@torch_needed
@pytest.mark.slow
def test_trained_weights_match_onnxruntime(bundle):
    from edgeprop import datasets
    from edgeprop.trainer import TrainConfig, Trainer
    data, steps = datasets.load("digits", "train"), 20 * len(bundle.units)
    trained = {}
    for engine in ("onnxruntime", "native"):
        trainer = Trainer(bundle, get_engine(engine), data, TrainConfig(epochs=2))
        trainer.run(limit=steps, progress=False, checkpoints=False)
        trained[engine] = {u: trainer.state[u]["param"].copy() for u in trainer.state}
    start, _ = bundle.initial_state()
    moved = max(float(np.abs(trained["onnxruntime"][u] - start[u]["param"]).max()) for u in start)
    assert moved > 1e-2, "the weights barely moved: the comparison would prove nothing"
    for u in start:
        np.testing.assert_allclose(trained["native"][u], trained["onnxruntime"][u], rtol=0, atol=1e-4, err_msg=u)


@torch_needed
@pytest.mark.slow
def test_train_and_eval_on_the_command_line(bundle_copy, cache):
    """The device side: no torch in the process. The trained checkpoint evaluates alike on
    native and onnxruntime."""
    from conftest import edgeprop
    edgeprop("train", bundle_copy, "--engine", "native", "--epochs", "2", "--quiet", blocked=("torch",))
    report = {engine: json.loads(edgeprop("eval", bundle_copy, "--engine", engine, "--json", blocked=("torch",)).stdout)
              for engine in ("native", "onnxruntime")}
    assert report["native"]["per_unit_accuracy"][0] >= 0.5, report  # block 1 learned (measured 0.76 after 2 epochs)
    assert abs(report["native"]["accuracy"] - report["onnxruntime"]["accuracy"]) <= 0.01, report
    assert {p.name.split("-")[0] for p in cache.glob("*.so")} >= {"block_step", "head_step", "block_infer"}
