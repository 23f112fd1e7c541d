"""Write a bundle: every unit's step and inference graphs, initial state, manifest."""
from __future__ import annotations

import functools
import json
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np

from edgeprop import datasets
from edgeprop.bundle import FUSED, INIT_STATE, write_manifest
from edgeprop.bundle import load as load_bundle
from edgeprop.errors import EdgepropError
from edgeprop.progress import Progress
from edgeprop.storage import new_folder, save_arrays

from . import auto_trainable, graph_model, rules
from . import fused as fused_format
from . import ort_training as ort_format
from . import tflite as tflite_format
from .any_batch import NotBatchGeneric, at_batch, check_generic, sentinel_inputs
from .liveness import memory_facts
from .models import initial_stats, input_norm
from .optim import Optimizer
from .trace import describe, flatten, layout, onnx_model, save_checked, trace_infer, trace_step


def export_graph(trace, inputs_of, batch: int, root: Path, rel: str, loss_output: str | None,
                 tflite: bool = False, planned: bool = False, keep: dict | None = None) -> dict:
    """Export `trace(inputs_of(batch))` to root/rel (ONNX; also .tflite when asked) and
    describe it for the manifest, with the memory facts the device-side planner needs: the
    graph at batch + 1 too, so that the planner can scale every figure to other batch sizes.
    Both come from one export at the sentinel batch (any_batch) where the graph allows.
    `planned`: units step with this graph, so the planner needs TFLite Micro's arena for it
    too (measured only then: a .tflite conversion costs seconds). `keep`: a dict that gets
    keep[rel] = (the graph at batch, at batch + 1), for a graph built from this one."""
    try:
        try:
            gm, args, names, outputs = trace(sentinel_inputs(inputs_of), fake=True)
            generic = onnx_model(gm, args, names, outputs)
        except Exception as e:  # noqa: BLE001 - e.g. a data-dependent op fake tensors cannot trace
            raise NotBatchGeneric(str(e)) from e  # the export at B says what is wrong, if anything
        check_generic(generic)
        model, bigger = at_batch(generic, batch), at_batch(generic, batch + 1)
    except NotBatchGeneric:  # a constant depends on the batch size: export at both sizes
        gm, args, names, outputs = trace(inputs_of(batch))
        model, bigger = onnx_model(gm, args, names, outputs), onnx_model(*trace(inputs_of(batch + 1)))
    save_checked(model, names, outputs, root / rel)
    if keep is not None:
        keep[rel] = (model, bigger)
    entry = describe(model, rel)
    facts = memory_facts(model, bigger, batch, loss_output, rel)
    if tflite:
        entry["tflite"] = str(Path(rel).with_suffix(".tflite"))
        tflite_format.to_tflite(*trace(inputs_of(batch))[:2], root / entry["tflite"])
        if planned:
            scratch = root / ".planner" / Path(rel).with_suffix(".tflite").name
            try:
                arena = tflite_format.tflm_arena(root / entry["tflite"], batch,
                                                 lambda: trace(inputs_of(batch + 1)), scratch)
            finally:
                shutil.rmtree(scratch.parent, ignore_errors=True)
            if arena:
                facts["tflm_arena"] = arena  # TFLite Micro's exact arena: the tflm engine's, for the planner
    return {**entry, "memory": facts}


def _auto_device(extra: dict):
    """The device profile --trainable auto fits (None unless trainable is "auto")."""
    device = extra.pop("device", None)
    if extra.get("trainable") != "auto":
        if device is not None:
            raise EdgepropError("--device at export is for --trainable auto (the largest trainable set that fits)")
        return None
    if device is None:
        raise EdgepropError("--trainable auto needs --device, the device profile the plan must fit")
    from edgeprop.devices import load_profile
    return load_profile(device) if isinstance(device, str) else device


