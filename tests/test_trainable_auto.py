"""`--trainable auto --device D`: the largest trainable set whose memory plan fits D.

A three-layer MLP on digits (a few small exports). Device profiles are written here with the
RAM each case needs, found from the plans themselves, never hard-coded.
"""
import json
import sys

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from conftest import edgeprop  # noqa: E402
from edgeprop import memory  # noqa: E402
from edgeprop.bundle import load as load_bundle  # noqa: E402
from edgeprop.errors import EdgepropError  # noqa: E402
from edgeprop.exporters import auto_trainable, export  # noqa: E402
from edgeprop.runtimes import memory_model  # noqa: E402

MODEL = """
from torch import nn
def build():
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
"""


def _profile(folder, name: str, ram: int) -> str:
    path = folder / f"{name}.toml"
    path.write_text(f'name = "{name}"\ntitle = "{name}"\nkind = "mcu"\narch = "cortex-m4f"\ncores = 1\n'
                    f'ram = {ram}\nflash = "64 MiB"\ntrain_share = 1.0\nfloat_formats = ["fp32"]\nengines = ["tflm"]\n')
    return str(path)


def _need(bundle) -> int:
    p = memory.plan(load_bundle(bundle), None, True, engine=memory_model("tflm"), data_bytes=0)
    return p.working_set


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))


def test_candidates_grow_from_the_output():
    names = [n for _, n in auto_trainable.candidates(_model(), [64])]
    assert names[0] == ["4.bias"]
    assert names[-1] == [n for n, _ in _model().named_parameters()]
    assert all(set(a) < set(b) for a, b in zip(names, names[1:]))  # each candidate holds the one before


@pytest.mark.slow
def test_auto_picks_the_largest_set_that_fits(tmp_path):
    kw = dict(rule="backprop", data="digits", batch_size=8, optimizer="sgd", progress=False)
    roomy = _profile(tmp_path, "roomy", 64 << 20)
    export(_model(), out=tmp_path / "all", trainable="auto", device=roomy, **kw)
    chosen = json.loads((tmp_path / "all" / "manifest.json").read_text())["model"]
    assert chosen["trainable_auto"]["chose"] == "every parameter"
    need_all = chosen["trainable_auto"]["need"]
    assert need_all == _need(tmp_path / "all")
    assert "trainable auto on roomy: every parameter" in edgeprop("info", tmp_path / "all").stdout

    # One byte less than every parameter needs: a smaller set, and its plan fits
    tight = _profile(tmp_path, "tight", need_all - 1)
    export(_model(), out=tmp_path / "tight", trainable="auto", device=tight, **kw)
    picked = json.loads((tmp_path / "tight" / "manifest.json").read_text())["model"]
    assert picked["trainable_auto"]["chose"] != "every parameter"
    assert set(picked["trainable"]) < {n for n, _ in _model().named_parameters()}
    assert _need(tmp_path / "tight") <= need_all - 1

    # Too small for even the last layer's bias: one line, exit 2, nothing written
    (tmp_path / "m.py").write_text(MODEL)
    r = edgeprop("export", "--model", f"{tmp_path / 'm.py'}:build", "--rule", "backprop", "--trainable", "auto",
                 "--device", _profile(tmp_path, "tiny", 1024), "--data", "digits", "--out", str(tmp_path / "no"),
                 torch_allowed=True, check=False)
    assert r.returncode == 2, r.stderr
    assert "even the bias of the last layer with one alone does not fit tiny" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "no").exists()
    assert not list(tmp_path.glob(".no.*"))  # no candidate left behind


def test_auto_needs_a_device(tmp_path):
    with pytest.raises(EdgepropError, match="--trainable auto needs --device"):
        export(_model(), out=tmp_path / "b", rule="backprop", trainable="auto")
    with pytest.raises(EdgepropError, match="--device at export is for --trainable auto"):
        export(_model(), out=tmp_path / "b", rule="backprop", trainable="bias", device="rpi-zero-2w")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
