"""`deploy --target native`: a folder that trains on a Linux device with no Python. Built here
with gcc (x86-64) and cross-compiled for a Raspberry Pi Zero 2 W (Debian's
gcc-aarch64-linux-gnu, from scripts/install-emulators.sh) and run under qemu-aarch64-static,
`./train` ends with the weights that edgeprop's own Python trainer reaches from the same seed
in the same (interleaved) order; a run stopped part-way resumes from its atomic checkpoint to
the very same bits."""
import json
import shutil
import subprocess

import numpy as np
import pytest

from conftest import ROOT, edgeprop, state_gap
from edgeprop import bundle as bundles
from edgeprop.datasets import load as load_data
from edgeprop.devices import load_profile
from edgeprop.errors import EdgepropError
from edgeprop.runtimes import get_engine
from edgeprop.targets import native
from edgeprop.targets.c99 import results
from edgeprop.trainer import TrainConfig, Trainer, evaluate

EPOCHS, SEED, TRAIN, TEST = 2, 3, 200, 100


def test_data_file_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    for x in (rng.integers(0, 256, (5, 2, 3)).astype(np.uint8), rng.standard_normal((5, 6)).astype(np.float32)):
        y = rng.integers(0, 10, 5)
        native.write_data(tmp_path / "d.bin", x, y, x[:2], y[:2])
        back = native.read_data(tmp_path / "d.bin")
        np.testing.assert_array_equal(back["x_train"], x.reshape(5, 6))
        np.testing.assert_array_equal(back["y_test"], y[:2])
        assert back["x_train"].dtype == (np.uint8 if x.dtype == np.uint8 else np.float32)


