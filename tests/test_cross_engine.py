"""One bundle, every engine: 50 free-running steps of each unit from the same initial state
and seed, on onnxruntime, litert, native and ort-training, against the torch reference.

Free-running, float rounding differences pile up (AdamW turns a near-zero gradient's last
bit into a ±lr step), so the bundle is a small one where they stay below 1e-4 in 50 steps;
each step's exactness on its own is validate's lock-step (test_parity, test_ort_training).
"""
import json
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import ROOT, engine_venv, needs_litert_torch  # noqa: E402
from edgeprop import bundle as bundles  # noqa: E402
from edgeprop import datasets  # noqa: E402
from edgeprop.exporters.reference import TorchReference  # noqa: E402
from edgeprop.runtimes import get_engine  # noqa: E402
from edgeprop.trainer import TrainConfig, Trainer  # noqa: E402

pytestmark = [pytest.mark.slow, needs_litert_torch]  # engine venvs, the every-engine bundle

STEPS = 50
TOL = 1e-4
TRAIN = """
import json, sys
from edgeprop import bundle, datasets
from edgeprop.runtimes import get_engine
from edgeprop.storage import save_arrays
from edgeprop.trainer import TrainConfig, Trainer
b = bundle.load(sys.argv[1])
trainer = Trainer(b, get_engine(sys.argv[2]), datasets.load("digits", "train"), TrainConfig(epochs=2))
trainer.run(limit=int(sys.argv[3]), progress=False, checkpoints=False)
save_arrays(sys.argv[4], {u: trainer.unit_state(u)["param"] for u in trainer.state})
"""


def test_every_engine_trains_like_torch(engines_bundle, tmp_path):
    b = bundles.load(engines_bundle)
    data, config, limit = datasets.load("digits", "train"), TrainConfig(epochs=2), STEPS * len(b.units)
    reference = TorchReference(b, data, config)
    reference.run(limit)
    want = reference.params()
    got = {}
    for engine in ("onnxruntime", "litert", "native"):
        trainer = Trainer(b, get_engine(engine), data, config)
        trainer.run(limit=limit, progress=False, checkpoints=False)
        got[engine] = {u: trainer.state[u]["param"] for u in trainer.state}
    if "ort_training" in b.manifest:  # exported on x86-64 only: onnxruntime-training has no other wheels
        out = tmp_path / "ort.npz"
        subprocess.run([str(engine_venv("ort-training")), "-c", TRAIN, str(b.root), "ort-training", str(limit),
                        str(out)], check=True, cwd=ROOT, timeout=300)
        with np.load(out) as arrays:
            got["ort-training"] = {u: arrays[u] for u in arrays.files}
    start, _ = b.initial_state()
    moved = max(float(np.abs(want[u]["param"] - start[u]["param"]).max()) for u in want)
    assert moved > 100 * TOL, "the weights barely moved: the comparison would prove nothing"
    gaps = {engine: max(float(np.abs(params[u] - want[u]["param"]).max()) for u in want)
            for engine, params in got.items()}
    print(json.dumps(gaps))  # the note reports them: pytest -s tests/test_cross_engine.py
    assert all(gap <= TOL for gap in gaps.values()), gaps
