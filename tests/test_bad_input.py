"""Bad bundles and bad data: a clear error naming the problem, a non-zero exit, and the
checkpoint already on disk left exactly as it was."""
import json
import shutil

import numpy as np
import pytest

from conftest import edgeprop
from edgeprop.bundle import write_manifest


@pytest.fixture
def trained(trained_digits, tmp_path):
    """A private copy of a bundle with a checkpoint on disk, and that checkpoint's bytes."""
    bundle = shutil.copytree(trained_digits, tmp_path / "digits")
    return bundle, (bundle / "checkpoints" / "last.npz").read_bytes()


def _fails(bundle, *extra, command="train", message):
    args = [command, bundle, *extra] + (["--resume", "--quiet"] if command == "train" else [])
    proc = edgeprop(*args, check=False)
    assert proc.returncode != 0, proc.stdout
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def _unchanged(bundle, before):
    assert (bundle / "checkpoints" / "last.npz").read_bytes() == before


def _edit_manifest(bundle, change, rehash=False):
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    if rehash:
        write_manifest(bundle, manifest)
    else:
        (bundle / "manifest.json").write_text(json.dumps(manifest))


def _rewrite_init(bundle, change):
    """Change state/init.npz and refresh the checksums, as a careless or hostile tool would."""
    with np.load(bundle / "state" / "init.npz") as f:
        arrays = {k: f[k] for k in f.files}
    change(arrays)
    np.savez(bundle / "state" / "init.npz", **arrays)
    _edit_manifest(bundle, lambda m: None, rehash=True)


def test_weight_file_with_wrong_sha256(trained):
    bundle, before = trained
    path = bundle / "state" / "init.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    _fails(bundle, message="init.npz: sha256 does not match")
    _unchanged(bundle, before)


def test_manifest_from_a_newer_edgeprop(trained):
    bundle, before = trained
    _edit_manifest(bundle, lambda m: m.update(schema_version=2))
    _fails(bundle, message="schema version 2 is newer")
    _unchanged(bundle, before)


def test_missing_graph_file(trained):
    bundle, before = trained
    (bundle / "graphs" / "head_step.onnx").unlink()
    _fails(bundle, message="head_step.onnx: file is missing")
    _unchanged(bundle, before)


def test_path_escaping_the_bundle(trained):
    bundle, before = trained
    _edit_manifest(bundle, lambda m: m["files"].update({"../../etc/passwd": "0" * 64}))
    _fails(bundle, message="leaves the bundle folder")
    _unchanged(bundle, before)


def test_manifest_that_is_not_json(trained):
    bundle, before = trained
    (bundle / "manifest.json").write_text("{ not json")
    _fails(bundle, message="manifest.json: not valid JSON")
    _unchanged(bundle, before)


def test_pickled_arrays_are_never_loaded(trained, tmp_path):
    """An object array needs pickle (code execution): refused, even with a valid checksum."""
    bundle, before = trained
    _rewrite_init(bundle, lambda a: a.update(embedding=np.array([{"evil": 1}] * 10, dtype=object)))
    _fails(bundle, message="init.npz: 'embedding' holds Python objects (pickled data); refused")
    _unchanged(bundle, before)


def test_tensor_with_the_wrong_shape(trained):
    bundle, before = trained
    _rewrite_init(bundle, lambda a: a.update({"block3/opt.m": a["block3/opt.m"][:1000].copy()}))
    _fails(bundle, message="'opt.m' is float32[1000], the manifest says float32[60426]")
    _unchanged(bundle, before)


def test_corrupt_checkpoint_is_reported_and_not_overwritten(trained):
    bundle, _ = trained
    ckpt = bundle / "checkpoints" / "last.npz"
    ckpt.write_bytes(b"garbage")
    _fails(bundle, message="last.npz: not a readable array archive")
    assert ckpt.read_bytes() == b"garbage"


@pytest.mark.parametrize("make, message", [
    (lambda rng: (rng.random((50, 10)), rng.integers(0, 10, 50)), "samples have 10 features"),
    (lambda rng: (rng.random((50, 64)), np.r_[rng.integers(0, 10, 49), 12]), "label 12 in sample 49"),
    (lambda rng: (np.where(np.arange(64) == 5, np.nan, rng.random((50, 64))), rng.integers(0, 10, 50)), "NaN"),
    (lambda rng: (np.where(np.arange(64) == 5, np.inf, rng.random((50, 64))), rng.integers(0, 10, 50)), "inf"),
], ids=["wrong-features", "label-out-of-range", "nan", "inf"])
@pytest.mark.parametrize("command", ["train", "eval"])
def test_bad_data(trained, tmp_path, make, message, command):
    bundle, before = trained
    x, y = make(np.random.default_rng(0))
    np.savez(tmp_path / "data.npz", x=x.astype(np.float32), y=y)
    _fails(bundle, "--data", tmp_path / "data.npz", command=command, message=message)
    _unchanged(bundle, before)


def test_no_bundle_at_all(tmp_path):
    proc = edgeprop("info", tmp_path / "nothing", check=False)
    assert proc.returncode != 0 and "no bundle folder" in proc.stderr


def test_divergence_stops_training_and_keeps_the_checkpoint(trained):
    bundle, before = trained
    proc = edgeprop("train", bundle, "--restart", "--lr", "1e30", "--quiet", check=False)
    assert proc.returncode != 0 and "training diverged" in proc.stderr, proc.stderr
    _unchanged(bundle, before)


def test_file_used_without_a_checksum(trained):
    bundle, before = trained
    _edit_manifest(bundle, lambda m: m["files"].pop("state/init.npz"))
    _fails(bundle, message="without a checksum")
    _unchanged(bundle, before)

@pytest.mark.slow  # two exports in fresh processes
def test_export_refuses_bad_data_and_keeps_an_existing_bundle(digits_bundle, tmp_path):
    x = np.random.default_rng(0).random((40, 8)).astype(np.float32)
    x[3, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(40) % 4)
    proc = edgeprop("export", "--data", tmp_path / "nan.npz", "--out", tmp_path / "b", torch_allowed=True, check=False)
    assert proc.returncode != 0 and "NaN" in proc.stderr and not (tmp_path / "b").exists()
    manifest = (digits_bundle / "manifest.json").read_bytes()
    proc = edgeprop("export", "--out", digits_bundle, torch_allowed=True, check=False)
    assert proc.returncode != 0 and "--force" in proc.stderr
    assert (digits_bundle / "manifest.json").read_bytes() == manifest


def test_an_unwritable_checkpoint_place_is_a_clear_error(bundle_copy):
    (bundle_copy / "checkpoints").write_text("a file where the checkpoint folder should be")
    proc = edgeprop("train", bundle_copy, "--epochs", "1", "--quiet", check=False)
    assert proc.returncode != 0 and "error:" in proc.stderr and "checkpoints" in proc.stderr
    assert "Traceback" not in proc.stderr
