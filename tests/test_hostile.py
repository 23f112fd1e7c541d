"""A corpus of hostile and careless inputs: bundle files, manifest fields, graphs, checkpoints,
data files, command-line options, paths and concurrency. Every case must end in exit 2 with
one line naming the file or field at fault, no traceback, and every file that was on disk
before byte-identical after.

One tiny bundle (2 blocks of width 16, batch 16) is exported and trained once; each case works
on its own copy and runs the command in-process (edgeprop.cli.main), which is what makes a
corpus of this size fast.
"""
import gzip
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgeprop import lock
from edgeprop.bundle import write_manifest
from edgeprop.cli import main

pytestmark = pytest.mark.slow  # ~70 s for the whole corpus: `make test` runs it, `-m "not slow"` does not


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from edgeprop.exporters import export
    out = export(tmp_path_factory.mktemp("hostile") / "tiny", blocks=2, width=16, batch_size=16, progress=False)
    assert main(["train", str(out), "--epochs", "1", "--quiet"]) == 0
    return out


@pytest.fixture
def bundle(tiny, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(tiny, dst)
    return dst


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != lock.LOCK_FILE}


def refused(capsys, root: Path, args: list, names: str) -> str:
    """Run `edgeprop ARGS`: exit 2, one line naming `names`, nothing under `root` changed."""
    before = snapshot(root)
    capsys.readouterr()
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert names in err, err
    assert snapshot(root) == before
    return err


def edit_manifest(root: Path, change) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    write_manifest(root, manifest)  # checksums recomputed: only the validator can catch it


def setter(path: str, value):
    def change(m):
        *parents, last = path.split(".")
        node = m
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is DELETE:
            del node[last]
        else:
            node[int(last) if isinstance(node, list) else last] = value
    return change


DELETE = object()
COMMANDS = (["train", "--epochs", "1", "--quiet", "--restart"], ["eval"], ["info"])

# (manifest field, bad value, what the message must name)
FIELDS = [
    ("rule", 5, "rule"), ("rule", None, "rule"), ("rule", ["noprop-dt"], "rule"), ("rule", "magic", "magic"),
    ("batch_size", 0, "batch_size"), ("batch_size", -1, "batch_size"), ("batch_size", 10**15, "batch_size"),
    ("batch_size", "16", "batch_size"), ("batch_size", True, "batch_size"),
    ("model.kind", DELETE, "model.kind"), ("model.input_shape", [64, 1], "input_shape"),
    ("model.input_shape", [], "input_shape"), ("model.input_shape", [0], "input_shape"),
    ("model.num_classes", 1, "num_classes"), ("model.num_classes", "10", "num_classes"),
    ("model.embed_dim", -1, "embed_dim"), ("optimizer.name", DELETE, "optimizer.name"),
    ("optimizer", "adamw", "optimizer.name"), ("input_norm.std", 0, "input_norm.std"),
    ("input_norm.std", -2.0, "input_norm.std"), ("input_norm.mean", float("nan"), "input_norm.mean"),
    ("input_norm.mean", "4", "input_norm.mean"), ("units", [], "units"), ("units", {}, "units"),
    ("units.0.t", 99, "units[0].t"), ("units.0.t", "1", "units[0].t"), ("units.0.t", 0, "units[0].t"),
    ("units.0.lr", -1, "units[0].lr"), ("units.0.lr", 0, "units[0].lr"), ("units.0.lr", float("inf"), "units[0].lr"),
    ("units.1.name", "block1", "units[1].name"), ("units.0.name", 7, "units[0].name"),
    ("units.0.role", None, "units[0].role"), ("units.0.step_graph", "nope", "units[0].step_graph"),
    ("units.0.infer_graph", None, "units[0].infer_graph"), ("units.0.state", [], "units[0].state"),
    ("graphs", {}, "graphs"), ("noise.alpha_bar", [0.5], "noise.alpha_bar"), ("noise", "cosine", "noise"),
]


