"""zeroth-order (SPSA / MeZO): parity with torch, no gradient graph, inference-sized memory,
fine-tuning on the device, bad options.

The bundles: a back-prop MLP (64-64-10, SGD) trained one epoch on the device, and the same
MLP fine-tuned with zeroth-order from its checkpoint (`--init`).
"""
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from conftest import edgeprop  # noqa: E402
from edgeprop import bundle as bundles  # noqa: E402
from edgeprop import datasets, memory  # noqa: E402
from edgeprop.errors import EdgepropError  # noqa: E402
from edgeprop.exporters import export, rules  # noqa: E402
from edgeprop.exporters.model_memory import onnx_report  # noqa: E402
from edgeprop.exporters.rules import zeroth_order  # noqa: E402
from edgeprop.exporters.validate import validate  # noqa: E402
from edgeprop.runtimes import get_engine, memory_model  # noqa: E402
from edgeprop.trainer import TrainConfig, Trainer  # noqa: E402

pytestmark = pytest.mark.slow  # exports back-prop and zeroth-order bundles

MLP = ("--model", "mlp", "--width", 64, "--depth", 1)


@pytest.fixture(scope="module")
def backprop_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("zo") / "bp"
    edgeprop("export", "--rule", "backprop", *MLP, "--optimizer", "sgd", "--lr", 0.05, "--out", out, "--quiet",
             torch_allowed=True)
    edgeprop("train", out, "--epochs", 1, "--quiet")
    return out


@pytest.fixture(scope="module")
def zo_bundle(backprop_bundle):
    out = backprop_bundle.parent / "zo"
    edgeprop("export", "--rule", "zeroth-order", *MLP, "--init", backprop_bundle, "--out", out, "--quiet",
             torch_allowed=True)
    return out


@pytest.fixture(scope="module")
def sparse_bundle(tmp_path_factory):
    """Python API, a user Sequential; two directions, only the last layer perturbed, and a small
    chunk so that z is regenerated over several chunks."""
    seq = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zeroth_order, "CHUNK", 100)
        out = export(tmp_path_factory.mktemp("zo") / "sparse", rule="zeroth-order", model=seq, batch_size=16,
                     zo_directions=2, zo_layers="last-1", zo_eps=1e-2, progress=False)
    return out


def _accuracy(bundle) -> float:
    return json.loads(edgeprop("eval", bundle, "--json").stdout)["accuracy"]


def test_fine_tunes_a_backprop_model_on_the_device(zo_bundle, tmp_path):
    """Measured (2-core x86-64): the back-prop MLP after one SGD epoch scores 86.9% on the digits
    test split; 40 epochs of zeroth-order fine-tuning from it (lr 1e-3, ε 1e-3, one direction,
    880 steps, ~2 s) reach 90.7% (100 epochs: 90.9%; back-prop itself goes on to ~96%).
    Floor: 89%, and at least 1.5 points above the starting model. The whole pipeline, both
    exports included, takes ~65 s."""
    bundle = tmp_path / "zo"
    shutil.copytree(zo_bundle, bundle)
    start = _accuracy(bundle)  # no checkpoint yet: the --init weights
    edgeprop("train", bundle, "--epochs", 40, "--quiet")
    tuned = _accuracy(bundle)
    assert tuned >= 0.89 and tuned >= start + 0.015, (start, tuned)


def test_matches_the_torch_reference(zo_bundle, sparse_bundle):
    """Engine vs torch forward passes inside the same update (same numpy z): weights agree
    after a few steps, in lock-step and free-running."""
    for path in (zo_bundle, sparse_bundle):
        report = validate(path, "digits", steps=6, progress=False)
        assert report["lockstep"]["max_abs_diff"] <= 1e-4, report
        assert report["free_running"]["max_abs_diff"] <= 1e-4, report


def test_inference_graph_matches_torch_forward(zo_bundle):
    b = bundles.load(zo_bundle)
    unit = b.units[0]
    state, _ = b.initial_state()
    x = np.random.default_rng(0).standard_normal((b.batch_size, *b.input_shape), dtype=np.float32)
    param = state[unit.name]["param"]
    got = get_engine().load(b.graph_path(unit.infer_graph)).run({"param": param, "x": x})
    module = rules.from_bundle(b).module(unit)
    module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in unit.unflatten(param).items()})
    with torch.no_grad():
        want = module(torch.from_numpy(x))[0].numpy()
    assert np.abs(got["logits"] - want).max() <= 1e-5


def test_init_takes_the_trained_weights(backprop_bundle, zo_bundle):
    bp, zo = bundles.load(backprop_bundle), bundles.load(zo_bundle)
    trained = np.load(bp.checkpoint_path())["network/param"]
    np.testing.assert_array_equal(zo.initial_state()[0]["model"]["param"], trained)
    assert zo.input_norm == bp.input_norm  # the normalisation those weights were trained with


