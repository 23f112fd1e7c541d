"""One ONNX export serves every batch size (exporters/any_batch.py): the sentinel batch's
multiples are rewritten to B; a graph that bakes the batch into a float is refused (and then
exported at each size); a bundle exported either way holds the same graphs and facts."""
import contextlib
import json
from unittest import mock

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from edgeprop.exporters import any_batch, bundle_export, export  # noqa: E402

P = any_batch.SENTINEL


def _reshape_model(shape_const, scale=None) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [P, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2 * P, 3])
    inits = [numpy_helper.from_array(np.array(shape_const, np.int64), "shape")]
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"])]
    if scale is not None:
        inits.append(numpy_helper.from_array(np.array(scale, np.float32), "scale"))
        nodes.append(helper.make_node("Mul", ["r", "scale"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", ["r"], ["y"]))
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits))


def test_multiples_of_the_sentinel_become_multiples_of_the_batch():
    model = _reshape_model([2 * P, 3])
    any_batch.check_generic(model)
    at5 = any_batch.at_batch(model, 5)
    assert numpy_helper.to_array(at5.graph.initializer[0]).tolist() == [10, 3]
    assert [d.dim_value for d in at5.graph.input[0].type.tensor_type.shape.dim] == [5, 6]
    assert [d.dim_value for d in at5.graph.output[0].type.tensor_type.shape.dim] == [10, 3]
    assert numpy_helper.to_array(model.graph.initializer[0]).tolist() == [2 * P, 3]  # the original is kept


@pytest.mark.parametrize("const, scale", [([2 * P, 3], 1 / (4 * P)), ([2 * P, 3], 3.0 * P), ([2 * P - 1, 3], None)])
def test_a_batch_size_baked_in_otherwise_is_refused(const, scale):
    with pytest.raises(any_batch.NotBatchGeneric):
        any_batch.check_generic(_reshape_model(const, scale))


@pytest.mark.parametrize("scale", [1e-8, 1e-5, 0.5, 1e9, -3.4028234663852886e38, float("inf")])
def test_a_float_that_only_looks_large_is_not_the_batch(scale):
    """An epsilon's reciprocal (1e8) is near some multiple of the sentinel in relative terms;
    only a float within float32 rounding of k * SENTINEL or 1 / (k * SENTINEL) is refused.
    Max pooling pads with -FLT_MAX, whose float32 spacing is wider than any multiple."""
    any_batch.check_generic(_reshape_model([2 * P, 3], scale))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.drop, self.fc = nn.Dropout(0.2), nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = nn.functional.avg_pool2d(nn.functional.max_pool2d(h, 3, stride=1, padding=1), 2)  # pads with -FLT_MAX
        return self.fc(self.drop(h.flatten(1)))


def _bundle(tmp_path, name, **patch):
    torch.manual_seed(0)
    with mock.patch.multiple(bundle_export, **patch) if patch else contextlib.nullcontext():
        out = export(_Net(), out=tmp_path / name, rule="backprop", data="digits", batch_size=6, optimizer="sgd",
                     progress=False)
    return json.loads((out / "manifest.json").read_text()), out


def _refuse(*_args, **_kw):
    raise any_batch.NotBatchGeneric("export at B and B + 1")


@pytest.mark.slow
def test_one_export_gives_the_graphs_and_facts_of_two(tmp_path):
    rewrites = mock.Mock(wraps=any_batch.at_batch)
    with mock.patch.object(bundle_export, "at_batch", rewrites):
        one, a = _bundle(tmp_path, "one")
    assert rewrites.call_count == 4  # step and inference graphs, each at B and B + 1: from one export each
    two, b = _bundle(tmp_path, "two", sentinel_inputs=_refuse)
    assert one["graphs"] == two["graphs"]  # inputs, outputs and every memory fact
    for g in one["graphs"].values():
        ga, gb = onnx.load(str(a / g["file"])).graph, onnx.load(str(b / g["file"])).graph
        assert [n.op_type for n in ga.node] == [n.op_type for n in gb.node]
        for ta, tb in zip(ga.initializer, gb.initializer):
            np.testing.assert_array_equal(numpy_helper.to_array(ta), numpy_helper.to_array(tb))
