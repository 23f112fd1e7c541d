"""Any traceable torch.nn.Module: capture, units by module name, frozen parameters.

Small hand-made modules with the blocks real models are made of (residual add, squeeze-
excitation, BatchNorm, ReLU6, Hardswish, Hardsigmoid, AvgPool2d, AdaptiveAvgPool2d, Dropout,
channel shuffle, LayerNorm, GELU, SiLU, Softmax) on 8×8 digits. The fast tests trace only;
the slow ones export and hold every graph to torch (SGD lock-step) on onnxruntime and LiteRT.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from edgeprop.errors import EdgepropError  # noqa: E402
from edgeprop.exporters import capture, export  # noqa: E402
from edgeprop.exporters.graph_units import cut, run_graph, unit_graph  # noqa: E402


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x  # in place, as torchvision writes it
        return F.relu(out)


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2, self.gate = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1), nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class Shuffle(nn.Module):
    def forward(self, x):
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        a, b = x.chunk(2, dim=1)
        return torch.cat([a, F.gelu(b)], dim=1)


class Small(nn.Module):
    """stem | layer1 (residual) | layer2 (depthwise, SE, shuffle, pooling) | head."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
        self.layer1 = Residual(8)
        self.layer2 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), SqueezeExcite(8),
                                    Shuffle(), nn.Hardswish(), nn.AvgPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Dropout(0.2), nn.LayerNorm(8), nn.Linear(8, classes), nn.LogSoftmax(dim=1))

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def small():
    torch.manual_seed(0)
    model = Small()
    with torch.no_grad():  # running statistics that are not 0 and 1, as a pretrained model's
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def test_tracked_batchnorm_is_torch_batchnorm_in_train_mode():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    tracked = capture.TrackedBatchNorm(bn, "bn")
    h = torch.randn(5, 3, 4, 4)
    running = torch.cat([torch.zeros(3), torch.ones(3)])
    with capture.inputs({"bn": running}, {}, torch.ones(5)) as ctx:
        mine = tracked(h)
    theirs = bn.train()(h)
    assert torch.allclose(mine, theirs, atol=1e-5)
    assert torch.allclose(ctx.new["bn"], torch.cat([bn.running_mean, bn.running_var]), atol=1e-6)


@pytest.mark.parametrize("kernel, stride, padding, size", [(2, 2, 0, 8), (2, 2, 0, 7), (3, 2, 1, 8), (3, 1, 1, 5)])
def test_average_pooling_gradient_in_forward_ops_is_torchs(kernel, stride, padding, size):
    from edgeprop.exporters.conv_grad import avg_pool2d_grad
    x = torch.randn(2, 3, size, size, requires_grad=True)
    y = F.avg_pool2d(x, kernel, stride, padding)
    g = torch.randn_like(y)
    (want,) = torch.autograd.grad(y, x, g)
    got = avg_pool2d_grad(g, x.detach(), [kernel], [stride], [padding], False, True, None)
    assert torch.allclose(got, want, atol=1e-6)


def test_recorded_units_compute_the_model():
    """The units' JSON graphs, chained, give the model's eval-mode output."""
    model = small()
    h, units = _run_units(capture.prepare(model, X, "all"), X, ["layer1", "layer2", "fc"])
    assert units == 4
    with torch.no_grad():
        assert torch.allclose(h, model.eval()(X), atol=1e-5)


def _run_units(p, x, blocks):
    """The prepared model's inference graph cut at `blocks`, each unit's recorded graph run
    on the previous one's output: (the last unit's output, the number of units)."""
    c = capture.trace(p, x, train=False)
    units, outs = cut(c, blocks)
    named = {**dict(p.module.named_parameters()), **dict(p.module.named_buffers())}
    h = x
    for members, out in zip(units, outs):
        g = unit_graph(c, members, out)
        feeds = {"x": h, **{r: named[r.split(":", 1)[1]] for r in g["inputs"] if r.startswith(("param:", "const:"))},
                 **{r: p.running[r.split(":", 1)[1]] for r in g["inputs"] if r.startswith("stats:")}}
        h = run_graph(g, feeds)[0]
    return h, len(units)


def _step_graph(model, trainable):
    from edgeprop import datasets
    from edgeprop.exporters import rules
    from edgeprop.exporters.optim import Optimizer
    from edgeprop.exporters.trace import trace_step
    o = rules.Options(rule="backprop", model=model, extra={"trainable": trainable, "input_shape": [1, 8, 8]})
    spec = rules.create(o, datasets.load("digits", "train"))
    unit = spec.units[0]
    gm, *_ = trace_step(unit.module, spec.rule.loss, unit, Optimizer("sgd"), spec.rule.step_inputs(unit, 4))
    return spec, gm


