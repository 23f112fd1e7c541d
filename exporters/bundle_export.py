"""Write a NoProp-DT bundle: step and inference graphs, initial state, manifest."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from edgeprop import datasets
from edgeprop.bundle import INIT_STATE, write_manifest
from edgeprop.bundle import load as load_bundle
from edgeprop.errors import EdgepropError
from edgeprop.progress import Progress
from edgeprop.schedule import NoiseSchedule
from edgeprop.storage import new_folder, save_arrays

from .liveness import memory_facts
from .models import MODELS, build_unit, label_embedding
from .optim import Optimizer
from .trace import describe, flatten, layout, to_onnx, trace_infer, trace_step


def example_inputs(role: str, batch: int, input_shape: list[int], classes: int, dim: int) -> dict[str, torch.Tensor]:
    """Example data inputs of a unit's step graph; their shapes fix the graph's batch size."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch)
    if role == "head":
        return {"z": torch.randn(batch, dim, generator=g), "target": torch.eye(classes)[torch.arange(batch) % classes],
                "mask": mask}
    return {"x": torch.randn(batch, *input_shape, generator=g), "z": torch.randn(batch, dim, generator=g),
            "target": torch.randn(batch, dim, generator=g), "mask": mask, "loss_scale": torch.tensor(1.0)}


DEFAULT_WIDTH = {"mlp": 128, "cnn": 256}


def model_input_shape(model: str, sample_shape: tuple[int, ...]) -> list[int]:
    """The model's input: flat for the MLP; (channels, height, width) for the CNN, taking
    (H, W) images as one channel and flat square samples (8x8 digits) as square images."""
    if model == "mlp":
        return [int(np.prod(sample_shape))]
    if len(sample_shape) == 3:
        return [int(s) for s in sample_shape]
    if len(sample_shape) == 2:
        return [1, int(sample_shape[0]), int(sample_shape[1])]
    side = int(round(np.sqrt(sample_shape[0]))) if len(sample_shape) == 1 else 0
    if side * side != int(np.prod(sample_shape)):
        raise EdgepropError(f"--model cnn needs images; samples have shape {list(sample_shape)}")
    return [1, side, side]


def export_graph(trace, batch: int, root: Path, rel: str, loss_output: str | None) -> dict:
    """Export `trace(batch)` to root/rel and describe it for the manifest, with the memory
    facts the device-side planner needs. The graph is also traced at batch + 1 (and thrown
    away) so that the planner can scale every figure to other batch sizes."""
    model = to_onnx(*trace(batch), root / rel)
    scratch = root / ".planner" / Path(rel).name
    try:
        bigger = to_onnx(*trace(batch + 1), scratch)
    finally:
        shutil.rmtree(scratch.parent, ignore_errors=True)
    return {**describe(model, rel), "memory": memory_facts(model, bigger, batch, loss_output, rel)}


