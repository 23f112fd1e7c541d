"""The fused step graph (export --fused-step, train --fused-step): every unit of an interleaved
batch in one engine call, giving what the units' own step graphs give, planned as one graph."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import edgeprop
from edgeprop import bundle as bundles
from edgeprop import datasets, memory
from edgeprop.errors import EdgepropError
from edgeprop.runtimes import get_engine, memory_model
from edgeprop.trainer import TrainConfig, Trainer

BATCHES = 12  # interleaved batches each run trains: every unit steps this often


def trained(root, engine: str, fused: bool, limit: int, resume: bool = False, **config) -> Trainer:
    bundle = bundles.load(root)
    trainer = Trainer(bundle, get_engine(engine, threads=1), datasets.load("digits", "train"),
                      TrainConfig(epochs=1, seed=5, fused=fused, lr_schedule="cosine", **config))
    if resume:
        trainer.resume()
    trainer.run(limit=limit, progress=False, checkpoints=resume or "checkpoint_every" in config)
    return trainer


def assert_same_training(a: Trainer, b: Trainer, atol: float) -> None:
    for unit, tensors in a.state.items():
        for key, value in tensors.items():
            np.testing.assert_allclose(b.state[unit][key], value, rtol=0, atol=atol, err_msg=f"{unit}/{key}")
    assert a.steps == b.steps and a.done == b.done
    np.testing.assert_allclose([a.losses[u] for u in a.losses], [b.losses[u] for u in a.losses], rtol=1e-6)


@pytest.mark.parametrize("engine", ["onnxruntime", pytest.param("native", marks=pytest.mark.slow)])
def test_fused_step_trains_as_the_units_own_steps(small_noprop_bundle, engine):
    if engine == "native":
        pytest.importorskip("emx_onnx_cgen")
    units = len(bundles.load(small_noprop_bundle).units)
    alone = trained(small_noprop_bundle, engine, False, units * BATCHES)
    fused = trained(small_noprop_bundle, engine, True, units * BATCHES)
    assert fused.fused is not None and not fused.graphs  # one call per batch, no unit's own graph loaded
    assert_same_training(alone, fused, atol=1e-6)
    for unit, log in alone.history.items():  # [[sum of losses, updates]] per epoch
        np.testing.assert_allclose(np.array(fused.history[unit]), np.array(log), rtol=1e-6)


def test_fused_run_resumed_mid_batch_steps_the_rest_of_it_unit_by_unit(small_noprop_bundle, tmp_path):
    root = shutil.copytree(small_noprop_bundle, tmp_path / "b")
    units = len(bundles.load(root).units)
    reference = trained(root, "onnxruntime", False, units * 5)
    trained(root, "onnxruntime", False, units + 2, checkpoint_every=1)  # stops two units into batch 2
    resumed = trained(root, "onnxruntime", True, units * 5, resume=True, checkpoint_every=3)
    assert set(resumed.graphs) == {u.step_graph for u in resumed.bundle.units[2:]}  # only for that batch's rest
    assert_same_training(reference, resumed, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 16, 128])
def test_fused_plan_holds_every_unit_at_once(small_noprop_bundle, batch):
    bundle = bundles.load(small_noprop_bundle)
    for engine in ("onnxruntime", "native"):
        model = memory_model(engine)
        alone = memory.plan(bundle, batch, engine=model)
        fused = memory.plan(bundle, batch, engine=model, fused=True)
        (plan,) = fused.units
        assert plan.step >= max(u.step for u in alone.units)  # each unit's update stays live to the end
        assert plan.state == sum(u.state for u in alone.units)
        assert plan.batch > max(u.batch for u in alone.units)
        assert fused.flash > alone.flash  # the fused graph's file is stored beside the units' own


def test_train_fused_step_on_the_device_side(small_noprop_bundle, tmp_path):
    root = shutil.copytree(small_noprop_bundle, tmp_path / "b")
    edgeprop("train", root, "--epochs", "1", "--fused-step", "--quiet")  # torch and onnx unimportable
    assert bundles.load(root).checkpoint_path().is_file()


def test_a_bundle_without_the_fused_graph_is_refused_in_one_line(small_noprop_bundle, tmp_path):
    root = shutil.copytree(small_noprop_bundle, tmp_path / "plain")
    manifest = bundles.load(root).manifest
    del manifest["fused_step"]
    (root / "graphs" / "fused_step.onnx").unlink()
    bundles.write_manifest(root, manifest)
    proc = edgeprop("train", root, "--epochs", "1", "--fused-step", "--quiet", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no fused step graph; export it with --fused-step" in proc.stderr
    with pytest.raises(EdgepropError, match="no fused step graph"):
        memory.plan(bundles.load(root), engine=memory_model("onnxruntime"), fused=True)
    assert not (root / "checkpoints").exists()


@pytest.mark.parametrize("flags, says", [
    (("--order", "block-sequential"), "interleaved order only"),
    (("--stream",), "--stream does not apply"),
    (("--engine", "litert"), "the fused step graph is ONNX only"),
])
def test_runs_the_fused_graph_cannot_serve_are_refused(small_noprop_bundle, tmp_path, flags, says):
    if "litert" in flags:
        pytest.importorskip("ai_edge_litert")
    root = shutil.copytree(small_noprop_bundle, tmp_path / "b")
    proc = edgeprop("train", root, "--epochs", "1", "--fused-step", "--quiet", *flags, check=False)
    assert proc.returncode == 2 and says in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_export_refuses_fused_step_for_units_that_read_each_other(tmp_path):
    from edgeprop.exporters import export
    with pytest.raises(EdgepropError, match="rule local's units read each other's outputs"):
        export(tmp_path / "b", rule="local", fused_step=True, progress=False)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("field, value, says", [
    ("units", ["head", "block1", "block2", "block3"], "fused_step.units' must list every unit"),
    ("shared", "x", "fused_step.shared' must be a list"),
    ("inputs", [{"name": "x"}], "bad tensor description in fused_step"),
])
def test_a_malformed_fused_entry_is_refused_naming_it(small_noprop_bundle, tmp_path, field, value, says):
    root = shutil.copytree(small_noprop_bundle, tmp_path / "b")
    manifest = bundles.load(root).manifest
    manifest["fused_step"][field] = value
    bundles.write_manifest(root, manifest)
    with pytest.raises(bundles.BundleError, match=says):
        bundles.load(root)
