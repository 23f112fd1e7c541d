"""`edgeprop deploy`: the folder, its checksums, the checks made on the desktop, and the
round trip on an emulated arm64 device (skipped, saying why, where its tools are missing)."""
import shutil
import time
from pathlib import Path

import aarch64  # noqa: I001  (tests/aarch64.py)
import numpy as np
import pytest

from conftest import ROOT, edgeprop
from edgeprop.errors import EdgepropError
from edgeprop.storage import load_arrays
from edgeprop.targets.python import check_checksums

pytestmark = pytest.mark.slow  # wheelhouses and qemu

ENGINE_UNDER_QEMU = "1.20.1"  # onnxruntime 1.32 for aarch64 segfaults on import under qemu-user 7.2


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "small"
    edgeprop("export", "--out", out, "--blocks", "3", "--width", "32", "--batch-size", "64", "--quiet",
             torch_allowed=True)
    return out


@pytest.fixture(scope="module")
def rpi5_folder(small_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "rpi5"
    edgeprop("deploy", small_bundle, "--device", "rpi5", "--out", out, "--engine-version", ENGINE_UNDER_QEMU)
    return out


def test_deploy_folder_holds_bundle_wheels_scripts_and_checksums(rpi5_folder, small_bundle):
    names = {p.name for p in rpi5_folder.iterdir()}
    assert names == {"bundle", "device.toml", "wheels", "setup", "train", "eval", "SHA256SUMS", ".edgeprop-output"}
    wheels = {p.name.split("-")[0] for p in (rpi5_folder / "wheels").iterdir()}
    assert {"edgeprop", "numpy", "onnxruntime"} <= wheels and "torch" not in wheels
    engine = next((rpi5_folder / "wheels").glob("onnxruntime-*.whl")).name
    assert engine.startswith(f"onnxruntime-{ENGINE_UNDER_QEMU}-cp311-") and "aarch64" in engine
    assert all("aarch64" in w.name or w.name.endswith("-none-any.whl") for w in (rpi5_folder / "wheels").iterdir())
    assert not (rpi5_folder / "bundle" / "checkpoints").exists()
    assert (rpi5_folder / "bundle" / "manifest.json").read_bytes() == (small_bundle / "manifest.json").read_bytes()
    listed = {line.split("  ", 1)[1] for line in (rpi5_folder / "SHA256SUMS").read_text().splitlines()}
    files = {p.relative_to(rpi5_folder).as_posix() for p in rpi5_folder.rglob("*") if p.is_file()}
    assert listed == files - {"SHA256SUMS", ".edgeprop-output"}  # the marker says who wrote the folder, no more
    check_checksums(rpi5_folder)
    assert "--device" in (rpi5_folder / "train").read_text()
    assert (rpi5_folder / "setup").stat().st_mode & 0o111


def test_a_modified_file_fails_the_checksums(rpi5_folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(rpi5_folder, copy)
    (copy / "bundle" / "manifest.json").write_text("{}")
    with pytest.raises(EdgepropError, match="manifest.json: checksum"):
        check_checksums(copy)


def rpi5_but(tmp_path, old: str, new: str):
    """A user profile: the Raspberry Pi 5's, with one line changed."""
    path = tmp_path / "board.toml"
    path.write_text((ROOT / "devices" / "rpi5.toml").read_text().replace(old, new))
    return path


def test_a_device_that_cannot_fit_is_refused(small_bundle, tmp_path):
    tiny = rpi5_but(tmp_path, 'ram = "4 GiB"', 'ram = "64 MiB"')
    proc = edgeprop("deploy", small_bundle, "--device", tiny, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "does not fit device rpi5" in proc.stderr and "short" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_no_engine_wheel_for_the_device_is_an_error_at_deploy_time(small_bundle, tmp_path):
    # A RISC-V board: PyPI has no onnxruntime wheel for it.
    riscv = rpi5_but(tmp_path, 'arch = "aarch64"', 'arch = "riscv64"')
    proc = edgeprop("deploy", small_bundle, "--device", riscv, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "no wheels of onnxruntime" in proc.stderr and "riscv64" in proc.stderr
    assert not (tmp_path / "out").exists()
    # The Jetson Nano's JetPack 4 Python (3.6) is too old for edgeprop itself.
    proc = edgeprop("deploy", small_bundle, "--device", "jetson-nano", "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "Python 3.6" in proc.stderr
    # An engine too old for the bundle's opset.
    proc = edgeprop("deploy", small_bundle, "--device", "rpi5", "--out", tmp_path / "out", "--engine-version",
                    "1.10.0", check=False)
    assert proc.returncode == 2 and "opset 18" in proc.stderr


def test_microcontrollers_are_not_python_deploy_targets(small_bundle, tmp_path):
    proc = edgeprop("deploy", small_bundle, "--device", "stm32f746", "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "mcu device" in proc.stderr


def test_deployed_folder_trains_on_emulated_aarch64_like_on_x86(rpi5_folder, tmp_path):
    """The arm64 round trip: install the folder's wheels under qemu, train one epoch, and
    compare the weights with the same bundle trained here from the same seed."""
    why = aarch64.missing_tools()
    if why:
        pytest.skip(f"emulated aarch64 round trip skipped: {why}")
    started = time.monotonic()
    root = aarch64.root_filesystem()
    site = tmp_path / "site"
    aarch64.install(root, rpi5_folder, site)
    device = tmp_path / "device"
    shutil.copytree(rpi5_folder, device)
    check = aarch64.python(root, "-c", "import platform, onnxruntime, sys; "
                                       "print(platform.machine(), onnxruntime.__version__, 'torch' in sys.modules)",
                           cwd=device, env={"PYTHONPATH": str(site)})
    assert check.stdout.split() == ["aarch64", ENGINE_UNDER_QEMU, "False"], check.stderr
    # What ./train runs on the device, with the profile's budget check before training.
    proc = aarch64.python(root, "-m", "edgeprop", "train", device / "bundle", "--device", device / "device.toml",
                          "--data", "digits", "--epochs", "1", "--quiet", cwd=device, env={"PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr
    here = tmp_path / "x86"
    shutil.copytree(rpi5_folder / "bundle", here)
    edgeprop("train", here, "--data", "digits", "--epochs", "1", "--quiet")
    (arm, arm_meta), (x86, _) = load_arrays(device / "bundle/checkpoints/last.npz"), \
        load_arrays(here / "checkpoints/last.npz")
    assert arm_meta["done"] == 88  # 22 batches x (3 blocks + head)
    gap = max(float(np.abs(arm[k] - x86[k]).max()) for k in x86)
    assert gap <= 1e-4, gap
    print(f"aarch64 round trip: largest weight difference {gap:.2g}, {time.monotonic() - started:.0f} s")


def test_setup_and_train_scripts_run_offline_on_an_x86_64_device(small_bundle, tmp_path):
    """The scripts themselves, on a device this machine can be: an x86-64 Linux board."""
    import subprocess
    import sys
    board = rpi5_but(tmp_path, 'arch = "aarch64"', 'arch = "x86_64"')
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    board.write_text(board.read_text().replace('python = "3.11"', f'python = "{python}"'))
    folder = tmp_path / "board"
    edgeprop("deploy", small_bundle, "--device", board, "--out", folder)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PIP_NO_INDEX": "1", "HOME": str(tmp_path)}
    setup = subprocess.run([folder / "setup"], capture_output=True, text=True, env=env, timeout=600)
    assert setup.returncode == 0, setup.stderr
    assert "verdict: FITS" in setup.stdout          # the device checks the plan itself
    train = subprocess.run([folder / "train", "--data", "digits", "--epochs", "1", "--quiet"], capture_output=True,
                           text=True, env=env, timeout=600)
    assert train.returncode == 0, train.stderr
    assert (folder / "bundle/checkpoints/last.npz").is_file()
    evaluate = subprocess.run([folder / "eval", "--data", "digits", "--json"], capture_output=True, text=True,
                              env=env, timeout=600)
    assert evaluate.returncode == 0 and '"accuracy"' in evaluate.stdout, evaluate.stderr
    installed = {p.name.split("-")[0].lower() for p in (folder / ".venv").glob("lib/python*/site-packages/*.dist-info")}
    assert {"edgeprop", "numpy", "onnxruntime"} <= installed and "torch" not in installed


def test_fleet_deploy_adds_flower_wheels_and_a_supernode_script(small_bundle, tmp_path):
    out = tmp_path / "fleet"
    edgeprop("deploy", small_bundle, "--device", "rpi5", "--out", out, "--engine-version", ENGINE_UNDER_QEMU, "--fleet")
    wheels = {p.name.split("-")[0].lower() for p in (out / "wheels").iterdir()}
    assert {"edgeprop", "onnxruntime", "flwr", "grpcio", "protobuf"} <= wheels and "torch" not in wheels
    assert "ray" not in wheels  # a SuperNode needs no simulation engine
    assert all("aarch64" in w.name or w.name.endswith("-none-any.whl") for w in (out / "wheels").iterdir())
    assert "'edgeprop[fleet]'" in (out / "setup").read_text()
    script = (out / "supernode").read_text()
    assert "fleet join" in script and "FLWR_TELEMETRY_ENABLED=0" in script and "device.toml" in script
    assert (out / "supernode").stat().st_mode & 0o111
    check_checksums(out)
    proc = edgeprop("deploy", small_bundle, "--device", "stm32f746", "--out", tmp_path / "mcu", "--target", "c99",
                    "--fleet", check=False)
    assert proc.returncode == 2 and "--fleet needs the python target" in proc.stderr