def export(out: str | Path, *, rule: str = "noprop-dt", model: str = "mlp", data: str = "digits",
           blocks: int = 10, width: int | None = None, embedding: str = "one-hot", embed_dim: int | None = None,
           batch_size: int = 64, optimizer: str = "adamw", lr: float = 1e-3, head_lr: float = 1e-2,
           weight_decay: float = 1e-3,
           momentum: float = 0.9, eta: float = 0.1, seed: int = 0, force: bool = False,
           progress: bool = True) -> Path:
    """Export a NoProp-DT model for `data` as a bundle folder at `out` and return its path.

    Files written: manifest.json, graphs/{block,head}_{step,infer}.onnx, state/init.npz
    (see edgeprop.bundle). The bundle is built beside `out` and moved into place at the end,
    so a failed export never leaves half a bundle; an existing bundle is replaced only with
    `force=True` (its checkpoints go with it).
    """
    if rule != "noprop-dt":
        raise EdgepropError(f"--rule {rule}: only noprop-dt is available so far")
    if model not in MODELS:
        raise EdgepropError(f"--model {model}: choose one of {', '.join(MODELS)}")
    width = DEFAULT_WIDTH[model] if width is None else width
    if batch_size < 1 or blocks < 1 or width < 1:
        raise EdgepropError("--batch-size, --blocks and --width must be at least 1")
    out = Path(out)
    if (out / "manifest.json").exists() and not force:
        raise EdgepropError(f"{out} already holds a bundle; pass --force to replace it (and its checkpoints)")
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").exists():
        raise EdgepropError(f"{out} exists and is not an edgeprop bundle; choose another --out")

    train = datasets.load(data, "train")
    if len(train) == 0:
        raise EdgepropError(f"{train.name}: no samples")
    classes = int(train.y.max()) + 1  # check() below rejects negative labels
    input_shape = model_input_shape(model, train.x.shape[1:])
    datasets.check(train, input_shape, classes)
    try:
        emb = label_embedding(embedding, classes, embed_dim, seed)
        opt = Optimizer(optimizer, weight_decay=weight_decay, momentum=momentum)
    except ValueError as e:
        raise EdgepropError(str(e)) from None
    sched = NoiseSchedule.cosine(blocks, eta=eta).check()
    model_json = {"kind": model, "input_shape": input_shape, "num_classes": classes,
                  "embed_dim": int(emb.shape[1]), "embedding": embedding, "width": width, "blocks": blocks}

    torch.manual_seed(seed)
    units = [(f"block{t}", "block", t, build_unit(model_json, "block", emb)) for t in range(1, blocks + 1)]
    units.append(("head", "head", None, build_unit(model_json, "head", emb)))

    with new_folder(out) as tmp:
        bar = Progress(4, "export", unit="graphs", enabled=progress)
        graphs = {}
        for role, module in (("block", units[0][3]), ("head", units[-1][3])):
            def step_graph(batch, role=role, module=module):
                return trace_step(module, role, opt, example_inputs(role, batch, input_shape, classes, emb.shape[1]))

            def infer_graph(batch, role=role, module=module):
                data_in = example_inputs(role, batch, input_shape, classes, emb.shape[1])
                names = ("z",) if role == "head" else ("x", "z")
                return trace_infer(module, {k: data_in[k] for k in names}, "logits" if role == "head" else "u_hat")

            for kind, trace in (("step", step_graph), ("infer", infer_graph)):
                rel = f"graphs/{role}_{kind}.onnx"
                graphs[f"{role}_{kind}"] = export_graph(trace, batch_size, tmp, rel, "loss" if kind == "step" else None)
                bar.update(len(graphs))
        bar.close()

        arrays, units_json = {"embedding": emb}, []
        for name, role, t, module in units:
            flat = flatten(module).numpy().astype(np.float32)
            arrays[f"{name}/param"] = flat
            arrays.update({f"{name}/opt.{s}": np.zeros_like(flat) for s in opt.slots})
            state = [{"name": key, "shape": [len(flat)], "dtype": "float32"}
                     for key in ["param"] + [f"opt.{s}" for s in opt.slots]]
            units_json.append({"name": name, "role": role, "t": t, "step_graph": f"{role}_step",
                               "infer_graph": f"{role}_infer", "lr": head_lr if role == "head" else lr,
                               "state": state, "layout": layout(module)})
        save_arrays(tmp / INIT_STATE, arrays)

        write_manifest(tmp, {
            "format": "edgeprop-bundle", "rule": rule, "model": model_json, "batch_size": batch_size,
            "optimizer": opt.to_json(), "noise": sched.to_json(), "seed": seed,
            "data": {"source": data, "n_train": len(train)},
            "input_norm": {"mean": float(train.x.mean(dtype=np.float64)),
                           "std": float(train.x.std(dtype=np.float64)) or 1.0},
            "graphs": graphs, "units": units_json})
        load_bundle(tmp)  # the device-side loader must accept what we wrote
    return out