@pytest.mark.parametrize("field, value, names", FIELDS,
                         ids=[f"{f}={'deleted' if v is DELETE else repr(v)}"[:40] for f, v, _ in FIELDS])
def test_manifest_field(bundle, capsys, field, value, names):
    edit_manifest(bundle, setter(field, value))
    for command in COMMANDS:
        refused(capsys, bundle, [command[0], bundle, *command[1:]], names)


MANIFEST_FILES = {
    "not-json": b"{not json", "a-list": b"[1, 2]", "deep": b"[" * 100_000 + b"]" * 100_000,
    "no-version": b'{"rule": "noprop-dt"}', "future": b'{"schema_version": 99}', "binary": bytes(range(256)),
    "string-version": b'{"schema_version": "1"}', "empty": b"",
}


@pytest.mark.parametrize("name", MANIFEST_FILES)
def test_manifest_file(bundle, capsys, name):
    (bundle / "manifest.json").write_bytes(MANIFEST_FILES[name])
    refused(capsys, bundle, ["eval", bundle], "manifest.json")


def rewrite_npz(path: Path, change, compress=False):
    with np.load(path, allow_pickle=True) as f:
        arrays = {k: f[k] for k in f.files}
    change(arrays)
    (np.savez_compressed if compress else np.savez)(path, **arrays)


ARCHIVE_CASES = {
    "init-bomb": ("state/init.npz", "decompression bomb"),
    "init-truncated-claim": ("state/init.npz", "truncated or forged"),
    "init-object": ("state/init.npz", "Python objects"),
    "init-not-zip": ("state/init.npz", "not a readable array archive"),
    "init-inf": ("state/init.npz", "NaN or inf"),
    "init-wrong-dtype": ("state/init.npz", "float64"),
    "ckpt-bomb": ("checkpoints/last.npz", "decompression bomb"),
    "ckpt-garbage": ("checkpoints/last.npz", "not a readable array archive"),
    "ckpt-sparse": ("checkpoints/last.npz", "not a readable array archive"),
    "ckpt-wrong-shape": ("checkpoints/last.npz", "the manifest says"),
    "ckpt-nan": ("checkpoints/last.npz", "NaN or inf"),
}


def make_archive_case(bundle: Path, case: str) -> None:
    init, ckpt = bundle / "state" / "init.npz", bundle / "checkpoints" / "last.npz"
    if case == "init-bomb":
        deflated_bomb(init, "block1/param", (1 << 28,))
    elif case == "init-truncated-claim":
        stored_claim(init, "block1/param", (1 << 28,))
    elif case == "init-object":
        rewrite_npz(init, lambda a: a.update(embedding=np.array([{"x": 1}] * 10, dtype=object)))
    elif case == "init-not-zip":
        init.write_bytes(b"\0" * 1000)
    elif case == "init-inf":
        rewrite_npz(init, lambda a: a["block1/param"].__setitem__(0, np.inf))
    elif case == "init-wrong-dtype":
        rewrite_npz(init, lambda a: a.update({"block1/param": a["block1/param"].astype(np.float64)}))
    elif case == "ckpt-bomb":
        deflated_bomb(ckpt, "block1/param", (1 << 28,))
    elif case == "ckpt-garbage":
        ckpt.write_bytes(b"garbage")
    elif case == "ckpt-sparse":
        with open(ckpt, "wb") as f:
            f.truncate(1 << 31)  # 2 GB of holes: nothing on disk, and not an archive
    elif case == "ckpt-wrong-shape":
        rewrite_npz(ckpt, lambda a: a.update({"block1/param": a["block1/param"][:10]}))
    elif case == "ckpt-nan":
        rewrite_npz(ckpt, lambda a: a["block2/param"].__setitem__(3, np.nan))
    if case.startswith("init"):
        write_manifest(bundle, json.loads((bundle / "manifest.json").read_text()))


