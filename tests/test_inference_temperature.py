"""NoProp inference temperature τ: z_t = a_t û_t + b_t z_{t-1} + τ √c_t ε (research/noprop.md §5).

The device's chain (numpy + the runtime's inference graphs) against the torch chain
(models.Chain) at τ 0 and τ 1; eval reporting the mean and the sampled chain side by side;
bad τ refused everywhere it can enter; a bundle exported before τ existed still loads
(τ 0, and says so).
"""
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import edgeprop  # noqa: E402
from edgeprop import bundle as bundles  # noqa: E402
from edgeprop import datasets  # noqa: E402
from edgeprop.bundle import write_manifest  # noqa: E402
from edgeprop.errors import BundleError, EdgepropError  # noqa: E402
from edgeprop.exporters.reference import TorchReference  # noqa: E402
from edgeprop.rules.noprop_dt import predict  # noqa: E402
from edgeprop.runtimes import get_engine  # noqa: E402
from edgeprop.trainer import TrainConfig, evaluate, infer_state, load_graphs  # noqa: E402


@pytest.fixture(scope="module")
def trained_reference(small_noprop_bundle):
    """The torch reference after 30 steps of every unit (a chain whose blocks carry signal)."""
    bundle = bundles.load(small_noprop_bundle)
    train = datasets.load("digits", "train")
    reference = TorchReference(bundle, train, TrainConfig(epochs=1, seed=0))
    reference.run(30 * len(bundle.units))
    return bundle, reference, train


def test_bundle_default_is_the_mean_chain_and_batch_128(digits_bundle):
    bundle = bundles.load(digits_bundle)
    assert bundle.manifest["inference"] == {"temperature": 0.0}
    assert bundle.temperature == 0.0 and bundle.temperature_note is None
    assert bundle.batch_size == 128  # the paper's batch for NoProp-DT exports


@pytest.mark.parametrize("tau", [0.0, 1.0, 0.5])
def test_numpy_chain_matches_the_torch_chain(trained_reference, tau):
    """predict() on onnxruntime against models.Chain in torch, on the same weights, z_0 and noise."""
    bundle, reference, train = trained_reference
    graphs = load_graphs(bundle, get_engine("onnxruntime"), {u.infer_graph for u in bundle.units})
    state = {u.name: infer_state(reference.unit_state(i)[0]) for i, u in enumerate(bundle.units)}

    def run_unit(unit, feeds):
        return graphs[unit.infer_graph].run({**state[unit.name], **feeds})

    x = train.x[:40]  # 3 batches, the last one padded
    mine = predict(bundle, bundle.embedding, x, run_unit, seed=7, temperature=tau)
    theirs = reference.chain_logits(x, seed=7, temperature=tau)
    np.testing.assert_allclose(mine.logits, theirs, rtol=1e-4, atol=1e-5)
    assert mine.classes.shape == (40,) and mine.block_classes.shape == (3, 40)
    if tau != 0.0:  # the noise is really there, scaled by τ
        mean = reference.chain_logits(x, seed=7, temperature=0.0)
        assert np.max(np.abs(theirs - mean)) > 1e-3


def test_mean_chain_draws_no_noise_after_z0(trained_reference):
    """At τ 0 only z_0 is random: the chain's logits do not depend on the noise after it."""
    bundle, reference, train = trained_reference
    x = train.x[:16]
    logits = reference.chain_logits(x, seed=3, temperature=0.0)
    from edgeprop.exporters.models import Chain
    index = {u.name: i for i, u in enumerate(bundle.units)}
    chain = Chain([reference.modules[index[u.name]] for u in bundle.blocks], reference.modules[index["head"]],
                  [bundle.schedule.coefficients(u.t) for u in bundle.blocks], temperature=0.0)
    from edgeprop import prng
    from edgeprop.rules.base import padded
    xb, _ = padded(bundle, x)
    z0 = prng.normal(prng.key(3, prng.INFERENCE, 0, 0), (16, 10))
    with torch.no_grad():
        other = chain(torch.from_numpy(xb), torch.from_numpy(z0), 100 * torch.randn(3, 16, 10)).numpy()
    np.testing.assert_allclose(other, logits, rtol=1e-6, atol=1e-6)


