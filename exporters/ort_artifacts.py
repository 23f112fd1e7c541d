"""ONNX Runtime training artifacts for one bundle: runs *inside* the ort-training virtual
environment (onnxruntime-training 1.19.2, onnx 1.17; no torch), started by
exporters/ort_training.py as

    .venvs/ort-training/bin/python -m edgeprop.exporters.ort_artifacts JOB.json

JOB.json lists, per unit graph, a forward model (the unit's prediction, trainable parameters
as initializers named as in the unit's layout), which loss block to put on top, the
optimizer and where to write. For each one this writes training_model.onnx, eval_model.onnx,
optimizer_model.onnx and checkpoint with onnxruntime.training.artifacts.generate_artifacts,
then runs one training step on the job's example inputs and prints, as one JSON line, every
graph's loss there and its gradient norm (the desktop compares both with torch).

Imports onnx and onnxruntime only.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeprop.runtimes.ort_training import import_training

LOSS_NAME = "loss"


def _blocks():
    """The loss blocks, defined once onnxruntime.training can be imported."""
    training = import_training()
    onnxblock = training.onnxblock

    class _Loss(onnxblock.Block):
        """Shared helpers: graph inputs, constants and nodes appended to the base model."""

        def _input(self, name: str, shape: list[int]) -> str:
            self.base.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
            return name

        def _const(self, name: str, values, dtype=TensorProto.FLOAT, dims=None) -> str:
            values = list(np.ravel(values))
            self.base.graph.initializer.append(
                helper.make_tensor(name, dtype, [len(values)] if dims is None else dims, values))
            return name

        def _node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
            self.base.graph.node.append(helper.make_node(op, inputs, [output], name=f"edgeprop_loss/{output}", **attrs))
            return output

        def _shape(self, name: str) -> list[int]:
            for v in [*self.base.graph.output, *self.base.graph.value_info]:
                if v.name == name:
                    return [d.dim_value for d in v.type.tensor_type.shape.dim]
            raise LookupError(f"no shape known for {name}")

        def _masked_mean(self, per_sample: str, mask: str) -> str:
            """sum(per_sample * mask) / max(sum(mask), 1), as models.py writes it."""
            weighted = self._node("Mul", [per_sample, mask], "edgeprop_weighted")
            total = self._node("ReduceSum", [weighted], "edgeprop_total", keepdims=0)
            count = self._node("ReduceSum", [mask], "edgeprop_count", keepdims=0)
            one = self._const("edgeprop_one", [1.0], dims=[])
            return self._node("Div", [total, self._node("Max", [count, one], "edgeprop_count1")], "edgeprop_mean")

    class DenoiseLoss(_Loss):
        """NoProp-DT block t: loss_scale · masked mean over samples of ||û − target||² (models.denoise_loss)."""

        def build(self, u_hat: str, *_other_outputs):
            shape = self._shape(u_hat)
            target = self._input("target", shape)
            mask = self._input("mask", shape[:1])
            scale = self._input("loss_scale", [])
            diff = self._node("Sub", [u_hat, target], "edgeprop_diff")
            sq = self._node("Mul", [diff, diff], "edgeprop_sq")
            axes = self._const("edgeprop_last_axis", [-1], TensorProto.INT64)
            per_sample = self._node("ReduceSum", [sq, axes], "edgeprop_per_sample", keepdims=0)
            return self._node("Mul", [scale, self._masked_mean(per_sample, mask)], LOSS_NAME)

    class CrossEntropyLoss(_Loss):
        """Masked mean of log Σ exp(logits) − target · logits, target one-hot (models.cross_entropy).
        log Σ exp is read off LogSoftmax (logits − log_softmax, constant along the classes), so
        the graph needs only ops ORT has gradients for."""

        def __init__(self, logits_index: int = 0):
            super().__init__()
            self.logits_index = logits_index

        def build(self, *outputs: str):
            logits = outputs[self.logits_index]
            shape = self._shape(logits)
            target = self._input("target", shape)
            mask = self._input("mask", shape[:1])
            axes = self._const("edgeprop_last_axis", [-1], TensorProto.INT64)
            log_p = self._node("LogSoftmax", [logits], "edgeprop_log_p", axis=-1)
            log_z = self._node("ReduceMean", [self._node("Sub", [logits, log_p], "edgeprop_log_z_rows"), axes],
                               "edgeprop_log_z", keepdims=0)
            picked = self._node("ReduceSum", [self._node("Mul", [target, logits], "edgeprop_tl"), axes],
                                "edgeprop_picked", keepdims=0)
            per_sample = self._node("Sub", [log_z, picked], "edgeprop_per_sample")
            mean = self._masked_mean(per_sample, mask)
            return self._node("Identity", [mean], LOSS_NAME)

    class OutputLoss(_Loss):
        """The forward model already outputs the loss (first output): pass it through."""

        def build(self, loss: str, *_other_outputs):
            return self._node("Identity", [loss], LOSS_NAME)

    return {"denoise": DenoiseLoss, "cross_entropy": CrossEntropyLoss, "output": OutputLoss}


def _torch_adamw(optimizer_model: Path) -> None:
    """onnxblock's AdamW writes adam_mode=1 (Hugging Face's AdamW: eps added before the bias
    correction, weight decay applied after the update); torch.optim.AdamW is adam_mode=0."""
    model = onnx.load(str(optimizer_model))
    nodes = [n for n in model.graph.node if n.op_type == "AdamWOptimizer"]
    if len(nodes) != 1:
        raise RuntimeError(f"{optimizer_model}: expected one AdamWOptimizer node, found {len(nodes)}")
    for attr in nodes[0].attribute:
        if attr.name == "adam_mode":
            attr.i = 0
    onnx.save(model, str(optimizer_model))


def generate(graph: dict) -> dict:
    training = import_training()
    artifacts, onnxblock = training.artifacts, training.onnxblock
    out = Path(graph["out"])
    out.mkdir(parents=True, exist_ok=True)
    loss = graph["loss"]
    blocks = _blocks()
    block = blocks[loss["kind"]](**loss.get("options", {}))
    opt = graph["optimizer"]
    if opt["name"] != "adamw":
        raise RuntimeError(f"optimizer {opt['name']!r}: onnxruntime-training's other optimizer (SGDOptimizerV2) has "
                           "no momentum and no weight decay, so it cannot match the bundle's")
    optimizer = onnxblock.optim.AdamW(bias_correction=True, betas=tuple(opt["betas"]), eps=float(opt["eps"]),
                                      weight_decay=float(opt["weight_decay"]))
    model = onnx.load(graph["forward"])
    artifacts.generate_artifacts(model, requires_grad=graph["requires_grad"], frozen_params=graph["frozen"],
                                 loss=block, optimizer=optimizer, artifact_directory=out,
                                 additional_output_names=graph.get("additional_outputs") or None)
    _torch_adamw(out / "optimizer_model.onnx")
    return _check(graph, out)


def _check(graph: dict, out: Path) -> dict:
    """One training step on the example inputs: the loss and each parameter's gradient norm."""
    api = import_training().api
    state = api.CheckpointState.load_checkpoint(str(out / "checkpoint"))
    module = api.Module(str(out / "training_model.onnx"), state, str(out / "eval_model.onnx"))
    with np.load(graph["example"]) as arrays:
        feeds = {k: arrays[k] for k in arrays.files}
    names = module.input_names()
    outputs = module(*[feeds[n] for n in names])
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = {name: float(np.linalg.norm(state.parameters[name].grad)) for name in graph["requires_grad"]}
    return {"key": graph["key"], "inputs": names, "outputs": module.output_names(),
            "loss": float(outputs[0]), "grad_norms": grads}


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    results = [generate(g) for g in job["graphs"]]
    print(json.dumps({"results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