def test_native_target_is_for_linux_devices_only():
    with pytest.raises(EdgepropError, match="for Linux devices; stm32f746 is a mcu device"):
        native.Target().check(None, load_profile("stm32f746"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    pytest.importorskip("emx_onnx_cgen")
    from edgeprop.exporters import export
    return export(tmp_path_factory.mktemp("native") / "small", blocks=2, width=16, batch_size=16, progress=False)


@pytest.fixture(scope="module")
def folder(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("native") / "rpi"
    native.write_folder(bundle, load_profile("rpi-zero-2w"), out, train_samples=TRAIN, test_samples=TEST,
                        epochs=EPOCHS, seed=SEED)
    return out


@pytest.fixture(scope="module")
def host(bundle, folder, tmp_path_factory):
    """`edgeprop train` (interleaved, onnxruntime) on the folder's data.bin, and its accuracy."""
    where = tmp_path_factory.mktemp("native")
    np.savez(where / "data.npz", **native.read_data(folder / "data.bin"))
    shutil.copytree(bundle, where / "bundle")
    b, engine = bundles.load(where / "bundle"), get_engine("onnxruntime", threads=1)
    trainer = Trainer(b, engine, load_data(str(where / "data.npz"), "train"), TrainConfig(epochs=EPOCHS, seed=SEED))
    trainer.run(progress=False, checkpoints=False)
    report = evaluate(b, engine, load_data(str(where / "data.npz"), "test"), trainer.state)
    return trainer.state, report


def build(folder, tmp_path, *make_args):
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    proc = subprocess.run(["make", "-s", *make_args], cwd=run, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def weight_gap(run, state) -> float:
    return state_gap(native.read_checkpoint_state(run), json.loads((run / "layout.json").read_text()), state)


def trains_like_the_host(run, host, prefix=()):
    train = subprocess.run([*prefix, "./train"], cwd=run, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    assert results(train.stdout).get("done")
    state, report = host
    gap = weight_gap(run, state)
    assert gap <= 1e-4, gap
    got = results(subprocess.run([*prefix, "./eval"], cwd=run, capture_output=True, text=True, check=True,
                                 timeout=600).stdout)
    for key in ("accuracy", "accuracy_sampled"):  # the same noise; logits within float rounding
        assert got[key] == pytest.approx(report[key], abs=1.5 / TEST), (key, got, report)
    return gap


@pytest.mark.slow
def test_host_build_trains_like_python_and_resumes_to_the_same_bits(folder, host, tmp_path):
    run = build(folder, tmp_path, "CPU=-march=native")  # the profile's flags are the Pi's
    trains_like_the_host(run, host)
    whole = native.read_checkpoint_state(run).copy()
    (run / "checkpoint.bin").unlink()
    stopped = subprocess.run(["./train", "--steps", "40", "--checkpoint-every", "7"], cwd=run, capture_output=True,
                             text=True, check=True)
    assert "ep done" not in stopped.stdout and not (run / "checkpoint.bin.tmp").exists()
    resumed = subprocess.run(["./train"], cwd=run, capture_output=True, text=True, check=True)
    assert "resumed at 40 of" in resumed.stdout and "ep done" in resumed.stdout
    np.testing.assert_array_equal(native.read_checkpoint_state(run), whole)


@pytest.mark.slow
def test_block_sequential_order_reaches_the_same_weights(bundle, host, tmp_path):
    """NoProp-DT's units draw their noise by (epoch, batch, unit): the order changes nothing."""
    out = tmp_path / "sequential"
    native.write_folder(bundle, load_profile("rpi-zero-2w"), out, train_samples=TRAIN, test_samples=TEST,
                        epochs=EPOCHS, seed=SEED, order="block-sequential")
    assert "#define EP_INTERLEAVED 0" in (out / "model.h").read_text()
    trains_like_the_host(build(out, tmp_path, "CPU=", "BLAS=0"), host)


@pytest.mark.slow
def test_bad_input_is_refused_in_one_line_before_training(folder, tmp_path):
    run = build(folder, tmp_path, "CPU=", "BLAS=0")
    bad = subprocess.run(["./train", "--steps", "zero"], cwd=run, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --steps takes a positive whole number, got 'zero'"
    data = (run / "data.bin").read_bytes()
    (run / "data.bin").write_bytes(data[:-1])
    short = subprocess.run(["./train"], cwd=run, capture_output=True, text=True)
    assert short.returncode == 2 and short.stderr.strip() == "error: data.bin: shorter than its header says"
    (run / "data.bin").write_bytes(data)
    (run / "checkpoint.bin").write_bytes(b"EPCKPT1\0" + bytes(100))
    foreign = subprocess.run(["./eval"], cwd=run, capture_output=True, text=True)
    assert foreign.returncode == 2 and "another bundle or other run settings" in foreign.stderr


@pytest.mark.slow
def test_cross_compiled_for_the_pi_trains_under_qemu_like_python(folder, host, tmp_path):
    tools = subprocess.run([str(ROOT / "scripts" / "install-emulators.sh")], capture_output=True, text=True,
                           timeout=900)
    if tools.returncode != 0 or shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip(f"scripts/install-emulators.sh could not install gcc-aarch64-linux-gnu: {tools.stderr[-300:]}")
    # the profile's -mcpu=cortex-a53; no arm64 OpenBLAS here, so the generated loops
    run = build(folder, tmp_path, "CC=aarch64-linux-gnu-gcc", "LDFLAGS=-static")
    assert (run / "train").read_bytes()[18:20] == (183).to_bytes(2, "little")  # ELF e_machine: EM_AARCH64
    gap = trains_like_the_host(run, host, prefix=("qemu-aarch64-static",))
    print(f"aarch64 (qemu): weights within {gap:.2g} of the Python run")


@pytest.mark.slow
def test_deploy_cli_writes_the_folder_and_refuses_an_op_it_cannot_compile(bundle, tmp_path):
    proc = edgeprop("deploy", bundle, "--device", "stm32f746", "--target", "native", "--out", tmp_path / "mcu",
                    torch_allowed=True, check=False)
    assert proc.returncode == 2 and "for Linux devices" in proc.stderr and not (tmp_path / "mcu").exists()
    from onnx import TensorProto, helper, save
    graph = helper.make_graph([helper.make_node("Multinomial", ["x"], ["y"])], "sampler",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 1])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "sampler.onnx")
    with pytest.raises(EdgepropError, match="cannot compile op Multinomial"):
        native.generate(tmp_path / "sampler.onnx", tmp_path / "sampler.c", "ep_sampler", "sampler", ["x"], ["y"],
                        "", in_place=True, guard="EP_BLAS")