def test_eval_reports_both_chains_and_block1s_diagnostic(small_noprop_bundle, trained_reference):
    bundle, reference, _ = trained_reference
    state = {u.name: reference.unit_state(i)[0] for i, u in enumerate(bundle.units)}
    test = datasets.load("digits", "test")
    engine = get_engine("onnxruntime")
    report = evaluate(bundle, engine, test, state, runs=2)
    assert report["temperature"] == 0.0 and report["accuracy"] == report["accuracy_mean"]
    assert len(report["accuracy_runs"]) == 2 and 0 <= report["accuracy_sampled"] <= 1
    assert len(report["per_unit_accuracy"]) == len(report["per_unit_accuracy_sampled"]) == 3
    assert 0.0 < report["block1_true_class_probability"] < 1.0
    sampled = evaluate(bundle, engine, test, state, runs=2, temperature=1.0)
    assert sampled["temperature"] == 1.0 and sampled["accuracy"] == report["accuracy_sampled"]
    assert sampled["accuracy_mean"] == report["accuracy"]
    assert sampled["per_unit_accuracy"] == report["per_unit_accuracy_sampled"]


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-0.5"])
def test_bad_temperature_is_refused(small_noprop_bundle, value):
    proc = edgeprop("eval", small_noprop_bundle, "--temperature", value, check=False)
    assert proc.returncode == 2 and "temperature must be a finite number >= 0" in proc.stderr, proc.stderr
    with pytest.raises(EdgepropError, match="temperature must be a finite number"):
        predict(bundles.load(small_noprop_bundle), np.eye(10, dtype=np.float32), np.zeros((1, 64)), None, 0,
                float(value))


@pytest.mark.slow  # exports of their own
def test_export_takes_a_temperature_and_refuses_a_bad_one(tmp_path):
    out = tmp_path / "b"
    proc = edgeprop("export", "--blocks", "2", "--width", "16", "--temperature", "-1", "--out", out, "--quiet",
                    torch_allowed=True, check=False)
    assert proc.returncode == 2 and "temperature" in proc.stderr and not out.exists()
    edgeprop("export", "--blocks", "2", "--width", "16", "--inference", "sample", "--out", out, "--quiet",
             torch_allowed=True)
    assert bundles.load(out).temperature == 1.0
    report = json.loads(edgeprop("eval", out, "--json").stdout)
    assert report["temperature"] == 1.0 and report["accuracy"] == report["accuracy_sampled"]


def _rewrite_manifest(root, change):
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    write_manifest(root, manifest)


@pytest.mark.parametrize("value", [-1.0, math.nan, "warm"])
def test_manifest_with_a_bad_temperature_is_refused(small_noprop_bundle, tmp_path, value):
    import shutil
    root = shutil.copytree(small_noprop_bundle, tmp_path / "b")
    _rewrite_manifest(root, lambda m: m["inference"].update(temperature=value))
    with pytest.raises(BundleError, match="inference.temperature"):
        bundles.load(root)


def test_bundle_from_before_temperature_loads_with_the_mean_chain(small_noprop_bundle, tmp_path):
    """A manifest with no 'inference' entry (edgeprop before τ): loads, τ 0, and says so."""
    import shutil
    root = shutil.copytree(small_noprop_bundle, tmp_path / "old")
    _rewrite_manifest(root, lambda m: m.pop("inference"))
    bundle = bundles.load(root)
    assert bundle.temperature == 0.0 and "not in the manifest" in bundle.temperature_note
    info = edgeprop("info", root).stdout
    assert "inference  temperature 0 (not in the manifest" in info, info
    report = json.loads(edgeprop("eval", root, "--json").stdout)
    assert report["temperature"] == 0.0 and "not in the manifest" in report["temperature_note"]
    text = edgeprop("eval", root).stdout
    assert "sampled chain (τ 1) accuracy" in text and "note: inference temperature" in text


@pytest.mark.slow  # exports of their own
def test_temperature_is_refused_where_nothing_is_sampled(tmp_path):
    out = tmp_path / "local"
    edgeprop("export", "--rule", "local", "--width", "16", "--depth", "1", "--out", out, "--quiet", torch_allowed=True)
    proc = edgeprop("eval", out, "--inference", "sample", check=False)
    assert proc.returncode == 2 and "takes no --temperature" in proc.stderr