def deflated_bomb(path: Path, key: str, shape) -> None:
    """Member `key` declares `shape` and really holds that many zero floats, deflated to ~1 KB per MB."""
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist() if i.filename != f"{key}.npy"}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
        with z.open(f"{key}.npy", "w", force_zip64=True) as f:
            header = io.BytesIO()
            np.lib.format.write_array_header_2_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
            f.write(header.getvalue())
            zeros = bytes(1 << 20)
            for _ in range(math.prod(shape) * 4 >> 20):
                f.write(zeros)


def stored_claim(path: Path, key: str, shape) -> None:
    """Member `key`'s header declares `shape`, but only a few bytes follow."""
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist() if i.filename != f"{key}.npy"}
    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr(f"{key}.npy", header.getvalue() + bytes(64))


@pytest.mark.parametrize("case", ARCHIVE_CASES)
@pytest.mark.parametrize("command", ["train", "eval", "info"])
def test_archive(bundle, capsys, case, command):
    where, names = ARCHIVE_CASES[case]
    if command == "info" and where.startswith("state"):
        pytest.skip("info reads no initial state")
    if command == "info" and case in ("ckpt-wrong-shape", "ckpt-nan", "ckpt-bomb"):
        pytest.skip("info reads the checkpoint's record, not its arrays")
    make_archive_case(bundle, case)
    args = {"train": ["train", bundle, "--epochs", "1", "--resume", "--quiet"], "eval": ["eval", bundle],
            "info": ["info", bundle]}[command]
    err = refused(capsys, bundle, args, names)
    assert Path(where).name in err


CHECKPOINT_META = {
    "done-negative": ("done", -1), "done-huge": ("done", 10**9), "done-list": ("done", [1]),
    "steps-missing-unit": ("steps", {"block1": 3}), "steps-list": ("steps", [1, 2]),
    "history-string": ("history", "x"), "losses-list": ("losses", [0.1]),
}


@pytest.mark.parametrize("case", CHECKPOINT_META)
@pytest.mark.parametrize("command", ["train", "eval", "info"])
def test_checkpoint_record(bundle, capsys, case, command):
    ckpt = bundle / "checkpoints" / "last.npz"
    with np.load(ckpt) as f:
        arrays = {k: f[k] for k in f.files if k != "__meta__"}
        meta = json.loads(str(f["__meta__"]))
    key, value = CHECKPOINT_META[case]
    meta[key] = value
    from edgeprop.storage import save_arrays
    save_arrays(ckpt, arrays, meta)
    args = {"train": ["train", bundle, "--epochs", "1", "--resume", "--quiet"], "eval": ["eval", bundle],
            "info": ["info", bundle]}[command]
    refused(capsys, bundle, args, f"checkpoint field '{key}'")


