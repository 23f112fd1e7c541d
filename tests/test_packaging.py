"""The wheel a device installs: one distribution, folders mapped into the edgeprop namespace,
the digits data inside, and numpy + onnxruntime as the only core dependencies."""
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"building the wheel failed:\n{proc.stderr[-2000:]}"
    (path,) = out.glob("edgeprop-*.whl")
    return zipfile.ZipFile(path)


def test_folders_are_installed_only_inside_the_edgeprop_namespace(wheel):
    names = wheel.namelist()
    for module in ("edgeprop/runtimes/onnxruntime.py", "edgeprop/exporters/trace.py", "edgeprop/devices/__init__.py",
                   "edgeprop/devices/rpi-zero-2w.toml", "edgeprop/data/digits.npz", "edgeprop/cli/__init__.py",
                   "edgeprop/cli/train.py", "edgeprop/targets/python.py", "edgeprop/targets/c99.py",
                   "edgeprop/targets/c99/driver.c", "edgeprop/targets/c99/link.ld.in", "edgeprop/fleet/client.py"):
        assert module in names, module
    top_level = {n.split("/")[0] for n in names if not n.startswith("edgeprop-")}
    assert top_level == {"edgeprop"}, top_level


def test_core_dependencies_are_numpy_and_onnxruntime(wheel):
    (meta,) = [n for n in wheel.namelist() if n.endswith("METADATA")]
    requires = [line.split(":", 1)[1].strip() for line in wheel.read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    core = sorted(r.split(">")[0].split("=")[0].split(";")[0].strip() for r in requires
                  if "extra ==" not in r and "python_version" not in r)
    assert core == ["numpy", "onnxruntime"]
    # Device profiles are TOML: the standard library reads them from Python 3.11 on.
    assert [r for r in requires if "python_version" in r and "extra ==" not in r] == \
        ['tomli>=1.1; python_version < "3.11"']
    assert any("torch" in r and 'extra == "export"' in r for r in requires)