def export(model_or_out=None, /, *, out: str | Path | None = None, rule: str = "noprop-dt", model="mlp",
           data: str = "digits", batch_size: int | None = None, optimizer: str = "adamw", weight_decay: float = 1e-3,
           momentum: float = 0.9, example_input=None, tflite: bool = False, ort_training: bool = False,
           force: bool = False, progress: bool = True, fused_step: bool = False, **options) -> Path:
    """Export `model` trained by `rule` on `data` as a bundle folder at `out`; return its path.

        export(seq, rule="local", example_input=torch.zeros(1, 1, 28, 28), out="runs/mine")
        export("runs/digits", rule="noprop-dt", model="mlp")     # a built-in model

    model: "mlp", "cnn" (NoProp-DT's blocks) or a torch.nn.Sequential of supported layers
    (sequential rules). example_input: a tensor (B, ...) giving a user model's input shape.
    Other keyword options (blocks, width, depth, lr, head_lr, eta, embedding, seed, ...)
    are those of rules.Options; rule-specific ones go to the rule.

    tflite=True also writes every graph as graphs/<unit>_{step,infer}.tflite for the litert
    engine (needs the tflite extra: litert-torch). ort_training=True also writes
    onnxruntime-training artifacts under ort_training/ for the ort-training engine (needs
    that package's own environment: scripts/engine-venv.sh ort-training). fused_step=True also
    writes graphs/fused_step.onnx, every unit's step in one graph (exporters/fused.py), for a
    rule whose units are independent within a batch.

    Files written: manifest.json, graphs/<unit>_{step,infer}.onnx, state/init.npz (see
    edgeprop.bundle). The bundle is built beside `out` and moved into place at the end, so a
    failed export never leaves half a bundle; an existing bundle is replaced only with
    `force=True` (its checkpoints go with it).
    """
    call = {k: v for k, v in locals().items() if k not in ("model_or_out", "options")} | options
    if isinstance(model_or_out, (str, Path)):
        out = model_or_out
    elif model_or_out is not None:
        model = model_or_out
    if out is None:
        raise EdgepropError("export needs out=, the bundle folder to write")
    known = {f.name for f in fields(rules.Options)}
    extra = {k: options.pop(k) for k in list(options) if k not in known}
    device = _auto_device(extra)
    if example_input is not None:
        extra["input_shape"] = [int(s) for s in example_input.shape[1:]]
    opts = rules.Options(rule=rule, model=model, extra=extra, **options)
    module = rules.rule_module(rule)  # an unknown rule fails before any work
    if fused_step:
        fused_format.check_rule(rule, rules.updates_itself(rule))
    if batch_size is None:  # the rule's (NoProp-DT: 128, the paper's), else 64
        batch_size = getattr(module, "DEFAULT_BATCH", 64)
    if tflite:
        tflite_format.require()
    if ort_training:
        ort_format.training_python()
    if batch_size < 1:
        raise EdgepropError("--batch-size must be at least 1")
    out = Path(out)
    if (out / "manifest.json").exists() and not force:
        raise EdgepropError(f"{out} already holds a bundle; pass --force to replace it (and its checkpoints)")
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").exists():
        raise EdgepropError(f"{out} exists and is not an edgeprop bundle; choose another --out")

    train = datasets.load(data, "train")
    if len(train) == 0:
        raise EdgepropError(f"{train.name}: no samples")
    if train.y.min() < 0:
        raise EdgepropError(f"{train.name}: negative label {int(train.y.min())}")
    try:
        opt = Optimizer(optimizer, weight_decay=weight_decay, momentum=momentum)
    except ValueError as e:
        raise EdgepropError(str(e)) from None
    if device is not None:  # --trainable auto: export the candidates, keep the largest that fits
        if isinstance(model, str):
            raise EdgepropError("--trainable auto is for your own model (--model FILE.py:FUNCTION)")
        chosen = auto_trainable.export_auto(
            lambda names, folder: export(**{**call, "model": model, "out": folder, "trainable": names, "device": None,
                                            "force": True, "progress": False}),
            model, graph_model.input_shape(opts, train.x.shape[1:]), device, train.x.nbytes, out)
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["model"]["trainable_auto"] = {k: v for k, v in chosen.items() if k != "parameters"}
        write_manifest(out, manifest)
        return out
    spec = rules.create(opts, train)
    datasets.check(train, spec.model["input_shape"], spec.model["num_classes"])
    if ort_training:
        ort_format.check_trainable(spec, opt)

    # A rule whose device half updates the weights itself (zeroth-order) exports no step
    # graph: its units' step names the inference graph, and they have no optimizer slots.
    own_update = rules.updates_itself(rule)
    kinds = ("infer",) if own_update else ("step", "infer")
    slots = () if own_update else opt.slots
    with new_folder(out) as tmp:
        first = {}  # graph key -> the first unit using it
        for u in spec.units:
            first.setdefault(u.graph, u)
        bar = Progress(len(kinds) * len(first), "export", unit="graphs", enabled=progress)
        graphs, kept = {}, {}
        for key, unit in first.items():
            def step_graph(data, fake=False, unit=unit):
                return trace_step(unit.module, spec.rule.loss, unit, opt, data, fake)

            def infer_graph(data, fake=False, unit=unit):
                return trace_infer(unit.module, data, spec.rule.infer_outputs(unit), fake)

            for kind in kinds:
                trace = step_graph if kind == "step" else infer_graph
                inputs_of = functools.partial(spec.rule.step_inputs if kind == "step" else spec.rule.infer_inputs, unit)
                rel = f"graphs/{key}_{kind}.onnx"
                graphs[f"{key}_{kind}"] = export_graph(trace, inputs_of, batch_size, tmp, rel,
                                                       "loss" if kind == "step" else None, tflite,
                                                       planned=kind == kinds[0], keep=kept if fused_step else None)
                bar.update(len(graphs))
        bar.close()

        arrays, units_json = dict(spec.arrays), []
        for u in spec.units:
            flat = flatten(u.module).numpy().astype(np.float32)
            arrays[f"{u.name}/param"] = flat
            arrays.update({f"{u.name}/opt.{s}": np.zeros_like(flat) for s in slots})
            state = [{"name": key, "shape": [len(flat)], "dtype": "float32"}
                     for key in ["param"] + [f"opt.{s}" for s in slots]]
            stats = u.module.initial_stats() if hasattr(u.module, "initial_stats") else initial_stats(u.module)
            if len(stats):  # BatchNorm's running statistics: state that steps update, not the optimizer
                arrays[f"{u.name}/stats"] = stats
                state.append({"name": "stats", "shape": [len(stats)], "dtype": "float32"})
            units_json.append({"name": u.name, "role": u.role, "t": u.t, "step_graph": f"{u.graph}_{kinds[0]}",
                               "infer_graph": f"{u.graph}_infer", "lr": u.lr, "state": state,
                               "layout": layout(u.module), "scratch": u.scratch})
        save_arrays(tmp / INIT_STATE, arrays)
        fused = {}
        if fused_step:
            fused = {FUSED: fused_format.export_fused(rule, [(u.name, kept[f"graphs/{u.graph}_step.onnx"])
                                                             for u in spec.units], batch_size, tmp)}
        ort = {"ort_training": ort_format.export_ort_training(spec, opt, batch_size, tmp)} if ort_training else {}

        write_manifest(tmp, {
            "format": "edgeprop-bundle", "rule": rule, "model": spec.model, "batch_size": batch_size,
            "optimizer": opt.to_json(), "seed": opts.seed,
            "data": {"source": data, "n_train": len(train)},
            "input_norm": input_norm(train.x),
            "graphs": graphs, "units": units_json, **ort, **fused,
            **spec.manifest})  # the rule's entries win: its own optimizer, fine-tuned weights' input_norm
        load_bundle(tmp)  # the device-side loader must accept what we wrote
    return out
