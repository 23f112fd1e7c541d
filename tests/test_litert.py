"""The litert engine on a device that has no onnxruntime and no torch: ai_edge_litert in its
own environment, and the tflite_runtime fallback (tflite-runtime 2.14, numpy < 2) in another.
Both environments are built by scripts/engine-venv.sh, as a user would."""
import json
import shutil

import numpy as np
import pytest

from conftest import edgeprop, engine_venv, needs_litert_torch
from edgeprop.storage import load_arrays

pytestmark = [pytest.mark.slow, needs_litert_torch]  # engine venvs

# Neither environment has these installed; importing one would fail anyway, but a module
# that tried would show here by name.
ABSENT = ("torch", "onnx", "onnxruntime")
WHICH = ("import sys, numpy; import edgeprop.runtimes.litert as L; "
         "print(L.PACKAGE, numpy.__version__, *[m for m in sys.argv[1:] if __import__('importlib.util').util"
         ".find_spec(m)])")


def _python_facts(python):
    import subprocess
    proc = subprocess.run([str(python), "-c", WHICH, *ABSENT], capture_output=True, text=True, check=True)
    package, numpy_version, *installed = proc.stdout.split()
    return package, numpy_version, installed


def test_litert_engine_trains_digits_without_onnxruntime(engines_bundle, tmp_path):
    python = engine_venv("litert")
    package, _, installed = _python_facts(python)
    assert package == "ai_edge_litert" and installed == [], (package, installed)
    bundle = shutil.copytree(engines_bundle, tmp_path / "digits")
    edgeprop("train", bundle, "--engine", "litert", "--data", "digits", "--epochs", "10", "--quiet",
             python=python, blocked=ABSENT)
    report = json.loads(edgeprop("eval", bundle, "--engine", "litert", "--data", "digits", "--json",
                                 python=python, blocked=ABSENT).stdout)
    assert report["accuracy"] >= 0.92, report  # measured 0.958 (2 blocks of width 48, 10 epochs)


def test_tflite_runtime_fallback_runs_the_same_steps(engines_bundle, tmp_path):
    """tflite_runtime (numpy 1.x) takes the same steps as ai_edge_litert."""
    trained = {}
    for name in ("tflite-runtime", "litert"):
        python = engine_venv(name)
        package, numpy_version, installed = _python_facts(python)
        assert installed == [], installed
        if name == "tflite-runtime":
            assert package == "tflite_runtime" and numpy_version.startswith("1."), (package, numpy_version)
        bundle = shutil.copytree(engines_bundle, tmp_path / name)
        edgeprop("train", bundle, "--engine", "litert", "--data", "digits", "--epochs", "1", "--quiet",
                 python=python, blocked=ABSENT)
        trained[name], _ = load_arrays(bundle / "checkpoints" / "last.npz")
    old, new = trained["tflite-runtime"], trained["litert"]
    assert old.keys() == new.keys()
    for key in old:
        np.testing.assert_allclose(old[key], new[key], rtol=0, atol=1e-4, err_msg=key)
    init, _ = load_arrays(engines_bundle / "state" / "init.npz")
    assert not np.allclose(old["block1/param"], init["block1/param"]), "no step was taken"


def test_a_bundle_without_tflite_graphs_is_a_clear_error(digits_bundle):
    proc = edgeprop("train", digits_bundle, "--engine", "litert", "--epochs", "1", check=False)
    assert proc.returncode != 0 and "no .tflite graphs" in proc.stderr and "--tflite" in proc.stderr


# The XNNPACK delegate's own memory: an interpreter of the graph (the second in the process,
# after the first brought the environment) with the default delegates, less one without.
_XNNPACK = """
import sys, numpy as np
from edgeprop import rss
from ai_edge_litert.interpreter import Interpreter, OpResolverType
def held(path, delegates):
    kw = {} if delegates else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    def one():
        it = Interpreter(model_path=path, num_threads=1, **kw)
        it.allocate_tensors()
        run = it.get_signature_runner()
        feeds = {k: np.zeros(d["shape"], d["dtype"]) for k, d in run.get_input_details().items()}
        for _ in range(2):
            run(**feeds)
        return it, run
    first = one()
    before = rss.current()
    second = one()
    return rss.current() - before
print(held(sys.argv[1], True) - held(sys.argv[1], False))
"""


def test_xnnpack_workspace_is_planned(engines_bundle):
    """litert's plan holds XNNPACK's workspace beside TFLite's arena: without it the block
    step's delegate memory (measured 294 KB at batch 16, live peak 268 KB) was planned as 0."""
    import subprocess

    from edgeprop import bundle as bundles
    from edgeprop.memory import _peak, graph_facts
    from edgeprop.runtimes import memory_model
    bundle = bundles.load(engines_bundle)
    peak = _peak(graph_facts(bundle, "block_step")["peak"], bundle.batch_size)
    lite = memory_model("litert")
    planned = lite.arena(peak) - peak
    proc = subprocess.run([str(engine_venv("litert")), "-c", _XNNPACK, str(bundle.graph_path("block_step", ".tflite"))],
                          capture_output=True, text=True, check=True)
    measured = int(proc.stdout.split()[-1])
    assert 0.6 <= measured / planned <= 1.4, (measured, planned)
