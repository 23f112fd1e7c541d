"""ONNX Runtime on-device training artifacts for a bundle (the `ort-training` engine).

Everywhere else edgeprop compiles a unit's whole step (forward, in-block gradient, optimizer)
into one inference graph. This writes the same unit for ONNX Runtime's own training API
instead: a forward model of the unit with its trainable parameters as initializers (named as
in the unit's layout), the rule's loss put on top as an onnxblock, and AdamW matching the
bundle's optimizer. onnxruntime-training derives the gradient graph itself, so this is also
the back-prop anchor: the `--rule backprop` bundle's single unit is the whole network.

    BUNDLE/ort_training/<graph key>/  training_model.onnx  eval_model.onnx
                                      optimizer_model.onnx checkpoint  artifacts.json

onnxruntime-training 1.19.2 (the last release) needs onnx 1.17 and installs the same
`onnxruntime` module as the inference package, so the artifacts are generated in its own
virtual environment (scripts/engine-venv.sh ort-training), by exporters/ort_artifacts.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgeprop.errors import EdgepropError

from . import rules
from .optim import Optimizer
from .trace import layout, onnx_model

ROOT = Path(__file__).resolve().parents[1]
FOLDER = "ort_training"
FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
MAX_IR_VERSION = 10  # onnx 1.17 / onnxruntime-training 1.19 reject anything newer
LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-3


def training_python() -> Path:
    """The ort-training virtual environment's python ($EDGEPROP_ORT_TRAINING_PYTHON overrides)."""
    override = os.environ.get("EDGEPROP_ORT_TRAINING_PYTHON")
    python = Path(override) if override else ROOT / ".venvs" / "ort-training" / "bin" / "python"
    if not python.exists():
        raise EdgepropError(f"--ort-training needs onnxruntime-training in its own virtual environment: {python} "
                            "is missing; run scripts/engine-venv.sh ort-training")
    return python


def loss_plan(rule, unit) -> dict:
    """How the unit's loss goes on top of its forward model:

        kind     "denoise" (NoProp-DT block), "cross_entropy" (one-hot target, masked mean) or
                 "output" (the forward model computes the rule's loss itself: any other rule)
        outputs  the forward model's outputs; for "output" the loss comes first
        extra    outputs the trained step returns beside the loss (a chained unit's h)
    """
    from .rules.chained import Chained
    from .rules.noprop_dt import NopropDT
    if isinstance(rule, NopropDT):
        if unit.role == "head":
            return {"kind": "cross_entropy", "outputs": ["logits"], "extra": []}
        return {"kind": "denoise", "outputs": ["u_hat"], "extra": []}
    if isinstance(rule, Chained):
        outputs = rule.infer_outputs(unit)  # ["logits"] or ["h", "logits"]
        return {"kind": "cross_entropy", "options": {"logits_index": outputs.index("logits")},
                "outputs": outputs, "extra": [o for o in outputs if o != "logits"]}
    return {"kind": "output", "outputs": None, "extra": None}


