import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A child process in which `import torch` (and `import onnx`) raise ImportError: the device
# side needs neither.
DEVICE_SIDE = ("import sys; blocked = sys.argv.pop(1).split(','); sys.modules.update(dict.fromkeys(blocked)); "
               "from edgeprop.cli import main; code = main(sys.argv[1:]); "
               "loaded = [m for m in blocked if sys.modules.get(m) is not None]; "
               "assert not loaded, f'{loaded} imported'; "
               "sys.exit(code)")


def state_gap(weights, layout: dict, state: dict) -> float:
    """Largest difference between a C driver's flat state (laid out as its layout.json says)
    and a Python trainer's per-unit state."""
    assert len(weights) == layout["state_floats"]
    gap = 0.0
    for u in layout["units"]:
        for s, name in enumerate(u["slots"]):
            at = u["offset"] + s * u["n_params"]
            gap = max(gap, float(abs(weights[at:at + u["n_params"]] - state[u["name"]][name]).max()))
    return gap


def edgeprop(*args, torch_allowed=False, blocked=("torch", "onnx"), check=True, timeout=600, python=sys.executable):
    """Run the edgeprop CLI in a subprocess; on the device side, with torch and onnx made
    unimportable. `python`: another environment's interpreter (an engine's own venv)."""
    cmd = [python, "-m", "edgeprop", *map(str, args)] if torch_allowed else \
          [python, "-c", DEVICE_SIDE, ",".join(blocked), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"edgeprop {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory) -> Path:
    """The default NoProp-DT digits bundle (batch 64), exported once per session through the CLI."""
    out = tmp_path_factory.mktemp("bundles") / "digits"
    edgeprop("export", "--rule", "noprop-dt", "--model", "mlp", "--data", "digits", "--out", out, "--quiet",
             torch_allowed=True)
    return out


@pytest.fixture(scope="session")
def engines_bundle(tmp_path_factory) -> Path:
    """A small NoProp-DT digits bundle (2 blocks of width 48, batch 16) with every engine's
    files: .onnx graphs, their .tflite twins, and onnxruntime-training artifacts (x86-64)."""
    pytest.importorskip("litert_torch")
    from edgeprop.exporters import export
    ort = platform.machine() == "x86_64"  # onnxruntime-training has no other wheels
    if ort:
        engine_venv("ort-training")
    return export(tmp_path_factory.mktemp("engines") / "digits", blocks=2, width=48, batch_size=16, tflite=True,
                  ort_training=ort, progress=False)


@pytest.fixture
def bundle_copy(digits_bundle, tmp_path) -> Path:
    """A private copy of the digits bundle that a test may train, corrupt or delete from."""
    dst = tmp_path / "digits"
    shutil.copytree(digits_bundle, dst)
    return dst


def engine_venv(name: str) -> Path:
    """The interpreter of an engine's own virtual environment, built by the project's script
    (scripts/engine-venv.sh: once, then reused)."""
    proc = subprocess.run([str(ROOT / "scripts" / "engine-venv.sh"), name], capture_output=True, text=True,
                          timeout=1200)
    if proc.returncode != 0:
        raise AssertionError(f"scripts/engine-venv.sh {name} failed:\n{proc.stdout}\n{proc.stderr}")
    return ROOT / ".venvs" / name / "bin" / "python"
