"""The memory planner: liveness arithmetic, batch scaling, planned vs measured, budgets,
streaming, device profiles, and plain ONNX models brought by the user."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import edgeprop
from edgeprop import bundle as bundles
from edgeprop import memory
from edgeprop.cpu import host_vector_width, vector_width
from edgeprop.devices import load_profile, profiles, read_profile
from edgeprop.errors import EdgepropError
from edgeprop.exporters.liveness import live_bytes, memory_facts
from edgeprop.runtimes import memory_model
from edgeprop.sizes import parse_size
from edgeprop.storage import load_arrays

ORT = memory_model("onnxruntime")

MiB = 1 << 20


def gemm_relu(batch: int) -> onnx.ModelProto:
    """y = relu(x @ W.T + b) for x (batch, 4), W (3, 4), b (3): every byte countable by hand."""
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [3, 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_liveness_of_gemm_relu_is_exact():
    timeline, inputs, constants = live_bytes(gemm_relu(5))
    # Gemm makes h (5*3*4 = 60 B); Relu makes y (60 B) while h is still being read; then h goes.
    assert timeline == [60, 120]
    assert inputs == 5 * 4 * 4 + 3 * 4 * 4 + 3 * 4
    assert constants == 0


def test_facts_scale_with_batch_exactly():
    facts = memory_facts(gemm_relu(2), gemm_relu(3), 2)
    assert facts["peak"] == [[0, 24]]          # 24 bytes per sample: h and y, 3 floats each
    assert facts["inputs"] == [60, 16]         # W and b, then x's 4 floats per sample
    assert facts["nodes"] == 2


def test_views_share_their_buffer():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["v"]),
         helper.make_node("Neg", ["v"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])],
        [helper.make_tensor("shape", TensorProto.INT64, [1], [16])])
    timeline, _, constants = live_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert timeline == [64, 64, 128]  # the reshape is a view of h: no new buffer, h lives until Neg
    assert constants == 8


def conv_relu_flatten(channels: int, constant_weights: bool = True) -> onnx.ModelProto:
    """x (2, 3, 4, 4) -> Conv 1x1 to `channels` -> Relu -> Flatten: activations countable by hand."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [channels, 3, 1, 1], [0.1] * (channels * 3))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Neg", ["f"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4]),
         *([] if constant_weights else [helper.make_tensor_value_info("W", TensorProto.FLOAT, [channels, 3, 1, 1])])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, channels * 16])],
        [w] if constant_weights else [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("width", [8, 16])
def test_nchwc_pads_conv_channels_to_the_vector_width(width):
    # 10 channels of 2x4x4 floats = 1280 B. The Relu is fused into the conv (no buffer of its own).
    act = 2 * 10 * 16 * 4
    timeline, _, _ = live_bytes(conv_relu_flatten(10))
    assert timeline == [act, act, 2 * act]  # conv(+relu), flatten (a view), neg
    # NCHWc: the conv writes 16 channels (10 padded to a block of 8 or 16 alike); a reorder
    # writes the NCHW copy Flatten reads; the blocked one is freed once reordered.
    blocked = 2 * 16 * 16 * 4
    timeline, _, _ = live_bytes(conv_relu_flatten(10), vector_width=width)
    assert timeline == [blocked, blocked + act, act, 2 * act]
    # 20 channels: 24 with AVX2's 8-float blocks, 32 with AVX-512's 16.
    padded = 2 * (24 if width == 8 else 32) * 16 * 4
    assert live_bytes(conv_relu_flatten(20), vector_width=width)[0][:2] == [padded, padded + 2 * 20 * 16 * 4]
    # Weights fed as inputs (as in every step graph) keep the conv in NCHW.
    assert live_bytes(conv_relu_flatten(10, constant_weights=False), vector_width=width)[0] == [act, act, 2 * act]


def test_vector_width_from_cpu_flags():
    assert vector_width({"sse2", "avx", "avx2", "avx512f"}, "x86_64") == 16
    assert vector_width({"sse2", "avx", "avx2"}, "x86_64") == 8
    assert vector_width({"neon", "asimd"}, "aarch64") is None
    assert host_vector_width() in (None, 8, 16)


def test_profile_vector_width_is_checked(tmp_path):
    base = (tmp_path / "x.toml")
    text = Path(load_profile("rpi4").source).read_text()
    base.write_text(text.replace('arch = "aarch64"', 'arch = "x86_64"') + "vector_width = 16\n")
    assert read_profile(base).vector_width == 16
    base.write_text(text + "vector_width = 12\n")
    with pytest.raises(EdgepropError, match="vector_width"):
        read_profile(base)


def test_onnxruntime_arena_grows_in_doubling_regions():
    ort = memory_model("onnxruntime")
    touched = ort.arena_touched  # the share of its regions the runs write
    assert ort.arena(0) == 0
    assert ort.arena(100) == int(touched * MiB)
    assert ort.arena(MiB + 1) == int(touched * 3 * MiB)
    assert ort.arena(7 * MiB // 2) == int(touched * 7 * MiB)  # 1 + 2 + 4; the 4 MiB region holds the 3.5 MiB block
    assert ort.arena(5 * MiB) == int(touched * 12 * MiB)  # 1 + 2 + 4 hold the first run; the pattern needs a region
    assert memory_model("tflm").arena(12345) == 12345


def test_plan_adds_up(digits_bundle):
    b = bundles.load(digits_bundle)
    p = memory.plan(b, engine=ORT)
    block, head = p.units[0], p.units[-1]
    assert block.params == 4 * b.units[0].n_params == 4 * 60426
    assert block.state == 3 * block.params  # AdamW: weights, m, v
    assert block.step >= block.params       # the step holds at least the gradient
    resident = sum(u.state for u in p.units)
    arenas = block.engine + head.engine     # one arena per loaded step graph (blocks share one)
    assert p.working_set == resident + arenas + max(u.batch for u in p.units)
    streamed = memory.plan(b, stream=True, engine=ORT)
    assert streamed.working_set == block.state + arenas + block.batch
    assert p.backprop["working_set"] > p.working_set  # every block's activations and gradients at once

@pytest.mark.slow  # the every-engine bundle and another export
def test_exported_facts_predict_another_batch_size(engines_bundle, tmp_path):
    """Facts of a batch-16 bundle, evaluated at batch 5, equal liveness over a batch-5 export."""
    from edgeprop.exporters import export
    small = bundles.load(engines_bundle)  # 2 blocks of width 48
    five = bundles.load(export(tmp_path / "b5", blocks=2, width=48, batch_size=5, progress=False))
    for key in ("block_step", "head_step", "block_infer"):
        timeline, inputs, _ = live_bytes(onnx.load(five.graph_path(key)))
        facts = small.manifest["graphs"][key]["memory"]
        assert max(c + s * 5 for c, s in facts["peak"]) == max(timeline), key
        assert facts["inputs"][0] + facts["inputs"][1] * 5 == inputs, key
        assert five.manifest["graphs"][key]["memory"]["peak"] == facts["peak"], key


def test_planned_working_set_matches_measured(digits_bundle):
    proc = edgeprop("profile", digits_bundle, "--data", "digits", "--measure", "--json")
    report = json.loads(proc.stdout)
    planned, measured = report["plan"]["working_set"], report["measured"]["working_set"]
    assert 0.8 <= measured / planned <= 1.2, (planned, measured)
    # measured in a fresh process: its whole peak (imports, data, sessions, steps) against the total
    assert 0.8 <= report["measured"]["process_peak"] / report["plan"]["total"] <= 1.2, report


def test_budget_that_cannot_fit_is_refused_before_anything_is_written(bundle_copy):
    proc = edgeprop("train", bundle_copy, "--data", "digits", "--epochs", "1", "--budget", "2MB", check=False)
    assert proc.returncode == 2
    assert "does not fit a budget of 1.9 MiB" in proc.stderr and "short" in proc.stderr
    assert not (bundle_copy / "checkpoints").exists()


def test_refusal_says_what_would_fit(bundle_copy):
    proc = edgeprop("train", bundle_copy, "--data", "digits", "--epochs", "1", "--budget", "8MB", check=False)
    assert proc.returncode == 2
    assert "add --stream" in proc.stderr and "--batch-size" in proc.stderr
    assert not (bundle_copy / "checkpoints").exists()


def test_a_microcontroller_profile_refuses_onnxruntime(bundle_copy):
    proc = edgeprop("train", bundle_copy, "--data", "digits", "--device", "nrf52840", check=False)
    assert proc.returncode == 2
    assert "nrf52840 runs tflm, c99, not onnxruntime" in proc.stderr


def test_stream_trains_the_same_weights_in_less_memory(digits_bundle, tmp_path):
    import shutil
    runs = {}
    for mode in ("ram", "stream"):
        b = tmp_path / mode
        shutil.copytree(digits_bundle, b)
        extra = ["--stream"] if mode == "stream" else []
        edgeprop("train", b, "--data", "digits", "--epochs", "1", "--order", "block-sequential",
                 "--budget", "8MB" if extra else "64MB", "--quiet", *extra)
        runs[mode] = load_arrays(b / "checkpoints" / "last.npz")
        assert not (b / "checkpoints" / "stream").exists()  # working files go once the checkpoint holds all
    (ram, ram_meta), (streamed, stream_meta) = runs["ram"], runs["stream"]
    for key in ram:
        np.testing.assert_array_equal(ram[key], streamed[key], err_msg=key)
    # 10 blocks: one block's weights and optimizer state in RAM instead of all of them.
    saved = ram_meta["memory"]["working_set"] - stream_meta["memory"]["working_set"]
    assert saved > 4 * MiB, (ram_meta["memory"], stream_meta["memory"])


def test_watchdog_stops_with_a_checkpoint_when_measured_memory_crosses_the_budget(bundle_copy):
    # In a fresh process: in this one, freed heap from earlier tests could absorb the growth.
    import subprocess
    import sys
    code = ("import sys\n"
            "from edgeprop import bundle, datasets\n"
            "from edgeprop.errors import EdgepropError\n"
            "from edgeprop.runtimes import get_engine\n"
            "from edgeprop.trainer import TrainConfig, Trainer\n"
            "b = bundle.load(sys.argv[1])\n"
            "trainer = Trainer(b, get_engine('onnxruntime'), datasets.load('digits', 'train'),\n"
            "                  TrainConfig(epochs=1, budget=1))  # one byte: the first step crosses it\n"
            "try:\n"
            "    trainer.run(progress=False)\n"
            "except EdgepropError as e:\n"
            "    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(bundle_copy)], capture_output=True, text=True, timeout=300)
    assert "memory budget exceeded" in proc.stdout and "checkpoint at step 1 was written" in proc.stdout, \
        proc.stdout + proc.stderr
    _, meta = load_arrays(bundle_copy / "checkpoints" / "last.npz")
    assert meta["done"] == 1


def test_profile_against_devices_and_fit(digits_bundle, tmp_path):
    proc = edgeprop("profile", digits_bundle, "--device", "rpi-zero-2w", "--batch-size", "64", "--fit", "--json",
                    "--plot", tmp_path / "memory.png")
    report = json.loads(proc.stdout)
    assert report["verdict"]["fits"] and report["verdict"]["headroom"] > 0
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    b, device = bundles.load(digits_bundle), load_profile("rpi-zero-2w")
    on_pi = ORT.on(device.arch)  # the runtime figure of the Pi's arch
    assert report["plan"]["runtime"] < memory.plan(b, 64, engine=ORT).runtime and "aarch64" in on_pi.note
    for stream, largest in zip((False, True), report["largest_batch"].values()):
        assert memory.check(memory.plan(b, largest, stream, engine=on_pi), device=device).fits
        assert not memory.check(memory.plan(b, largest + 1, stream, engine=on_pi), device=device).fits
    proc = edgeprop("profile", digits_bundle, "--device", "stm32f746", check=False)
    assert proc.returncode == 1 and "DOES NOT FIT" in proc.stdout and "flash" in proc.stdout


def test_every_shipped_profile_parses_with_its_figures():
    names = {p.name for p in profiles()}
    assert {"jetson-nano", "jetson-orin-nano", "rpi-zero-2w", "rpi4", "rpi5", "stm32f746", "nrf52840",
            "esp32-s3"} <= names
    for p in profiles():
        assert p.ram > 0 and p.flash > 0 and 0 < p.train_share <= 1 and p.cores >= 1 and p.engines
        assert p.source.endswith(f"{p.name}.toml")
        assert "Source:" in open(p.source).read(), f"{p.name}: cite the datasheet"
    assert load_profile("rpi-zero-2w").ram == 512 * MiB
    assert load_profile("stm32f746").ram == 320 * 1024


@pytest.mark.parametrize("change, message", [
    (("ram = ", None), "lacks field(s) ram"),
    (("ram = ", 'ram = "lots"'), "field 'ram': expected a size"),
    (("cores = ", "cores = 0"), "field 'cores' must be a positive integer"),
    (("train_share = ", "train_share = 1.5"), "field 'train_share'"),
    (("kind = ", 'kind = "phone"'), "field 'kind' must be one of"),
    (("engines = ", "engines = []"), "field 'engines' must be a non-empty list"),
    (("arch = ", 'arch = "aarch64"\nspeed = 3'), "unknown field(s) speed"),
    (("name = ", 'name = "broken'), "not a valid TOML"),
])
def test_malformed_user_profile_names_the_field(tmp_path, change, message):
    prefix, replacement = change
    lines = [line for line in open(load_profile("rpi4").source).read().splitlines()]
    lines = [(replacement if line.startswith(prefix) else line) for line in lines]
    path = tmp_path / "mine.toml"
    path.write_text("\n".join(line for line in lines if line is not None))
    with pytest.raises(EdgepropError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_profile(path)
    proc = edgeprop("profile", "/nonexistent", "--device", path, check=False)
    assert proc.returncode == 2


def test_user_profile_file_is_used(tmp_path, digits_bundle):
    text = open(load_profile("rpi4").source).read().replace('name = "rpi4"', 'name = "tiny-board"')
    text = text.replace('ram = "2 GiB"', 'ram = "96 MiB"')
    (tmp_path / "tiny-board.toml").write_text(text)
    proc = edgeprop("profile", digits_bundle, "--device", tmp_path / "tiny-board.toml", check=False)
    assert proc.returncode == 1 and "DOES NOT FIT" in proc.stdout  # 70% of 96 MiB < runtime + working set


def test_sizes_parse_as_people_write_them():
    assert parse_size("48MB") == 48_000_000
    assert parse_size("320 KiB") == 320 * 1024
    assert parse_size("0.5 GB") == 500_000_000
    assert parse_size(1234) == 1234
    for bad in ("lots", "-1MB", "0", "12 parsecs"):
        with pytest.raises(EdgepropError):
            parse_size(bad)

@pytest.mark.slow  # torch.onnx.export in a fresh process
def test_profile_a_plain_onnx_model_from_torch_onnx_export(tmp_path):
    """A model edgeprop did not export: inference memory (= zeroth-order's budget) and back-prop's."""
    script = f"""
import torch, warnings
warnings.simplefilter("ignore")
model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 28 * 28, 10))
batch = torch.export.Dim("batch")
torch.onnx.export(model, (torch.randn(4, 1, 28, 28),), r"{tmp_path / 'user.onnx'}", dynamo=True,
                  dynamic_shapes=[{{0: batch}}], input_names=["image"], output_names=["logits"])
"""
    import subprocess
    import sys
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    reports = {}
    for batch in (8, 64):
        proc = edgeprop("profile", tmp_path / "user.onnx", "--batch-size", batch, "--device", "rpi4", "--json",
                        blocked=("torch",))  # reads the protobuf with onnx; never needs torch
        reports[batch] = json.loads(proc.stdout)
    r = reports[8]
    params = 4 * (8 * 9 + 8 + 10 * 8 * 28 * 28 + 10)
    assert params <= r["weights"] <= params + 1024   # plus the exporter's small shape constants
    assert r["inputs"] == 8 * 28 * 28 * 4
    conv = 8 * 8 * 28 * 28 * 4                       # 8 channels of 28x28: the ReLU is fused into the conv
    assert conv <= r["peak"] < 2 * conv and r["layout"] == "NCHW"
    assert r["backprop"]["working_set"] > r["inference"]
    assert r["verdict"]["fits"]
    assert reports[64]["peak"] == 8 * r["peak"]      # everything live scales with the batch here
    # The engine model against onnxruntime itself, run in a fresh process on random inputs, at the
    # default level and at ALL, where x86 CPUs pad conv channels to their vector width (8 or 16).
    # Batch 128: below ~4 MiB a fixed ~0.6 MiB the runs allocate outside the arena dominates.
    for level in ("extended", "all"):
        proc = edgeprop("profile", tmp_path / "user.onnx", "--batch-size", 128, "--measure", "--json",
                        "--ort-optimization", level, blocked=("torch",))
        measured = json.loads(proc.stdout)
        ratio = measured["measured"]["arena"] / measured["arena"]
        width = host_vector_width() if level == "all" else None
        assert measured["layout"] == (f"NCHWc, {width}-float blocks" if width else "NCHW")
        # The arena is replayed (exporters/ort_pattern.py). At EXTENDED this model's later runs
        # hold the conv's output a second time, which the replay does not model: measured 2.18x
        # its arena (a known gap, in issue 18's closing note), while the total below stays
        # within 7%. At ALL: measured 1.06.
        high = 1.3 if level == "all" else 2.5
        assert 0.7 <= ratio <= high, (level, round(ratio, 3), measured["measured"], measured["arena"])
        # the whole fresh process (imports, session build, runs) against the plan's total
        assert 0.8 <= measured["measured"]["peak"] / measured["total"] <= 1.2, (level, measured)
    proc = edgeprop("profile", tmp_path / "user.onnx", "--budget", "256KB", check=False, blocked=("torch",))
    assert proc.returncode == 1 and "DOES NOT FIT" in proc.stdout


def test_process_peak_survives_a_reset():
    # In a fresh process, where a 64 MiB array is sure to be new memory, given back when freed.
    import subprocess
    import sys
    code = ("import numpy as np\n"
            "from edgeprop import rss\n"
            "MiB = 1 << 20\n"
            "now = rss.current()\n"
            "before = rss.process_peak()  # read after: the peak includes the moment `now` was read\n"
            "assert now > 0 and before >= now\n"
            "big = np.ones(64 * MiB, np.uint8)\n"
            "high = rss.process_peak()\n"
            "assert high >= before + 60 * MiB, (before, high)\n"
            "del big\n"
            "if rss.reset_peak():  # Linux: the counter restarts, the process-wide figure does not\n"
            "    # (the kernel's resident counters are cached per thread and may lag by a few pages)\n"
            "    assert rss.peak() < high - 32 * MiB and rss.process_peak() >= high - MiB\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