class _Forward(nn.Module):
    """The unit's prediction, on its data inputs."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.unit = module

    def forward(self, *inputs):
        return self.unit(*inputs)


class _WithLoss(nn.Module):
    """The unit's forward pass and the rule's loss (for a rule with no loss block here):
    outputs (loss, *extras)."""

    def __init__(self, module: nn.Module, rule, unit, names: list[str]):
        super().__init__()
        self.unit, self.rule, self.spec, self.names = module, rule, unit, names

    def forward(self, *inputs):
        loss, extras = self.rule.loss(self.spec, self.unit, dict(zip(self.names, inputs)))
        return (loss, *extras.values())


def _export_forward(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], path: Path) -> None:
    model = onnx_model(module, args, inputs, outputs)
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    _cast_like_to_cast(model)
    _decompose_softplus(model)
    _reduce_max_to_top_k(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def _cast_like_to_cast(model: onnx.ModelProto) -> None:
    """CastLike(x, like) -> Cast(x, to=like's type): the exporter writes CastLike for scalar
    constants, and onnxruntime-training has no gradient for it (it has one for Cast)."""
    if not any(n.op_type == "CastLike" for n in model.graph.node):
        return
    typed = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*typed.graph.input, *typed.graph.output, *typed.graph.value_info]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            types[node.output[0]] = node.attribute[0].t.data_type
    for node in model.graph.node:
        if node.op_type != "CastLike":
            continue
        to = types.get(node.input[1])
        if not to:
            raise EdgepropError(f"ort-training: cannot tell the type CastLike node {node.name} casts to")
        del node.input[1:]
        del node.attribute[:]
        node.op_type = "Cast"
        node.attribute.append(onnx.helper.make_attribute("to", to))


def _decompose_softplus(model: onnx.ModelProto) -> None:
    """Softplus(x) -> relu(x) + log(1 + exp(x - 2 relu(x))) (= relu(x) + log(1 + exp(-|x|)),
    stable for large |x|): onnxruntime-training has no gradient for Softplus, and has one
    for each op here."""
    nodes, changed = [], False
    for node in model.graph.node:
        if node.op_type != "Softplus":
            nodes.append(node)
            continue
        changed = True
        x, y, p = node.input[0], node.output[0], f"{node.name or node.output[0]}_sp"
        make = onnx.helper.make_node
        one = onnx.helper.make_tensor("one", onnx.TensorProto.FLOAT, [], [1.0])
        nodes += [make("Relu", [x], [f"{p}_relu"]),
                  make("Add", [f"{p}_relu", f"{p}_relu"], [f"{p}_2relu"]),
                  make("Sub", [x, f"{p}_2relu"], [f"{p}_negabs"]),
                  make("Exp", [f"{p}_negabs"], [f"{p}_exp"]),
                  make("Constant", [], [f"{p}_one"], value=one),
                  make("Add", [f"{p}_exp", f"{p}_one"], [f"{p}_1p"]),
                  make("Log", [f"{p}_1p"], [f"{p}_log"]),
                  make("Add", [f"{p}_relu", f"{p}_log"], [y])]
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)


def _constants(model: onnx.ModelProto) -> dict:
    values = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return values


def _reduce_max_to_top_k(model: onnx.ModelProto) -> None:
    """ReduceMax over one axis -> TopK(k=1) on it: onnxruntime-training has no gradient for
    ReduceMax (torch writes one for a detached log-sum-exp shift; its gradient cancels)."""
    constants, nodes, changed = _constants(model), [], False
    for node in model.graph.node:
        axes = constants.get(node.input[1]) if node.op_type == "ReduceMax" and len(node.input) > 1 else None
        if axes is None or axes.size != 1:
            nodes.append(node)
            continue
        changed = True
        keep = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        p, make = f"{node.name or node.output[0]}_topk", onnx.helper.make_node
        k = onnx.helper.make_tensor("k", onnx.TensorProto.INT64, [1], [1])
        values = node.output[0] if keep else f"{p}_values"
        nodes += [make("Constant", [], [f"{p}_k"], value=k),
                  make("TopK", [node.input[0], f"{p}_k"], [values, f"{p}_indices"], axis=int(axes.reshape(-1)[0]))]
        if not keep:
            nodes.append(make("Squeeze", [values, node.input[1]], [node.output[0]]))
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)


def _torch_check(module: nn.Module, rule, unit, feeds: dict) -> dict:
    """The torch loss and each parameter's gradient norm on the example inputs."""
    module.zero_grad(set_to_none=True)
    loss, _ = rule.loss(unit, module, feeds)
    loss.backward()
    grads = {name: float(p.grad.norm()) if p.grad is not None else 0.0 for name, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return {"loss": float(loss.detach()), "grad_norms": grads}


def _prepare(spec, unit, opt: Optimizer, batch: int, work: Path, out: Path) -> tuple[dict, dict]:
    """Export the unit's forward model; return the job entry and the torch figures to check."""
    rule, module = spec.rule, unit.module
    examples = {k: v.detach() for k, v in rule.step_inputs(unit, batch).items()}
    plan = loss_plan(rule, unit)
    names = [v["name"] for v in layout(module)]
    if plan["kind"] == "output":
        with torch.no_grad():
            _, extras = rule.loss(unit, module, dict(examples))
        plan = {**plan, "outputs": ["loss_value", *extras], "extra": list(extras)}
        data = list(examples)
        wrapper = _WithLoss(module, rule, unit, data)
    else:
        data = list(rule.infer_inputs(unit, batch))
        wrapper = _Forward(module)
    forward = work / unit.graph / "forward.onnx"
    _export_forward(wrapper, tuple(examples[k] for k in data), data, plan["outputs"], forward)
    # Parameters come back as "unit.<layout name>": give them the layout's names. Buffers (a
    # NoProp block's fixed label embedding) and the exporter's constants are initializers
    # that are neither trainable nor frozen parameters: they stay baked into the graphs.
    model = onnx.load(str(forward), load_external_data=False)
    rename = {f"unit.{n}": n for n in names}
    for init in model.graph.initializer:
        if init.name in rename:
            new = rename[init.name]
            for node in model.graph.node:
                node.input[:] = [new if i == init.name else i for i in node.input]
            init.name = new
    missing = sorted(set(names) - {i.name for i in model.graph.initializer})
    if missing:
        raise EdgepropError(f"ort-training: unit '{unit.name}': parameters {missing} are not initializers of "
                            "its exported forward model")
    onnx.save_model(model, str(forward))
    example = work / unit.graph / "example.npz"
    np.savez(example, **{k: v.numpy() for k, v in examples.items()})
    job = {"key": unit.graph, "forward": str(forward), "out": str(out / unit.graph), "example": str(example),
           "requires_grad": names, "frozen": [],
           "loss": {"kind": plan["kind"], "options": plan.get("options", {})},
           "additional_outputs": plan["extra"],
           "optimizer": {"name": opt.name, "betas": list(opt.betas), "eps": opt.eps,
                         "weight_decay": opt.weight_decay}}
    return job, {**_torch_check(module, rule, unit, examples), "plan": plan, "layout": layout(module)}


def _close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-6)


def check_trainable(spec, opt: Optimizer) -> None:
    """What onnxruntime-training cannot run, refused before any work."""
    if rules.updates_itself(spec.name):
        raise EdgepropError("--ort-training: this rule updates the weights itself (no gradient step); "
                            "onnxruntime-training has nothing to train")
    if spec.model.get("dropout"):  # its forward model is the inference pass: no mask inputs
        raise EdgepropError("--ort-training does not feed dropout masks: export the CNN with --dropout 0")
    if spec.model.get("batchnorm"):  # its training API updates parameters only, not running statistics
        raise EdgepropError("--ort-training cannot carry BatchNorm's running statistics: export without --batchnorm")
    if opt.name != "adamw":
        raise EdgepropError(f"--ort-training needs --optimizer adamw: onnxruntime-training's SGD has no momentum "
                            f"and no weight decay, so it cannot match --optimizer {opt.name}")


def export_ort_training(spec, opt: Optimizer, batch: int, root: Path, python: str | Path | None = None,
                        timeout: float = 600) -> dict:
    """Write onnxruntime-training artifacts for every unit graph of `spec` under
    root/ort_training/<graph key>/ and return the manifest's "ort_training" table:

        {graph key: {"folder": "ort_training/<key>", "files": {name: relative path},
                     "inputs": [...], "outputs": ["loss", ...], "loss": kind}}

    Every graph's loss and per-parameter gradient norms on example inputs are checked
    against torch before this returns; a mismatch is an EdgepropError.
    """
    check_trainable(spec, opt)
    python = Path(python) if python else training_python()
    root = Path(root)
    out = root / FOLDER
    first = {}
    for u in spec.units:
        first.setdefault(u.graph, u)
    with tempfile.TemporaryDirectory(prefix="edgeprop-ort-") as tmp:
        work = Path(tmp)
        jobs, expected = [], {}
        for key, unit in first.items():
            job, torch_side = _prepare(spec, unit, opt, batch, work, out)
            jobs.append(job)
            expected[key] = torch_side
        (work / "job.json").write_text(json.dumps({"graphs": jobs}))
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        env.pop("PYTHONPATH", None)
        # cwd: onnxblock writes scratch files (temp.onnx) into the working directory.
        proc = subprocess.run([str(python), "-m", "edgeprop.exporters.ort_artifacts", str(work / "job.json")],
                              capture_output=True, text=True, timeout=timeout, cwd=work, env=env)
        if proc.returncode != 0:
            # onnxruntime's own log lines ("2026-... [I:onnxruntime:...]") would bury the error
            said = "\n".join(line for line in proc.stderr.splitlines() if not re.match(r"\d{4}-\d\d-\d\d ", line))
            raise EdgepropError(f"onnxruntime-training could not generate the artifacts "
                                f"({python} exited {proc.returncode}):\n{said[-3000:]}")
        lines = [line for line in proc.stdout.splitlines() if line.startswith('{"results"')]
        if not lines:
            raise EdgepropError(f"onnxruntime-training artifact generation printed no result:\n{proc.stdout[-2000:]}")
        results = {r["key"]: r for r in json.loads(lines[-1])["results"]}

    table = {}
    for key in first:
        got, want = results[key], expected[key]
        if not _close(got["loss"], want["loss"], LOSS_RTOL):
            raise EdgepropError(f"ort-training: graph '{key}': onnxruntime-training's loss {got['loss']:.7g} differs "
                                f"from torch's {want['loss']:.7g} on the same inputs")
        for name, norm in want["grad_norms"].items():
            if not _close(got["grad_norms"][name], norm, GRAD_RTOL):
                raise EdgepropError(f"ort-training: graph '{key}': gradient of '{name}' has norm "
                                    f"{got['grad_norms'][name]:.7g} in onnxruntime-training, {norm:.7g} in torch")
        folder = f"{FOLDER}/{key}"
        entry = {"folder": folder, "files": {f: f"{folder}/{f}" for f in (*FILES, "artifacts.json")},
                 "inputs": got["inputs"], "outputs": got["outputs"], "loss": want["plan"]["kind"],
                 "extra_outputs": want["plan"]["extra"], "batch_size": batch}
        # What the device reads beside the artifacts: the manifest's entry, the flat layout.
        (root / folder / "artifacts.json").write_text(json.dumps(
            {**entry, "layout": want["layout"], "optimizer": opt.to_json()}, indent=1) + "\n")
        table[key] = entry
        for scratch in ("temp.onnx", "temp.onnx.data"):
            with contextlib.suppress(FileNotFoundError):
                (root / folder / scratch).unlink()
    return table