def test_no_gradient_graph_is_exported_or_loaded(zo_bundle):
    b = bundles.load(zo_bundle)
    unit = b.units[0]
    assert sorted(p.name for p in (b.root / "graphs").iterdir()) == ["model_infer.onnx"]
    assert list(b.graphs) == ["model_infer"] and unit.step_graph == unit.infer_graph == "model_infer"
    graph = b.graphs["model_infer"]
    assert [t.name for t in graph.inputs] == ["param", "x"] and [t.name for t in graph.outputs] == ["logits"]
    assert [t.name for t in unit.state] == ["param"]  # no optimizer slots

    loaded = []

    class Recording:
        suffix = ".onnx"
        trains_itself = False

        def __init__(self, engine):
            self.engine = engine

        def load(self, path, spec=None):
            loaded.append(path.name)
            return self.engine.load(path, spec)

    trainer = Trainer(b, Recording(get_engine()), datasets.load("digits", "train"), TrainConfig(epochs=1))
    before = trainer.state["model"]["param"].copy()
    trainer.run(limit=3, progress=False, checkpoints=False)
    assert loaded == ["model_infer.onnx"]
    assert not np.array_equal(trainer.state["model"]["param"], before)


def test_sparse_variant_leaves_the_other_layers_fixed(sparse_bundle):
    b = bundles.load(sparse_bundle)
    zo = b.manifest["zeroth_order"]
    assert zo["layers"] == [2] and zo["directions"] == 2 and zo["chunk"] == 100
    (a, end), = zo["ranges"]
    assert (a, end) == (64 * 32 + 32, b.units[0].n_params)  # the last Linear's weight and bias
    trainer = Trainer(b, get_engine(), datasets.load("digits", "train"), TrainConfig(epochs=1))
    before = trainer.state["model"]["param"].copy()
    trainer.run(limit=5, progress=False, checkpoints=False)
    after = trainer.state["model"]["param"]
    np.testing.assert_array_equal(after[:a], before[:a])
    assert not np.array_equal(after[a:], before[a:])


def test_step_memory_is_the_inference_graphs_plus_one_chunk(zo_bundle, sparse_bundle):
    """The planner counts a step as the inference graph's memory (its inputs, param and x,
    and its arena) plus the rule's one chunk of z: O(1), at most CHUNK floats."""
    for path in (zo_bundle, sparse_bundle):
        b = bundles.load(path)
        unit = b.units[0]
        p = memory.plan(b, engine=memory_model("onnxruntime")).units[0]
        inference = onnx_report(b.graph_path(unit.infer_graph))  # the plain-ONNX planner
        zo = b.manifest["zeroth_order"]
        chunk = 4 * min(zo["chunk"], max(end - a for a, end in zo["ranges"]))
        assert p.scratch == chunk <= 4 * zeroth_order.CHUNK
        # The same liveness peak; the arena each planner puts around it is its own (a bundle's
        # shared arena of regions; a lone model's replayed by exporters/ort_pattern.py).
        assert p.step == inference["peak"]
        assert p.working_set == inference["inputs"] + memory_model("onnxruntime").arena(p.step) + chunk
    assert memory.plan(bundles.load(sparse_bundle), engine=memory_model("onnxruntime")).units[0].scratch == 4 * 100


def test_planned_step_memory_matches_measured(zo_bundle):
    report = json.loads(edgeprop("profile", zo_bundle, "--data", "digits", "--measure", "--steps", 20,
                                 "--json").stdout)
    planned, measured = report["plan"]["working_set"], report["measured"]["working_set"]
    # ±20%, but not finer than onnxruntime's first 1 MiB arena region: for a working set this
    # small (1.1 MB planned) how much of that region the OS has paged in varies from run to run
    # (measured 0.57 MB and 0.70 MB in two CI runs, 1.12 MB in others).
    assert abs(measured - planned) <= max(0.2 * planned, 2**20), (planned, measured)


@pytest.mark.parametrize("options, message", [
    ({"zo_eps": 0}, "--zo-eps must be a positive"),
    ({"zo_eps": -1e-3}, "--zo-eps must be a positive"),
    ({"zo_directions": 0}, "--zo-directions must be at least 1"),
    ({"zo_layers": "last-5"}, "K in last-K must be 1..2"),
    ({"zo_layers": "1"}, r"\[1\] is not a trainable layer"),
    ({"zo_layers": "head"}, "all, last-K, or indices of trainable layers"),
])
def test_bad_options_are_clear_errors(tmp_path, options, message):
    with pytest.raises(EdgepropError, match=message):
        export(tmp_path / "bad", rule="zeroth-order", width=16, depth=1, progress=False, **options)
    assert not (tmp_path / "bad").exists()


def test_init_from_another_model_is_refused(backprop_bundle, tmp_path):
    proc = edgeprop("export", "--rule", "zeroth-order", "--model", "mlp", "--width", 32, "--depth", 1,
                    "--init", backprop_bundle, "--out", tmp_path / "bad", "--quiet", torch_allowed=True, check=False)
    assert proc.returncode == 2 and "--init" in proc.stderr and "same --model/--width/--depth" in proc.stderr
