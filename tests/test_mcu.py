"""The c99 target: every graph compiled to C agrees with onnxruntime; the firmware trains a
small NoProp-DT digits model block by block, natively (gcc) and on an emulated Cortex-M7
(arm-none-eabi-gcc, qemu-system-arm mps2-an500) inside a 256 KB SRAM link, and its weights
match edgeprop's own numpy/onnxruntime training from the same seed; a RAM too small for the
arena fails the build, naming the sizes. The Arm tools come from Debian through
scripts/install-mcu-tools.sh (run here); without them the emulated tests are skipped, saying why."""
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import ROOT, edgeprop, state_gap
from edgeprop import bundle as bundles
from edgeprop.datasets import load as load_data
from edgeprop.devices import load_profile
from edgeprop.runtimes import get_engine
from edgeprop.trainer import TrainConfig, Trainer, evaluate

firmware = pytest.importorskip("edgeprop.targets.c99")
pytest.importorskip("emx_onnx_cgen")

pytestmark = pytest.mark.slow  # emx-onnx-cgen, the Arm toolchain and qemu
EPOCHS, SEED, TRAIN, TEST = 2, 3, 200, 100


def profile(tmp_path, ram: str):
    """The STM32F746's profile with another SRAM size."""
    path = tmp_path / f"board-{ram.replace(' ', '')}.toml"
    path.write_text((ROOT / "devices" / "stm32f746.toml").read_text().replace('ram = "320 KiB"', f'ram = "{ram}"'))
    return load_profile(str(path))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edgeprop.exporters import export
    return export(tmp_path_factory.mktemp("mcu") / "small", blocks=2, width=16, batch_size=16, progress=False)


