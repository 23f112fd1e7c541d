"""The `ort-training` engine: ONNX Runtime's own on-device training API (onnxruntime-training
1.19.2, the last release; x86_64 only) on the artifacts `edgeprop export --ort-training`
writes under BUNDLE/ort_training/<graph key>/ (exporters/ort_training.py).

Unlike the inference engines, which are fed a unit's parameters and optimizer state and
return the next ones, onnxruntime-training owns them: a unit is a CheckpointState, a Module
(its training and eval models) and an Optimizer (AdamW, matching torch.optim.AdamW).

    unit = OrtTrainingUnit("runs/digits/ort_training/block", threads=1)
    unit.load_params(flat)                  # edgeprop's flat "param" buffer of that unit
    out = unit.step(feeds, lr)              # {"loss": ..., extra outputs}; one AdamW update
    flat = unit.params()                    # the updated buffer, laid out as in the bundle
    state, n = unit.get_state()             # {"param", "opt.m", "opt.v"} and AdamW's step count
    unit.set_state(state, n)                # ... back (resume from an edgeprop checkpoint)

The Python API exposes parameters but not AdamW's moments or step count; get_state and
set_state read and write them through ONNX Runtime's own checkpoint file (a flatbuffer,
read and built with the schema classes onnxruntime ships), so edgeprop's checkpoints hold
the same buffers whichever engine trained.

Needs its own virtual environment (scripts/engine-venv.sh ort-training): the package
installs the same `onnxruntime` module as the inference build. numpy and onnxruntime only.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

from edgeprop.errors import BundleError, EdgepropError
from edgeprop.memory import EngineMemory

FOLDER = "ort_training"
FORMATS = (".onnx",)  # inference graphs; units train from the bundle's ort_training/ artifacts
# onnxruntime-training 1.19.2, numpy 2.0, CPython 3.11 on x86-64 (tests/test_ort_training.py):
# interpreter 11 MiB, numpy 14, edgeprop 8, onnxruntime.training 27, bundle and data 4. Its
# first session brings 11 MB; each unit then holds ~7.5 KB per node of its step graph (its
# training, eval and optimizer sessions, built twice: the trainer sets each unit's state
# by rebuilding it on a checkpoint) and 16 copies of its weights: params, gradients and
# AdamW's two moments, plus what that rebuild's checkpoint (a flatbuffer built in a
# buffer of 12x the weights) leaves resident. Fitted on five digits MLP bundles (2-10
# blocks, width 48-256, batch 16-64): each within 5% of the measured working set.
MEMORY = EngineMemory("ort-training", 67_300_000, 7_500, 0, True,
                      "each unit's own sessions, measured on x86-64 (onnxruntime-training 1.19.2): "
                      "7.5 KB per node + 16x its weights + its activations, after an 11 MB environment",
                      copies=16, first_session=11_000_000)


def import_training():
    """onnxruntime.training (api, artifacts, onnxblock), without PyTorch.

    onnxruntime-training 1.19.2's package __init__ imports its `optim` subpackage, which
    imports torch, so `import onnxruntime.training.api` fails where torch is not installed
    (microsoft/onnxruntime#22070, unfixed in the last release). Nothing on-device uses that
    subpackage (it holds ORTModule's torch optimizers): where torch is absent, an empty
    stand-in takes its place.
    """
    name = "onnxruntime.training.optim"
    if name not in sys.modules and importlib.util.find_spec("torch") is None:
        stub = types.ModuleType(name)
        stub.__doc__ = "stand-in: onnxruntime.training.optim needs torch, which is not installed"
        sys.modules[name] = stub
    try:
        import onnxruntime.training as training
        from onnxruntime.training import api, artifacts, onnxblock  # noqa: F401
    except ImportError as e:
        raise EdgepropError(f"engine 'ort-training' needs onnxruntime-training ({e}); it lives in its own "
                            "virtual environment: scripts/engine-venv.sh ort-training") from None
    return training


class OrtTrainingUnit:
    """One unit's training state in onnxruntime-training: parameters, gradients, AdamW moments."""

    def __init__(self, folder: str | Path, threads: int = 1):
        folder = Path(folder)
        try:
            self.meta = json.loads((folder / "artifacts.json").read_text())
        except (OSError, ValueError) as e:
            raise BundleError(f"{folder}: no onnxruntime-training artifacts here ({e}); export the bundle with "
                              "--ort-training") from None
        import_training()
        import onnxruntime as ort
        self.options = ort.SessionOptions()
        self.options.intra_op_num_threads = threads
        self.options.inter_op_num_threads = 1
        self.options.log_severity_level = 3
        self.folder = folder
        try:
            self._load(folder / "checkpoint")
        except Exception as e:  # onnxruntime raises its own exception types for bad artifacts
            raise BundleError(f"{folder}: onnxruntime-training cannot load these artifacts ({e})") from None
        self.layout = [(v["name"], tuple(v["shape"]), int(v["offset"])) for v in self.meta["layout"]]
        self.size = sum(int(np.prod(shape)) for _, shape, _ in self.layout)
        self.input_names = self.module.input_names()
        self.output_names = self.module.output_names()
        self.eval_input_names = self.module.eval().input_names()
        self.eval_output_names = self.module.output_names()
        self.module.train()
        self.updates = 0

    # -- parameters as edgeprop's flat buffer -------------------------------------------------
    def params(self) -> np.ndarray:
        """The unit's parameters as one flat float32 buffer, laid out as the bundle's "param"."""
        flat = np.empty(self.size, np.float32)
        for name, shape, offset in self.layout:
            flat[offset:offset + int(np.prod(shape))] = self.state.parameters[name].data.reshape(-1)
        return flat

    def load_params(self, flat: np.ndarray) -> None:
        """Set the parameters from a flat buffer laid out as the bundle's "param" (AdamW's
        moments are left as they are)."""
        flat = np.asarray(flat, np.float32)
        if flat.shape != (self.size,):
            raise BundleError(f"{self.folder}: a flat parameter buffer of shape {list(flat.shape)} was given; "
                              f"this unit has [{self.size}]")
        for name, shape, offset in self.layout:
            self.state.parameters[name] = np.ascontiguousarray(flat[offset:offset + int(np.prod(shape))].reshape(shape))

    # -- training -----------------------------------------------------------------------------
    def _inputs(self, names: list[str], feeds: dict) -> list[np.ndarray]:
        missing = [n for n in names if n not in feeds]
        if missing:
            raise BundleError(f"{self.folder}: input(s) {missing} were not fed")
        return [np.ascontiguousarray(feeds[n]) for n in names]

    def step(self, feeds: dict[str, np.ndarray], lr: float) -> dict[str, np.ndarray]:
        """One update on a batch: forward, loss, gradient (onnxruntime-training's own), AdamW
        at learning rate `lr`. Returns the training model's outputs ("loss" and the rule's
        extra outputs), computed before the update."""
        self.module.train()
        self.module.lazy_reset_grad()
        out = self.module(*self._inputs(self.input_names, feeds))
        out = dict(zip(self.output_names, out if isinstance(out, tuple) else (out,)))
        out["loss"] = np.asarray(out["loss"]).reshape(())
        if np.isfinite(out["loss"]):
            self.optimizer.set_learning_rate(float(lr))
            self.optimizer.step()
            self.updates += 1
        return out

    def evaluate(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The eval model (forward and loss, no update) on a batch."""
        self.module.eval()
        try:
            out = self.module(*self._inputs(self.eval_input_names, feeds))
        finally:
            self.module.train()
        return dict(zip(self.eval_output_names, out if isinstance(out, tuple) else (out,)))

    def export_inference(self, path: str | Path, outputs: list[str]) -> None:
        """The trained forward model, parameters baked in, for any ONNX inference engine."""
        self.module.export_model_for_inferencing(str(path), outputs)

    # -- the whole training state as edgeprop's buffers ---------------------------------------
    def get_state(self) -> tuple[dict[str, np.ndarray], int]:
        """({"param", "opt.m", "opt.v"} flat buffers, AdamW's update count)."""
        api = import_training().api
        with tempfile.TemporaryDirectory(prefix="edgeprop-ort-") as tmp:
            path = Path(tmp) / "checkpoint"
            api.CheckpointState.save_checkpoint(self.state, str(path), include_optimizer_state=True)
            params, moments, step = _read_checkpoint(path.read_bytes())
        state = {key: np.zeros(self.size, np.float32) for key in ("param", "opt.m", "opt.v")}
        for name, shape, offset in self.layout:
            end = offset + int(np.prod(shape))
            state["param"][offset:end] = params[name].reshape(-1)
            if name in moments:  # none before the first update
                state["opt.m"][offset:end] = moments[name][0].reshape(-1)
                state["opt.v"][offset:end] = moments[name][1].reshape(-1)
        return state, step

    def set_state(self, state: dict[str, np.ndarray], step: int) -> None:
        """Parameters, AdamW's moments and its update count from edgeprop's buffers (the
        session is rebuilt on a checkpoint holding them: ~tens of ms)."""
        for key in ("param", "opt.m", "opt.v"):
            if np.shape(state[key]) != (self.size,):
                raise BundleError(f"{self.folder}: '{key}' has shape {list(np.shape(state[key]))}, "
                                  f"this unit needs [{self.size}]")
        cut = {}
        for name, shape, offset in self.layout:
            end = offset + int(np.prod(shape))
            cut[name] = tuple(np.asarray(state[k][offset:end], np.float32).reshape(shape)
                              for k in ("param", "opt.m", "opt.v"))
        lr = self.optimizer.get_learning_rate()
        with tempfile.TemporaryDirectory(prefix="edgeprop-ort-") as tmp:
            path = Path(tmp) / "checkpoint"
            path.write_bytes(_build_checkpoint(cut, int(step), lr))
            self._load(path)
        self.updates = int(step)

    def _load(self, checkpoint: Path) -> None:
        api = import_training().api
        self.state = api.CheckpointState.load_checkpoint(str(checkpoint))
        self.module = api.Module(str(self.folder / "training_model.onnx"), self.state,
                                 str(self.folder / "eval_model.onnx"), session_options=self.options)
        self.optimizer = api.Optimizer(str(self.folder / "optimizer_model.onnx"), self.module)


def _fbs():
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py import fbs
    return fbs


def _tensor_array(t) -> np.ndarray:
    if t.DataType() != 1:  # TensorDataType.FLOAT
        raise BundleError(f"onnxruntime-training checkpoint: tensor {t.Name().decode()} is not float32")
    raw = t.RawDataAsNumpy()
    return np.frombuffer(raw.tobytes(), np.float32).reshape(tuple(t.DimsAsNumpy()))


def _read_checkpoint(buf: bytes) -> tuple[dict, dict, int]:
    """({param: array}, {param: (first moment, second moment)}, step) of a checkpoint file."""
    fbs = _fbs()
    ckpt = fbs.Checkpoint.Checkpoint.GetRootAs(buf, 0)
    module = ckpt.ModuleState()
    params = {}
    for i in range(module.RequiresGradParamsLength()):
        t = module.RequiresGradParams(i)
        params[t.Name().decode()] = _tensor_array(t)
    moments, step = {}, 0
    if ckpt.OptimizerGroupsLength():
        group = ckpt.OptimizerGroups(0)
        step = int(group.Step())
        for i in range(group.OptimizerStatesLength()):
            ps = group.OptimizerStates(i)
            named = {ps.Momentums(j).Name().decode(): _tensor_array(ps.Momentums(j))
                     for j in range(ps.MomentumsLength())}
            moments[ps.ParamName().decode()] = (named["momentum0"], named["momentum1"])
    return params, moments, step


def _build_checkpoint(cut: dict[str, tuple[np.ndarray, ...]], step: int, lr: float) -> bytes:
    """An onnxruntime-training checkpoint (schema version 2, identifier ODTC) holding these
    trainable parameters and their AdamW state (momentum0 = m, momentum1 = v)."""
    import flatbuffers
    fbs = _fbs()
    T, MS, OG = fbs.Tensor, fbs.ModuleState, fbs.OptimizerGroup
    PS, C = fbs.ParameterOptimizerState, fbs.Checkpoint
    b = flatbuffers.Builder(1024 + 12 * sum(a.nbytes for a, _, _ in cut.values()))

    def vector(start, items, prepend):
        start(b, len(items))
        for item in reversed(items):
            prepend(item)
        return b.EndVector()

    def tensor(name: str, array: np.ndarray) -> int:
        name_off = b.CreateString(name)
        dims = vector(lambda b_, n: T.StartDimsVector(b_, n), list(array.shape), b.PrependInt64)
        raw = b.CreateNumpyVector(np.ascontiguousarray(array, np.float32).view(np.uint8).reshape(-1))
        T.Start(b)
        T.AddName(b, name_off)
        T.AddDims(b, dims)
        T.AddDataType(b, 1)
        T.AddRawData(b, raw)
        return T.End(b)

    names = sorted(cut)  # onnxruntime keeps them in name order, as its own files do
    params = [tensor(n, cut[n][0]) for n in names]
    states = []
    for n in names:
        momentums = [tensor("momentum0", cut[n][1]), tensor("momentum1", cut[n][2])]
        mom_vec = vector(lambda b_, k: PS.StartMomentumsVector(b_, k), momentums, b.PrependUOffsetTRelative)
        pname = b.CreateString(n)
        PS.Start(b)
        PS.AddParamName(b, pname)
        PS.AddMomentums(b, mom_vec)
        states.append(PS.End(b))
    param_vec = vector(lambda b_, k: MS.StartRequiresGradParamsVector(b_, k), params, b.PrependUOffsetTRelative)
    frozen_vec = vector(lambda b_, k: MS.StartFrozenParamsVector(b_, k), [], b.PrependUOffsetTRelative)
    MS.Start(b)
    MS.AddRequiresGradParams(b, param_vec)
    MS.AddFrozenParams(b, frozen_vec)
    module = MS.End(b)
    state_vec = vector(lambda b_, k: OG.StartOptimizerStatesVector(b_, k), states, b.PrependUOffsetTRelative)
    group_name = b.CreateString("group0")
    OG.Start(b)
    OG.AddGroupName(b, group_name)
    OG.AddStep(b, step)
    OG.AddInitialLearningRate(b, lr)
    OG.AddOptimizerStates(b, state_vec)
    group = OG.End(b)
    groups = vector(lambda b_, k: C.StartOptimizerGroupsVector(b_, k), [group], b.PrependUOffsetTRelative)
    C.Start(b)
    C.AddVersion(b, 2)
    C.AddModuleState(b, module)
    C.AddOptimizerGroups(b, groups)
    b.Finish(C.End(b), file_identifier=b"ODTC")
    return bytes(b.Output())


class Engine:
    """`get_engine("ort-training")`: training units from a bundle's ort_training artifacts;
    inference graphs run on onnxruntime-training's own InferenceSession (it has one)."""

    name = "ort-training"
    suffix = ".onnx"
    trains_itself = True  # owns parameters and optimizer state: the trainer steps units, not graphs

    def __init__(self, threads: int = 1, provider: str = "cpu"):
        if provider != "cpu":
            raise EdgepropError("engine 'ort-training' runs on the CPU only here (--provider cpu)")
        import_training()
        self.threads = threads

    def load(self, path: Path, spec=None):
        from .onnxruntime import Engine as Inference
        return Inference(threads=self.threads).load(path)

    def load_unit(self, bundle, unit) -> OrtTrainingUnit:
        """The unit's artifacts (shared by every unit of its graph), with the unit's own
        initial parameters loaded by the caller (`load_params`)."""
        key = unit.step_graph.removesuffix("_step")
        return OrtTrainingUnit(Path(bundle.root) / FOLDER / key, threads=self.threads)
