"""The CNN block's BatchNorm (--batchnorm, the paper's layers): exact BatchNorm, padding kept
out of the statistics, running statistics carried as unit state through the step graphs on
ONNX and TFLite, and inference on the running statistics."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from conftest import edgeprop
from edgeprop import bundle as bundles
from edgeprop import datasets
from edgeprop.errors import EdgepropError
from edgeprop.exporters import export
from edgeprop.exporters.models import MaskedBatchNorm, cross_entropy, initial_stats, running_stats
from edgeprop.exporters.optim import Optimizer
from edgeprop.exporters.tflite import to_tflite
from edgeprop.exporters.trace import to_onnx, trace_step
from edgeprop.exporters.validate import validate
from edgeprop.runtimes import get_engine
from edgeprop.trainer import TrainConfig, Trainer


def test_masked_batchnorm_is_torch_batchnorm():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 5, generator=g) * 3 + 1
    stats = torch.cat([torch.randn(5, generator=g), torch.rand(5, generator=g) + 0.5])
    ours, theirs = MaskedBatchNorm(5), torch.nn.BatchNorm1d(5)
    with torch.no_grad():
        theirs.running_mean.copy_(stats[:5]), theirs.running_var.copy_(stats[5:])
    with running_stats(stats, torch.ones(6)) as run:
        out = ours(h)
    torch.testing.assert_close(out, theirs.train()(h), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(run.updated(), torch.cat([theirs.running_mean, theirs.running_var]))
    with running_stats(run.updated()):  # inference: the running statistics
        torch.testing.assert_close(ours(h), theirs.eval()(h), rtol=1e-6, atol=1e-6)
    # Two padded samples count in neither the output's statistics nor the running ones.
    with running_stats(stats, torch.tensor([1.0, 1, 1, 1, 0, 0])) as padded:
        out = ours(torch.cat([h[:4], torch.full((2, 5), 1e6)]))
    with running_stats(stats, torch.ones(4)) as real:
        torch.testing.assert_close(out[:4], ours(h[:4]))
    torch.testing.assert_close(padded.updated(), real.updated())


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8, bias=False), MaskedBatchNorm(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x, stats, mask=None):
        with running_stats(stats, mask) as run:
            out = self.net(x)
        return out if mask is None else (out, run.updated())


def _loss(unit, module, feeds):
    logits, stats = module(feeds["x"], feeds["stats"], mask=feeds["mask"])
    return cross_entropy(logits, feeds["target"], feeds["mask"]), {"next.stats": stats}


@pytest.mark.slow  # ONNX and .tflite exports
@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_batchnorm_step_lowers_exactly(fmt, tmp_path):
    """A BatchNorm step (batch statistics over the real samples, their gradient, the running
    statistics' update) on onnxruntime and on LiteRT against torch eager."""
    torch.manual_seed(0)
    module, opt = BNNet(), Optimizer("sgd")
    feeds = {"x": torch.randn(5, 6) * 2 + 1, "stats": torch.from_numpy(initial_stats(module)) + 0.5,
             "target": torch.eye(3)[torch.tensor([0, 1, 2, 0, 1])], "mask": torch.tensor([1.0, 1, 1, 1, 0])}
    graph, args, inputs, outputs = trace_step(module, _loss, None, opt, feeds)
    arrays = [a.numpy() for a in args]
    if fmt == "onnx":
        to_onnx(graph, args, inputs, outputs, tmp_path / "bn.onnx")
        got = dict(zip(outputs, ort.InferenceSession(str(tmp_path / "bn.onnx")).run(None, dict(zip(inputs, arrays)))))
    else:
        from ai_edge_litert.interpreter import Interpreter
        to_tflite(graph, args, tmp_path / "bn.tflite")
        run = Interpreter(model_path=str(tmp_path / "bn.tflite")).get_signature_runner()
        out = run(**{f"args_{i}": a for i, a in enumerate(arrays)})
        got = {name: out[f"output_{i}"] for i, name in enumerate(outputs)}
    loss, extras = _loss(None, module, feeds)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(module.parameters()))])
    flat, lr, step = args[0], args[-2], args[-1]
    new_flat, slots = opt.update(flat, grad, {s: torch.zeros_like(flat) for s in opt.slots}, lr, step)
    for name, value in {"next.param": new_flat, "loss": loss, "next.stats": extras["next.stats"]}.items():
        np.testing.assert_allclose(got[name], value.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def bn_bundle(tmp_path_factory):
    # SGD: the lock-step is then exact. (With AdamW, parameters whose true gradient is 0, as
    # the bias of a BatchNorm whose output a later BatchNorm centres again, get float noise
    # that AdamW scales to ±lr steps; see test_parity.py's CASES.) ONNX only: converting this
    # CNN to .tflite takes a minute; test_batchnorm_step_lowers_exactly covers LiteRT.
    return export(tmp_path_factory.mktemp("bn") / "cnn", model="cnn", width=16, blocks=2, batch_size=4,
                  batchnorm=True, optimizer="sgd", lr=0.01, progress=False)

@pytest.mark.slow  # exports a CNN bundle
def test_step_graphs_carry_running_statistics_like_torch(bn_bundle):
    report = validate(bn_bundle, steps=10, progress=False)
    assert report["lockstep"]["max_abs_diff"] <= 1e-4 and report["ok"], report

@pytest.mark.slow  # exports a CNN bundle
def test_running_statistics_are_unit_state(bn_bundle, tmp_path):
    b = bundles.load(bn_bundle)
    block = b.blocks[0]
    assert [t.name for t in block.state] == ["param", "opt.buf", "stats"]
    assert [t.name for t in b.head.state] == ["param", "opt.buf"]
    init, _ = b.initial_state()
    trainer = Trainer(b, get_engine(), datasets.load("digits", "train"), TrainConfig(epochs=1))
    trainer.run(limit=3 * len(b.units), progress=False, checkpoints=False)
    moved = trainer.state[block.name]["stats"]
    assert not np.allclose(moved, init[block.name]["stats"])
    # Inference reads them: the same weights on other statistics predict otherwise.
    infer = b.load_graph(get_engine(), block.infer_graph)
    rng = np.random.default_rng(0)
    feeds = {"param": trainer.state[block.name]["param"], "x": rng.standard_normal((4, 1, 8, 8), np.float32),
             "z": rng.standard_normal((4, 10), np.float32)}
    one = infer.run({**feeds, "stats": moved})["u_hat"]
    two = infer.run({**feeds, "stats": init[block.name]["stats"]})["u_hat"]
    assert np.all(np.isfinite(one)) and not np.allclose(one, two)

@pytest.mark.slow  # exports in fresh processes
def test_batchnorm_is_for_the_cnn_block_and_not_for_ort_training(tmp_path):
    with pytest.raises(EdgepropError, match="--batchnorm"):
        export(tmp_path / "mlp", model="mlp", batchnorm=True, progress=False)
    proc = edgeprop("export", "--model", "cnn", "--batchnorm", "--dropout", "0", "--ort-training", "--out",
                    tmp_path / "ort", torch_allowed=True, check=False)
    assert proc.returncode != 0 and "BatchNorm" in proc.stderr and not (tmp_path / "ort").exists()