@pytest.fixture(scope="module")
def fw(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("mcu") / "fw"
    firmware.write_firmware(bundle, profile(tmp_path_factory.mktemp("profiles"), "256 KiB"), out,
                            train_samples=TRAIN, test_samples=TEST, epochs=EPOCHS, seed=SEED)
    return out


@pytest.fixture(scope="module")
def host(bundle, fw, tmp_path_factory):
    """`edgeprop train BUNDLE --data fw/data.npz --order block-sequential` on onnxruntime."""
    copy = tmp_path_factory.mktemp("mcu") / "host"
    shutil.copytree(bundle, copy)
    b = bundles.load(copy)
    engine = get_engine("onnxruntime", threads=1)
    trainer = Trainer(b, engine, load_data(str(fw / "data.npz"), "train"),
                      TrainConfig(epochs=EPOCHS, order="block-sequential", seed=SEED))
    trainer.run(progress=False, checkpoints=False)
    report = evaluate(b, engine, load_data(str(fw / "data.npz"), "test"), trainer.state)
    assert report["temperature"] == 0.0  # the bundle's default: the mean chain
    accuracy = {"accuracy": report["accuracy"], "accuracy_sampled": report["accuracy_sampled"]}
    losses = {u: [total / n for total, n in log] for u, log in trainer.history.items()}
    return trainer.state, accuracy, losses


def weight_gap(fw, run_folder, state) -> float:
    layout = json.loads((fw / "layout.json").read_text())
    return state_gap(np.fromfile(run_folder / "weights.bin", np.float32), layout, state)


def same_chains(got: dict, host: dict) -> None:
    """The firmware's mean chain (the bundle's τ 0) and sampled chain (τ 1) against the host's
    on the same test subset and inference seed: the same noise, the weights within 1e-4, so
    at most a sample whose logits tie to float rounding may differ."""
    for key in ("accuracy", "accuracy_sampled"):
        assert got[key] == pytest.approx(host[key], abs=1.5 / TEST), (key, got, host)


def test_every_graph_compiles_to_c_that_matches_onnxruntime(bundle, fw):
    """Each step and inference graph, built with host gcc, run in place (next.K over K) as the
    driver runs it, against the original graph in onnxruntime: on a mid-training state, and on
    the initial one (AdamW slots all zero: 0/(0 + eps), never NaN)."""
    import onnxruntime as ort
    b = bundles.load(bundle)
    init, _ = b.initial_state()
    rng = np.random.default_rng(0)
    report = json.loads((fw / "layout.json").read_text())["graphs"]
    for key, spec in b.graphs.items():
        unit = next(u for u in b.units if key in (u.step_graph, u.infer_graph))
        for fresh in (False, True):
            feeds = {}
            for t in spec.inputs:
                if t.name in init[unit.name]:
                    slot = {"param": 0.0, "opt.m": 1e-3, "opt.v": 1e-4}[t.name]
                    noise = 0 if fresh else slot * np.abs(rng.normal(size=t.shape)) + 1e-6 * (t.name == "opt.v")
                    feeds[t.name] = (init[unit.name][t.name] + noise).astype(np.float32)
                elif t.name == "mask":  # a padded last batch
                    feeds[t.name] = (np.arange(t.shape[0]) < t.shape[0] - 3).astype(np.float32)
                elif t.name in ("lr", "step", "loss_scale"):
                    feeds[t.name] = np.array({"lr": 1e-3, "step": 1 if fresh else 3, "loss_scale": 0.5}[t.name],
                                             np.float32)
                else:
                    feeds[t.name] = rng.normal(size=t.shape).astype(np.float32)
            expected = ort.InferenceSession(str(b.graph_path(key))).run(None, feeds)
            graph = firmware.GraphC(key, f"graphs/{key}.c", [t.name for t in spec.inputs],
                                    [t.name for t in spec.outputs], report[key]["scratch"], 0, 0)
            got = firmware.run_graph_c(fw, b, graph, feeds)
            for out, want in zip(graph.outputs, expected):
                assert np.all(np.isfinite(got[out])), (key, out)
                # From zero slots, AdamW's first step is lr * g / (|g| + eps): a gradient at float
                # noise level may differ in sign between engines, so allow lr there.
                atol = 1e-3 if fresh and out == "next.param" else 1e-6
                np.testing.assert_allclose(got[out], want, rtol=1e-5, atol=atol, err_msg=f"{key}: {out}")
        text = (fw / graph.file).read_text()
        assert "malloc" not in text and "edgeprop_scratch +" in text
        # The liveness plan shares bytes: a step graph's scratch is far less than one buffer each.
        assert report[key]["scratch"] < report[key]["one_buffer_each"] / (4 if "step" in key else 1), report[key]


def test_firmware_folder(fw):
    names = {p.name for p in fw.iterdir()}
    assert {"Makefile", "link.ld", "model.c", "model.h", "driver.c", "prng.h", "startup.c", "graphs", "data.npz",
            "layout.json"} <= names
    link = (fw / "link.ld").read_text()
    assert f"LENGTH = {256 * 1024}" in link and f"LENGTH = {1024 * 1024}" in link  # RAM, flash from the profile
    data = np.load(fw / "data.npz")
    assert len(data["y_train"]) == TRAIN and len(data["y_test"]) == TEST


def test_native_build_trains_like_the_host(fw, host, tmp_path):
    if shutil.which("cc") is None:
        pytest.skip("no host C compiler")
    run = tmp_path / "native"
    shutil.copytree(fw, run)
    proc = subprocess.run(["make", "-s", "run-host"], cwd=run, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = firmware.results(proc.stdout)
    state, accuracy, losses = host
    assert got.get("done") and weight_gap(fw, run, state) <= 1e-4
    same_chains(got, accuracy)
    for unit, per_epoch in losses.items():
        np.testing.assert_allclose(got["loss"][unit], per_epoch, rtol=1e-4)


def arm_tools():
    proc = subprocess.run([str(ROOT / "scripts" / "install-mcu-tools.sh")], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"emulated Cortex-M tests skipped: scripts/install-mcu-tools.sh failed: {proc.stderr[-500:]}")


def test_emulated_cortex_m7_trains_in_256kb_like_the_host(fw, host, tmp_path):
    arm_tools()
    run = tmp_path / "arm"
    shutil.copytree(fw, run)
    build = subprocess.run(["make", "-s"], cwd=run, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    sizes = dict(re.findall(r"fw\.elf \.(\w+) (\d+) bytes", build.stdout))
    sram = sum(int(sizes[s]) for s in ("data", "bss", "stack"))
    assert sram <= 256 * 1024, sizes
    proc = subprocess.run(["make", "-s", "run"], cwd=run, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = firmware.results(proc.stdout + proc.stderr)
    state, accuracy, losses = host
    gap = weight_gap(fw, run, state)
    assert got.get("done") and gap <= 1e-4, gap
    same_chains(got, accuracy)
    for unit, per_epoch in losses.items():
        np.testing.assert_allclose(got["loss"][unit], per_epoch, rtol=1e-4)
    assert 0 < got["stack"][0] <= 8192 and all(ticks > 0 for _, ticks in got["ticks"].values())
    print(f"Cortex-M7 (qemu): weights within {gap:.2g} of the host run; SRAM {sram} bytes; "
          f"accuracy {got['accuracy']:.3f} (mean chain; host {accuracy['accuracy']:.3f}), sampled chain "
          f"{got['accuracy_sampled']:.3f} (host {accuracy['accuracy_sampled']:.3f})")


def test_an_arena_that_cannot_fit_fails_the_build(bundle, tmp_path):
    arm_tools()
    out = tmp_path / "tiny"
    report = firmware.write_firmware(bundle, profile(tmp_path, "40 KiB"), out, train_samples=TRAIN,
                                     test_samples=TEST, epochs=1)
    arena = report["sram"]["arena"]
    assert arena > 40 * 1024 and "does NOT fit" in firmware.summary(report, out)
    build = subprocess.run(["make", "-s"], cwd=out, capture_output=True, text=True, timeout=300)
    assert build.returncode != 0 and not (out / "fw.elf").exists()
    assert "region `RAM' overflowed by" in build.stderr  # the linker names the overflow
    assert f"SRAM arena ({arena} bytes)" in build.stderr and f"RAM ({40 * 1024} bytes)" in build.stderr


def test_c99_target_is_for_microcontrollers_only(bundle, tmp_path):
    proc = edgeprop("deploy", bundle, "--device", "rpi5", "--target", "c99", "--out", tmp_path / "out",
                    torch_allowed=True, check=False)
    assert proc.returncode == 2 and "for microcontrollers" in proc.stderr
    assert not (tmp_path / "out").exists()
