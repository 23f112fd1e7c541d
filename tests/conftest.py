import collections
import contextlib
import importlib.util
import platform
import shutil
import subprocess
import sys
import threading
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

# litert_torch takes ten seconds to import: a module that needs it is skipped by looking it
# up, not by importing it while tests are collected.
needs_litert_torch = pytest.mark.skipif(importlib.util.find_spec("litert_torch") is None,
                                        reason="litert_torch is not installed (pip install 'edgeprop[tflite]')")


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


# Bundles that tests in several places read (a test that changes one copies it first), each
# exported once per test run through the CLI.
SHARED_BUNDLES = {
    "digits": ("--rule", "noprop-dt", "--model", "mlp", "--data", "digits"),  # the default
    # with the optional fused step graph too (tests/test_fused_step.py)
    "noprop-small": ("--rule", "noprop-dt", "--model", "mlp", "--data", "digits", "--blocks", "3", "--width", "32",
                     "--batch-size", "16", "--fused-step"),
}


def _export_args(name: str, out) -> tuple:
    return ("export", *SHARED_BUNDLES[name], "--out", out, "--quiet", "--force")


def _build_in(root: Path, name: str, build) -> Path:
    from filelock import FileLock
    with FileLock(str(root / f"{name}.lock")):
        if not (root / f"{name}.done").exists():
            build(root / name)
            (root / f"{name}.done").touch()
    return root / name


def built_once(tmp_path_factory, worker_id: str, name: str, build) -> Path:
    """`build(path)` once per test run, shared by every xdist worker: the first to need it
    builds it under a file lock while the others wait (each would otherwise spend its own
    seconds on the same export)."""
    root = tmp_path_factory.getbasetemp()
    return _build_in(root if worker_id == "master" else root.parent, name, build)


_early: list[subprocess.Popen] = []


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """xdist's controller starts the shared exports at once: they run while the workers start
    and collect, instead of one worker idling while another exports."""
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", None):
        return

    def build(out):
        _early.append(subprocess.Popen([sys.executable, "-m", "edgeprop", *map(str, _export_args(out.name, out))],
                                       cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if _early[-1].wait():
            raise RuntimeError("the early export failed: the worker that needs it exports again and says why")

    def run():  # one export at a time: the workers need the other core
        for name in SHARED_BUNDLES:
            with contextlib.suppress(Exception):
                _build_in(config._tmp_path_factory.getbasetemp(), name, build)

    threading.Thread(target=run, daemon=True).start()


SHARED_FIXTURES = {"digits_bundle", "bundle_copy", "trained_digits", "small_noprop_bundle"}


def pytest_collection_modifyitems(config, items):
    """Test files that need none of the shared bundles first, largest first (xdist's own order,
    turned off in pyproject.toml): workers run them while the early exports finish."""
    waits = {item.path for item in items if SHARED_FIXTURES & set(getattr(item, "fixturenames", ()))}
    size = collections.Counter(item.path for item in items)
    items.sort(key=lambda item: (item.path in waits, -size[item.path]))


def pytest_unconfigure(config):
    for export in _early:
        if export.poll() is None:  # a run that never needed it
            export.kill()
            export.wait()


def _shared_bundle(tmp_path_factory, worker_id, name: str) -> Path:
    return built_once(tmp_path_factory, worker_id, name,
                      lambda out: edgeprop(*_export_args(name, out), torch_allowed=True))


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory, worker_id) -> Path:
    """The default NoProp-DT digits bundle (batch 128). Tests that change it take `bundle_copy`."""
    return _shared_bundle(tmp_path_factory, worker_id, "digits")


@pytest.fixture(scope="session")
def small_noprop_bundle(tmp_path_factory, worker_id) -> Path:
    """NoProp-DT on digits with 3 MLP blocks of width 32, batch 16: quick to train a little."""
    return _shared_bundle(tmp_path_factory, worker_id, "noprop-small")


@pytest.fixture(scope="session")
def trained_digits(digits_bundle, tmp_path_factory, worker_id) -> Path:
    """The digits bundle after one epoch of `edgeprop train` (a checkpoint on disk)."""
    def build(out):
        shutil.copytree(digits_bundle, out, dirs_exist_ok=True)
        edgeprop("train", out, "--epochs", "1", "--quiet")
    return built_once(tmp_path_factory, worker_id, "digits-trained", build)


@pytest.fixture(scope="session")
def engines_bundle(tmp_path_factory, worker_id) -> Path:
    """A small NoProp-DT digits bundle (2 blocks of width 48, batch 16) with every engine's
    files: .onnx graphs, their .tflite twins, and onnxruntime-training artifacts (x86-64).
    Exported once per run: its .tflite conversion alone is ~40 CPU seconds."""
    pytest.importorskip("litert_torch")
    from edgeprop.exporters import export
    ort = platform.machine() == "x86_64"  # onnxruntime-training has no other wheels
    if ort:
        engine_venv("ort-training")
    return built_once(tmp_path_factory, worker_id, "engines", lambda out: export(
        out, blocks=2, width=48, batch_size=16, tflite=True, ort_training=ort, progress=False))


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