def _convolutions(gm) -> tuple[int, int]:
    """(forward-direction convolutions, transposed ones) in a traced step graph."""
    convs = [n for n in gm.graph.nodes if n.target == torch.ops.aten.convolution.default]
    transposed = sum(bool(n.args[6]) for n in convs)
    return len(convs) - transposed, transposed


@pytest.mark.slow  # over 5 s alone
def test_frozen_weights_get_no_gradient_and_no_optimizer_slot():
    """A step computes only the gradients it needs: with biases training, no weight's
    gradient convolution is in the graph (every forward convolution is one of the model's)."""
    model = small()
    forward_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    spec, gm = _step_graph(model, "bias")
    names = [v for v, _ in spec.model["units"][0]["params"]]
    assert names and all(n.endswith(".bias") for n in names)
    assert _convolutions(gm)[0] == forward_convs
    spec_all, gm_all = _step_graph(model, "all")
    assert _convolutions(gm_all)[0] == 2 * forward_convs  # each weight's gradient is one more convolution
    assert len(spec_all.model["units"][0]["params"]) > len(names)


def test_last_k_trains_the_last_layers_in_execution_order():
    p = capture.prepare(small(), X, "last:2")
    assert {n.rsplit(".", 1)[0] for n in p.trainable} == {"fc.1", "fc.2"}
    assert not p.stats  # every BatchNorm is frozen: its running statistics are constants


def test_bn_trains_batchnorm_affine_only_with_batch_statistics():
    p = capture.prepare(small(), X, "bn")
    assert p.trainable == [n for n, _ in small().named_parameters() if n.startswith(("stem.1", "layer1.bn"))]
    assert set(p.stats) == {"stem.1", "layer1.bn1", "layer1.bn2"}


def _refusal(**options) -> str:
    with pytest.raises(EdgepropError) as e:
        export(options.pop("model", small()), out="/nonexistent/never-written", rule=options.pop("rule", "local"),
               data="digits", progress=False, **options)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_residual_skip_across_a_boundary_is_refused_naming_the_module():
    message = _refusal(blocks=["layer1.conv2", "fc"])
    assert "layer1.conv2" in message and "residual" in message


def test_an_op_without_lowering_is_refused_naming_the_op_and_module():
    class Sorts(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(torch.cumsum(x.flatten(1), dim=1))

    message = _refusal(model=Sorts(), rule="backprop")
    assert "aten.cumsum" in message and "supported ops" in message and "aten.convolution" in message


def test_class_count_mismatch_is_refused():
    model = small()
    model.fc[2] = nn.Linear(8, 5)
    assert "5 class scores but the data has 10" in _refusal(model=model, blocks=["layer2"])


@pytest.mark.parametrize("options, words", [
    ({"blocks": ["nope"]}, "no module 'nope'"),
    ({"blocks": ["fc", "layer1"]}, "execution order"),
    ({"trainable": "conv*"}, "matches no parameter"),
    ({"trainable": "last:99"}, "K must be"),
    ({"model": nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(18, 10)),
      "rule": "backprop", "trainable": "all"}, "ceil_mode"),
])
def test_bad_options_are_one_line_errors(options, words):
    assert words in _refusal(**options)


# LiteRT checks every kind of step graph: all parameters, local units, frozen constants beside
# trainable biases, zeroth-order's forward-only step. last:2 is the bias case's kind of graph
# with other parameters frozen, so it skips the .tflite conversion (~40 CPU seconds a bundle).
# TFLite Micro's arena (a second conversion of each step graph, at B + 1) is not measured here:
# these tests hold the graphs to torch; test_tflm holds the arena to the tflm engine's.
@pytest.mark.slow  # exports five bundles
@pytest.mark.parametrize("rule, options, tflite", [
    ("backprop", {}, True), ("local", {"blocks": ["layer1", "layer2", "fc"]}, True),
    ("backprop", {"trainable": "bias"}, True), ("backprop", {"trainable": "last:2"}, False),
    ("zeroth-order", {"trainable": "bn"}, True)])
def test_exported_units_train_like_torch_on_onnxruntime_and_litert(rule, options, tflite, tmp_path, monkeypatch):
    from edgeprop.exporters import tflite as tflite_format
    from edgeprop.exporters.validate import validate
    pytest.importorskip("litert_torch")
    monkeypatch.setattr(tflite_format, "tflm_arena", lambda *_args: None)
    out = export(small(), out=tmp_path / "b", rule=rule, data="digits", batch_size=8, optimizer="sgd", lr=0.05,
                 tflite=tflite, progress=False, **options)
    for engine in ("onnxruntime", "litert") if tflite else ("onnxruntime",):
        report = validate(out, data="digits", steps=4, engine=engine, progress=False)
        assert report["ok"], (engine, report)
        assert report["lockstep"]["max_abs_diff"] <= 1e-4, (engine, report["lockstep"])
    if rule == "local":  # any unit's classifier can predict; a unit number out of range is refused
        from edgeprop import bundle as bundles
        from edgeprop import datasets
        from edgeprop.runtimes import get_engine
        from edgeprop.trainer import evaluate
        b, test = bundles.load(out), datasets.load("digits", "test")
        state, _ = b.initial_state()
        second = evaluate(b, get_engine("onnxruntime"), test, state, predict_with="2")
        assert second["accuracy"] == pytest.approx(second["per_unit_accuracy"][1], abs=1e-4)
        assert second["predicted_by_unit"] == 2
        with pytest.raises(EdgepropError, match="last or a unit number 1..4"):
            evaluate(b, get_engine("onnxruntime"), test, state, predict_with="9")


