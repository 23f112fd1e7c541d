"""NoProp-DT's learned label embeddings (the paper's "dim 20" and "prototype"): W_embed is the
head's parameter, trained by its CE + KL step; every block step and chain reads the head's
current W. Parity with the torch reference (which trains W the same way), W really moving on
the device, the prototype initialisation, and the refusals.
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import edgeprop  # noqa: E402
from edgeprop import bundle as bundles  # noqa: E402
from edgeprop import datasets  # noqa: E402
from edgeprop.bundle import write_manifest  # noqa: E402
from edgeprop.errors import BundleError, EdgepropError  # noqa: E402
from edgeprop.exporters import export  # noqa: E402
from edgeprop.exporters.models import prototypes  # noqa: E402
from edgeprop.exporters.validate import validate  # noqa: E402
from edgeprop.rules.noprop_dt import current_embedding  # noqa: E402

SMALL = {"blocks": 2, "width": 32, "batch_size": 16, "progress": False}


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    return export(tmp_path_factory.mktemp("emb") / "learned", embedding="learned", **SMALL)


@pytest.mark.slow
def test_learned_embedding_is_the_heads_parameter(learned):
    bundle = bundles.load(learned)
    assert bundle.model["embed_dim"] == 20 and bundle.model["learned_embedding"]
    init, emb = bundle.initial_state()
    head_w = current_embedding(bundle, init["head"])
    np.testing.assert_array_equal(head_w, emb)  # starts as the bundle's embedding: orthonormal rows
    np.testing.assert_allclose(emb @ emb.T, np.eye(10), atol=1e-6)
    # the blocks take W as a graph input instead of a baked-in constant
    assert "embedding" in [t.name for t in bundle.graphs["block_step"].inputs]
    assert "embedding" in [t.name for t in bundle.graphs["block_infer"].inputs]
    assert {"eps", "target", "mask"} <= {t.name for t in bundle.graphs["head_step"].inputs}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["learned", "prototype"])
def test_runtime_matches_the_torch_reference(tmp_path, learned, kind):
    """Lock-step and free-running weights (W included) and both inference chains."""
    root = learned if kind == "learned" else export(tmp_path / kind, embedding=kind, **SMALL)
    report = validate(root, steps=20, progress=False)
    assert report["ok"], report
    assert report["lockstep"]["max_abs_diff"] <= 1e-4
    assert all(c["agreement"] == 1.0 for c in report["inference"]["chains"].values())


@pytest.mark.slow
def test_device_training_moves_w_and_the_blocks_read_it(learned, tmp_path):
    """Trained torch-free: the head's W changes, and eval's chain reads the trained W."""
    import shutil
    root = tmp_path / "b"
    shutil.copytree(learned, root)
    edgeprop("train", root, "--epochs", "2", "--quiet")
    bundle = bundles.load(root)
    init, emb = bundle.initial_state()
    with np.load(root / "checkpoints" / "last.npz") as ckpt:
        trained = current_embedding(bundle, {"param": ckpt["head/param"]})
    assert np.max(np.abs(trained - emb)) > 1e-2
    report = json.loads(edgeprop("eval", root, "--json").stdout)
    assert report["accuracy"] > 0.3  # 2 blocks of width 32 after 2 epochs: far above chance


def test_prototype_starts_from_a_medoid_image_of_each_class():
    train = datasets.load("digits", "train")
    x = train.x.astype(np.float32)
    normalised = (x - x.mean(dtype=np.float64)) / x.std(dtype=np.float64)
    w = prototypes(normalised, train.y, 10, seed=0)
    assert w.shape == (10, 64)
    for c in range(10):
        members = normalised[train.y == c].reshape(-1, 64)
        assert np.min(np.abs(members - w[c]).sum(1)) < 1e-4  # a real image of class c
        dist = np.linalg.norm(members[:, None] - members[None], axis=-1)
        assert np.isclose(np.median(np.linalg.norm(members - w[c], axis=1)), np.min(np.median(dist, axis=1)))


def test_refusals(tmp_path):
    with pytest.raises(EdgepropError, match="--embed-dim does not apply"):
        export(tmp_path / "p", embedding="prototype", embed_dim=5, **SMALL)
    with pytest.raises(EdgepropError, match="learned embeddings train with NoProp-DT's head"):
        export(tmp_path / "c", rule="noprop-ct", embedding="learned", progress=False)
    with pytest.raises(EdgepropError, match="unknown embedding"):
        export(tmp_path / "u", embedding="random", **SMALL)


@pytest.mark.slow
def test_a_learned_embedding_without_its_head_parameter_is_refused(learned, tmp_path):
    import shutil
    root = tmp_path / "b"
    shutil.copytree(learned, root)
    manifest = json.loads((root / "manifest.json").read_text())
    head = next(u for u in manifest["units"] if u["role"] == "head")
    for view in head["layout"]:  # the same tensors, but none of them named as the head's W
        view["name"] = view["name"].replace("embedding", "prototypes")
    write_manifest(root, manifest)
    with pytest.raises(BundleError, match="learned embedding must be the head's parameter"):
        bundles.load(root)