def test_a_different_graph_with_a_recomputed_checksum(bundle, capsys):
    """A valid ONNX graph that is not the one the manifest describes (the head's step graph in
    place of a block's), re-hashed: refused when the graph is loaded, before any step."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    block, head = manifest["graphs"]["block_step"]["file"], manifest["graphs"]["head_step"]["file"]
    shutil.copy(bundle / head, bundle / block)
    write_manifest(bundle, manifest)
    refused(capsys, bundle, ["train", bundle, "--epochs", "1", "--resume", "--quiet"], "block_step")


def idx(shape, dtype_code=0x08, data: bytes | None = None) -> bytes:
    head = bytes([0, 0, dtype_code, len(shape)]) + b"".join(int(d).to_bytes(4, "big") for d in shape)
    return head + (data if data is not None else bytes(math.prod(shape)))


DATA_CASES = {
    "gzip-corrupt": lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx((4, 8, 8)))[:-9]),
    "gz-not-gzip": lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(idx((4, 8, 8))),
    "idx-huge-claim": lambda d: (d / "train-images-idx3-ubyte").write_bytes(idx((65535,) * 3, data=b"")),
    "idx-zero-dims": lambda d: (d / "train-images-idx3-ubyte").write_bytes(idx(())),
    "idx-bad-magic": lambda d: (d / "train-images-idx3-ubyte").write_bytes(b"\1\2\3\4" + bytes(100)),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_idx_data(bundle, tmp_path, capsys, case):
    folder = tmp_path / "idx"
    folder.mkdir()
    (folder / "train-labels-idx1-ubyte").write_bytes(idx((4,)))
    DATA_CASES[case](folder)
    err = refused(capsys, bundle, ["train", bundle, "--data", folder, "--epochs", "1", "--restart", "--quiet"],
                  "train-images-idx3-ubyte")
    assert "MemoryError" not in err


NPZ_CASES = {
    "float64-overflow": (lambda rng: dict(x=np.full((32, 64), 1e300), y=rng.integers(0, 10, 32)), "overflow float32"),
    "other-scale": (lambda rng: dict(x=rng.random((32, 64)) / 16, y=rng.integers(0, 10, 32)), "mean"),
    "rows-differ": (lambda rng: dict(x=rng.random((32, 64)) * 16, y=rng.integers(0, 10, 31)), "rows"),
    "no-y": (lambda rng: dict(x=rng.random((32, 64))), "expected arrays x and y"),
    "object-y": (lambda rng: dict(x=rng.random((32, 64)), y=np.array([None] * 32)), "Python objects"),
    "labels-2d": (lambda rng: dict(x=rng.random((32, 64)) * 16, y=rng.integers(0, 10, (32, 1))), "1-D"),
    "labels-fractional": (lambda rng: dict(x=rng.random((32, 64)) * 16, y=np.full(32, 0.5)), "whole class"),
    "labels-negative": (lambda rng: dict(x=rng.random((32, 64)) * 16, y=np.full(32, -1)), "label -1"),
}


@pytest.mark.parametrize("case", NPZ_CASES)
@pytest.mark.parametrize("command", ["train", "eval"])
def test_npz_data(bundle, tmp_path, capsys, case, command):
    make, names = NPZ_CASES[case]
    np.savez(tmp_path / "data.npz", **make(np.random.default_rng(0)))
    extra = ["--epochs", "1", "--restart", "--quiet"] if command == "train" else []
    refused(capsys, bundle, [command, bundle, "--data", tmp_path / "data.npz", *extra], names)


OPTIONS = {
    "budget-400-digits": (["train", "{b}", "--budget", "9" * 400, "--restart"], "--budget"),
    "budget-zero": (["train", "{b}", "--budget", "0", "--restart"], "--budget"),
    "runs-zero": (["eval", "{b}", "--runs", "0"], "--runs"),
    "seed-negative": (["train", "{b}", "--seed", "-1", "--restart"], "--seed"),
    "seed-huge": (["eval", "{b}", "--seed", str(2**70)], "--seed"),
    "device-dev-zero": (["profile", "{b}", "--device", "/dev/zero"], "/dev/zero"),
    "device-missing": (["profile", "{b}", "--device", "nowhere.toml"], "nowhere.toml"),
    "plot-onto-checkpoint": (["plot", "{b}", "--out", "{b}/checkpoints/last.npz"], "--out"),
    "plot-onto-manifest": (["plot", "{b}", "--out", "{b}/manifest.json"], "--out"),
    "epochs-zero": (["train", "{b}", "--epochs", "0", "--restart"], "--epochs"),
    "lr-overflows-float32": (["train", "{b}", "--lr", "1e39", "--restart", "--epochs", "1"], "--lr"),
    "resume-other-seed": (["train", "{b}", "--resume", "--seed", "5"], "seed"),
    "no-restart": (["train", "{b}", "--epochs", "1"], "--resume"),
}


@pytest.mark.parametrize("case", OPTIONS)
def test_option(bundle, capsys, case):
    args, names = OPTIONS[case]
    refused(capsys, bundle, [a.replace("{b}", str(bundle)) for a in args] + ["--quiet"] * (args[0] == "train"),
            names)


def test_symlinked_checkpoints_are_not_written_through(bundle, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(bundle / "checkpoints", elsewhere)
    (elsewhere / "stream").mkdir()
    (elsewhere / "stream" / "precious.txt").write_text("not edgeprop's")
    (bundle / "checkpoints").symlink_to(elsewhere)
    refused(capsys, bundle, ["train", bundle, "--epochs", "1", "--resume", "--stream", "--quiet"], "checkpoints")
    assert (elsewhere / "stream" / "precious.txt").read_text() == "not edgeprop's"


@pytest.mark.parametrize("where", ["bundle", "inside", "parent"])
def test_deploy_never_replaces_the_bundle_or_its_parent(bundle, capsys, where):
    out = {"bundle": bundle, "inside": bundle / "deploy", "parent": bundle.parent}[where]
    (bundle.parent / "mine.txt").write_text("a user's file")
    refused(capsys, bundle.parent, ["deploy", bundle, "--device", "rpi4", "--out", out, "--force"], "--out")


def test_deploy_force_replaces_only_its_own_output(bundle, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    refused(capsys, tmp_path, ["deploy", bundle, "--device", "rpi4", "--out", out, "--force"], "edgeprop wrote")


def test_a_killed_stream_runs_leftovers_are_cleared(bundle):
    stale = bundle / "checkpoints" / "stream"
    stale.mkdir()
    (stale / "block1.npy").write_bytes(bytes(1 << 16))  # what a killed --stream run leaves
    assert main(["train", str(bundle), "--epochs", "1", "--resume", "--quiet"]) == 0
    assert not stale.exists()


def test_a_read_only_bundle_still_evaluates(bundle, monkeypatch):
    """eval keeps its report beside the checkpoint when it can; a bundle it cannot write
    (a read-only card, a deployed copy) is still evaluated."""
    import edgeprop.trainer

    def read_only(path, data):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(edgeprop.trainer, "write_atomic", read_only)
    before = snapshot(bundle)
    assert main(["eval", str(bundle)]) == 0
    assert snapshot(bundle) == before


def test_a_second_run_on_a_bundle_in_use_refuses(bundle, capsys):
    with lock.held(bundle, "test"):
        err = refused(capsys, bundle, ["train", bundle, "--epochs", "1", "--resume", "--quiet"], "in use by")
    assert str(os.getpid()) in err


def test_deploy_waits_for_no_run_but_refuses_during_one(bundle, tmp_path, capsys):
    with lock.held(bundle, "test"):
        refused(capsys, bundle, ["deploy", bundle, "--device", "rpi4", "--out", tmp_path / "out"], "in use by")
    assert not (tmp_path / "out").exists()


def test_the_lock_is_free_once_its_holder_is_killed(bundle):
    code = ("import sys, time; from edgeprop import lock\n"
            "with lock.held(sys.argv[1], 'test'):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(bundle)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        from edgeprop.errors import EdgepropError
        with pytest.raises(EdgepropError, match="in use"):
            with lock.held(bundle, "train it"):
                pass
    finally:
        holder.kill()
        holder.wait()
    t = time.monotonic()
    with lock.held(bundle, "train it"):  # free at once: the kernel dropped it with the process
        pass
    assert time.monotonic() - t < 1


def test_a_state_gone_non_finite_is_never_checkpointed(bundle):
    """A finite loss can hide inf weights (float32 overflow): the last good checkpoint is kept."""
    from edgeprop import bundle as bundles
    from edgeprop import datasets
    from edgeprop.errors import EdgepropError
    from edgeprop.runtimes import get_engine
    from edgeprop.trainer import TrainConfig, Trainer
    b = bundles.load(bundle)
    before = (bundle / "checkpoints" / "last.npz").read_bytes()
    trainer = Trainer(b, get_engine("onnxruntime"), datasets.load("digits", "train"), TrainConfig(epochs=1))
    trainer.resume()
    trainer.state["block2"]["param"][5] = np.inf
    with pytest.raises(EdgepropError, match="block2's 'param' holds NaN or inf"):
        trainer.save()
    assert (bundle / "checkpoints" / "last.npz").read_bytes() == before