MODEL_FILE = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, CLASSES))


def not_a_model():
    return 3
'''


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(MODEL_FILE.replace("CLASSES", "10"))
    return path


def _cli_error(capsys, *args) -> str:
    from edgeprop.cli import main
    assert main(["export", "--data", "digits", "--quiet", *map(str, args)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_cli_refuses_bad_models_and_weights(model_file, tmp_path, capsys):
    out = tmp_path / "b"
    assert "no function 'nope'" in _cli_error(capsys, "--model", f"{model_file}:nope", "--out", out)
    assert "not a torch.nn.Module" in _cli_error(capsys, "--model", f"{model_file}:not_a_model", "--out", out)
    assert "mlp, cnn, FILE.py:FUNCTION or FILE.pt2" in _cli_error(capsys, "--model", "resnet", "--out", out)
    pickled = tmp_path / "code.pt"
    torch.save({"fn": print}, pickled)  # a pickled function: weights_only refuses it
    assert "weights_only=True" in _cli_error(capsys, "--model", f"{model_file}:build", "--weights", pickled,
                                             "--out", out, "--rule", "backprop")
    wrong = tmp_path / "wrong.pt"
    torch.save({"0.weight": torch.zeros(2)}, wrong)
    assert "does not fit the model" in _cli_error(capsys, "--model", f"{model_file}:build", "--weights", wrong,
                                                  "--out", out, "--rule", "backprop")
    five = tmp_path / "five.py"
    five.write_text(MODEL_FILE.replace("CLASSES", "5"))
    assert "5 class scores but the data has 10" in _cli_error(capsys, "--model", f"{five}:build", "--out", out,
                                                              "--rule", "backprop")
    assert not out.exists()


@pytest.mark.slow  # exports, then trains in a torch-free process
def test_cli_fine_tunes_pretrained_weights_biases_only(model_file, tmp_path):
    from conftest import edgeprop
    from edgeprop.exporters import user_model
    pretrained = user_model.load(f"{model_file}:build")
    with torch.no_grad():
        for p in pretrained.parameters():
            p.add_(0.5)
    weights = tmp_path / "sd.pt"
    torch.save(pretrained.state_dict(), weights)
    out = tmp_path / "b"
    edgeprop("export", "--model", f"{model_file}:build", "--weights", weights, "--trainable", "bias", "--rule",
             "backprop", "--data", "digits", "--out", out, "--quiet", torch_allowed=True)
    from edgeprop import bundle as bundles
    b = bundles.load(out)
    assert [v.name for v in b.units[0].layout] == ["body.0.bias", "body.1.bias", "body.5.bias"]
    init = np.load(out / "state" / "init.npz")
    assert np.allclose(init["network/param"][:4], pretrained[0].bias.detach().numpy())
    edgeprop("train", out, "--data", "digits", "--epochs", "1")
    assert "accuracy" in edgeprop("eval", out, "--data", "digits").stdout


ZOO_BLOCKS = {"mobilenet_v2": ["features.7", "features.14", "classifier"], "resnet18": ["layer2", "layer3", "fc"],
              "mobilenet_v3_small": ["features.4", "features.9", "classifier"],
              "squeezenet1_1": ["features.6", "features.9", "classifier"],
              "efficientnet_b0": ["features.3", "features.6", "classifier"],
              "shufflenet_v2_x1_0": ["stage3", "stage4", "fc"], "vit": ["encoder.layers.2", "heads"]}


@pytest.mark.slow  # traces seven torchvision models
@pytest.mark.parametrize("name", list(ZOO_BLOCKS))
def test_torchvision_models_are_captured_and_cut_at_their_stages(name):
    """Each model's recorded units, chained, compute what the model computes (eval mode, 32×32)."""
    from edgeprop.exporters import zoo
    torch.manual_seed(0)
    model = zoo.VisionTransformer(32, 4, 64, 4, 4, 128, 10) if name == "vit" else zoo.create(name, num_classes=10)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    p = capture.prepare(model, x, "all")
    for train in (True, False):
        capture.check_ops(capture.trace(p, x, train))
    h, _ = _run_units(p, x, ZOO_BLOCKS[name])
    with torch.no_grad():
        want = model.eval()(x)
    assert torch.allclose(h, want, atol=1e-4 * max(1.0, float(want.abs().max())))
