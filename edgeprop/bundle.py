"""The bundle: what the desktop hands the device, loadable without pickle or code execution.

    BUNDLE/
      manifest.json        schema version, rule, model, hyperparameters, noise schedule,
                           every graph's inputs/outputs and every state tensor (name, shape,
                           dtype), sha256 of every file below
      graphs/*.onnx        per-unit step graphs and inference graphs
      graphs/*.tflite      the same graphs for LiteRT (bundles exported with --tflite)
      ort_training/KEY/    onnxruntime-training artifacts of graph KEY (--ort-training):
                           training, eval and optimizer models, checkpoint, artifacts.json
      state/init.npz       initial parameters and optimizer state of every unit, "UNIT/KEY";
                           "embedding" holds the fixed label embedding W_embed (classes × d)
      checkpoints/         written by `edgeprop train` (not covered by the manifest)

A unit is one thing the device steps on its own: a NoProp block or head, a block of a
sequential model with its local classifier, a Forward-Forward layer, a whole network.
Units with the same role and shapes share one step graph file; their weights differ.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from . import manifest as manifest_fields
from .errors import BundleError
from .rules import RULES
from .schedule import MEAN, NoiseSchedule, check_temperature
from .storage import open_arrays, sha256_of, write_atomic

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
INIT_STATE = "state/init.npz"
CHECKPOINT = "checkpoints/last.npz"
FUSED = manifest_fields.FUSED  # the manifest's entry of the optional fused step graph
STREAM_FOLDER = "checkpoints/stream"  # --stream's memory-mapped working state
MAX_MANIFEST = 64 << 20  # bytes: read whole, so bounded (a real one is tens of KB)


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def from_json(cls, d: dict, where: str) -> Tensor:
        try:
            return cls(str(d["name"]), tuple(int(s) for s in d["shape"]), str(np.dtype(d["dtype"])))
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest.json: bad tensor description in {where} ({e!r})") from None

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    def check(self, value: np.ndarray, where: str) -> None:
        if tuple(value.shape) != self.shape or str(value.dtype) != self.dtype:
            raise BundleError(f"{where}: '{self.name}' is {value.dtype}{list(value.shape)}, "
                              f"the manifest says {self.dtype}{list(self.shape)}")
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise BundleError(f"{where}: '{self.name}' holds NaN or inf")


@dataclass(frozen=True)
class Graph:
    files: dict[str, str]  # one file per format, by suffix: {".onnx": "graphs/x.onnx", ".tflite": ...}
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    @property
    def file(self) -> str:
        return self.files[".onnx"]

    @staticmethod
    def files_of(entry: dict) -> dict[str, str]:
        """A manifest graph entry's files: "file" (ONNX, always) and "tflite" (optional)."""
        return {".onnx": entry["file"], **({".tflite": entry["tflite"]} if "tflite" in entry else {})}


@dataclass(frozen=True)
class View:
    """One parameter tensor inside a unit's flat parameter buffer."""
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


STATS = "stats"  # the state buffer of BatchNorm's running statistics


@dataclass(frozen=True)
class FusedStep:
    """The optional graph that steps every unit of an interleaved batch in one call
    (`export --fused-step`): unit U's tensors are "U/K" in it, its updates "next.U/K"; the
    inputs in `shared` (the same for every unit of a batch) are fed once, by their own name."""
    graph: Graph
    units: tuple[str, ...]   # every unit, in the order they step
    shared: tuple[str, ...]

    @staticmethod
    def name(unit: str, key: str) -> str:
        """Unit `unit`'s tensor `key` in the fused graph: "UNIT/KEY", an update "next.UNIT/K"."""
        return f"next.{unit}/{key[5:]}" if key.startswith("next.") else f"{unit}/{key}"


@dataclass(frozen=True)
class Unit:
    name: str
    role: str            # what the rule makes of it: "block", "head", "layer", "network", ...
    t: int | None        # NoProp-DT's block index 1..T (None otherwise)
    step_graph: str      # key into Bundle.graphs
    infer_graph: str
    lr: float            # default learning rate (a step-graph input: the trainer may override it)
    state: tuple[Tensor, ...]  # flat buffers: "param", one per optimizer slot ("opt.m", ...), and
                               # "stats" where the unit has BatchNorm (its running statistics)
    layout: tuple[View, ...]   # the named parameter tensors inside "param"

    @property
    def n_params(self) -> int:
        return sum(v.size for v in self.layout)

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Named views (no copies) of a flat buffer laid out like "param"."""
        return {v.name: flat[v.offset:v.offset + v.size].reshape(v.shape) for v in self.layout}

    def locate(self, index: int) -> str:
        """Which parameter element a flat index is, e.g. "image.0.weight[3, 17]"."""
        for v in self.layout:
            if v.offset <= index < v.offset + v.size:
                return f"{v.name}{[int(i) for i in np.unravel_index(index - v.offset, v.shape)]}"
        return f"[{index}]"

    def check_layout(self, where: str) -> None:
        offset = 0
        for v in self.layout:
            if v.offset != offset or v.size <= 0:
                raise BundleError(f"{where}: unit '{self.name}': parameter '{v.name}' is not packed at offset {offset}")
            offset += v.size
        for t in self.state:
            if t.name == STATS:  # BatchNorm's running statistics: a buffer of their own length
                if len(t.shape) != 1:
                    raise BundleError(f"{where}: unit '{self.name}': '{t.name}' must be a flat buffer")
            elif t.shape != (offset,):
                raise BundleError(f"{where}: unit '{self.name}': '{t.name}' has shape {list(t.shape)}, "
                                  f"the layout needs [{offset}]")


class Bundle:
    """A loaded, fully validated bundle (made by `load`)."""

    embedding: np.ndarray | None  # NoProp's fixed label embedding W_embed (classes × d)

    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        self.id = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
        manifest_fields.check(manifest, str(self.root / MANIFEST))
        try:
            self.rule = manifest["rule"]
            self.model = manifest["model"]
            self.input_shape = [int(s) for s in self.model["input_shape"]]
            self.num_classes = int(self.model["num_classes"])
            self.batch_size = int(manifest["batch_size"])
            self.optimizer = manifest["optimizer"]
            self.input_norm = (float(manifest["input_norm"]["mean"]), float(manifest["input_norm"]["std"]))
            self.graphs = {k: Graph(Graph.files_of(g), tuple(Tensor.from_json(t, k) for t in g["inputs"]),
                                    tuple(Tensor.from_json(t, k) for t in g["outputs"]))
                           for k, g in manifest["graphs"].items()}
            self.units = [Unit(u["name"], u["role"], u.get("t"), u["step_graph"], u["infer_graph"], float(u["lr"]),
                               tuple(Tensor.from_json(t, u["name"]) for t in u["state"]),
                               tuple(View(str(v["name"]), tuple(int(s) for s in v["shape"]), int(v["offset"]))
                                     for v in u["layout"]))
                          for u in manifest["units"]]
            fused = manifest.get(FUSED)
            self.fused = None if fused is None else FusedStep(
                Graph({".onnx": fused["file"]}, tuple(Tensor.from_json(t, FUSED) for t in fused["inputs"]),
                      tuple(Tensor.from_json(t, FUSED) for t in fused["outputs"])),
                tuple(str(n) for n in fused["units"]), tuple(str(n) for n in fused["shared"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"{self.root / MANIFEST}: missing or malformed field ({e!r})") from None
        if self.rule not in RULES:
            raise BundleError(f"{self.root / MANIFEST}: rule '{self.rule}' is not one this edgeprop runs "
                              f"({', '.join(RULES)})")
        noisy = self.rule == "noprop-dt" or "noise" in manifest
        self.schedule = NoiseSchedule.from_json(manifest.get("noise", {})) if noisy else None
        self.temperature, self.temperature_note = _temperature(self.root / MANIFEST, self.rule, manifest)
        self.embedding = None
        for unit in self.units:
            unit.check_layout(str(self.root / MANIFEST))
        if self.model.get("learned_embedding"):  # the head holds the W_embed it learns
            shape = (self.num_classes, int(self.model.get("embed_dim", 0)))
            view = next((v for v in self.head.layout if v.name == "embedding"), None) if self.head else None
            if view is None or view.shape != shape:
                raise BundleError(f"{self.root / MANIFEST}: a learned embedding must be the head's parameter "
                                  f"'embedding' of shape {shape[0]}×{shape[1]}")

    @property
    def blocks(self) -> list[Unit]:
        return [u for u in self.units if u.role == "block"]

    @property
    def head(self) -> Unit | None:
        return next((u for u in self.units if u.role == "head"), None)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def graph_path(self, key: str, suffix: str = ".onnx") -> Path:
        files = self.graphs[key].files
        if suffix not in files:
            raise BundleError(f"{self.root}: this bundle has no {suffix} graphs (export it with "
                              f"--{suffix.lstrip('.')} to run it on that engine)")
        return self.root / files[suffix]

    def load_graph(self, engine, key: str):
        """Graph `key` loaded by `engine` (edgeprop.engine.Engine) from the file in its format."""
        return engine.load(self.graph_path(key, engine.suffix), self.graphs[key])

    def load_fused(self, engine):
        """The fused step graph loaded by `engine`: an error naming the fix where there is none."""
        if self.fused is None:
            raise BundleError(f"{self.root}: this bundle has no fused step graph; export it with --fused-step "
                              f"to train with --fused-step")
        if engine.suffix != ".onnx":
            raise BundleError(f"{self.root}: the fused step graph is ONNX only; engine {engine.name} reads "
                              f"{engine.suffix} graphs (train it with onnxruntime or native)")
        return engine.load(self.root / self.fused.graph.file, self.fused.graph)

    def initial_state(self) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray]:
        """({unit: {key: array}}, embedding), checked against the manifest."""
        with open_arrays(self.path(INIT_STATE)) as (arrays, _):
            return split_state(self, arrays, INIT_STATE), _embedding(self, arrays)

    def checkpoint_path(self) -> Path:
        return self.path(CHECKPOINT)

    def check_writable(self) -> None:
        """Before a run writes (checkpoints, streamed state): the folders it writes into must
        stay inside the bundle (a symlinked checkpoints/ would have edgeprop write, and clean
        up, somewhere it did not create) and the bundle must be writable, so that a run does
        not fail only at its first checkpoint."""
        root = self.root.resolve()
        for rel in ("checkpoints", STREAM_FOLDER):
            where = self.root / rel
            if where.is_symlink() or (where.exists() and root not in where.resolve().parents):
                raise BundleError(f"{where}: a link to outside the bundle; edgeprop writes and cleans up only "
                                  f"inside the bundle folder (make it a plain folder)")
        if not os.access(self.root, os.W_OK) or (self.root / "checkpoints").exists() and \
                not os.access(self.root / "checkpoints", os.W_OK):
            raise BundleError(f"{self.root}: not writable; training writes its checkpoints here")


# Rules whose inference chain adds noise, and their inference temperature τ when the manifest
# names none (edgeprop.schedule): bundles exported before τ existed run the mean chain.
TEMPERATURE_DEFAULT = {"noprop-dt": MEAN, "noprop-ct": MEAN}


def _temperature(where: Path, rule: str, manifest: dict) -> tuple[float | None, str | None]:
    """(τ, a note when it is a default rather than the manifest's), or (None, None) for a rule
    whose inference adds no noise."""
    if rule not in TEMPERATURE_DEFAULT:
        return None, None
    inference = manifest.get("inference", {})
    if not isinstance(inference, dict):
        raise BundleError(f"{where}: 'inference' must be an object")
    if "temperature" not in inference:
        tau = TEMPERATURE_DEFAULT[rule]
        return tau, f"not in the manifest (exported before inference temperature existed): default {tau:g}"
    return check_temperature(inference["temperature"], f"{where}: inference.temperature"), None


def unit_state(unit: Unit, arrays: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """One unit's tensors ("UNIT/KEY" in `arrays`), checked against the manifest."""
    tensors = {}
    for t in unit.state:
        key = f"{unit.name}/{t.name}"
        if key not in arrays:
            raise BundleError(f"{where}: tensor '{key}' is missing")
        if hasattr(arrays, "header"):  # an archive: compare the header before reading any data
            shape, dtype = arrays.header(key)
            if shape != t.shape or str(dtype) != t.dtype:
                raise BundleError(f"{where}: '{t.name}' is {dtype}{list(shape)}, "
                                  f"the manifest says {t.dtype}{list(t.shape)}")
        tensors[t.name] = arrays[key]
        t.check(tensors[t.name], where)
    return tensors


def split_state(bundle: Bundle, arrays: Mapping[str, np.ndarray], where: str) -> dict[str, dict[str, np.ndarray]]:
    return {unit.name: unit_state(unit, arrays, where) for unit in bundle.units}


def flat_items(state: Mapping[str, Mapping[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """("UNIT/KEY", array) pairs, one unit at a time (a streamed state maps one unit at a time)."""
    for unit, tensors in state.items():
        for key, value in tensors.items():
            yield f"{unit}/{key}", value


def _embedding(bundle: Bundle, arrays: Mapping[str, np.ndarray]) -> np.ndarray | None:
    if "embed_dim" not in bundle.model:  # only NoProp's rules have a label embedding
        return None
    emb = arrays.get("embedding")
    d = int(bundle.model["embed_dim"])
    if emb is None or emb.shape != (bundle.num_classes, d) or not np.all(np.isfinite(emb)):
        raise BundleError(f"{INIT_STATE}: 'embedding' must be a finite {bundle.num_classes}×{d} array")
    return emb


def _safe_relative(rel: str, root: Path) -> Path:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise BundleError(f"{root / MANIFEST}: file path '{rel}' leaves the bundle folder")
    return root / p


def load(path: str | Path) -> Bundle:
    """Load and validate a bundle folder: schema, checksums, tensor shapes, schedule invariants."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: no bundle folder here (run `edgeprop export` first)")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{mpath}: file is missing")
    if mpath.stat().st_size > MAX_MANIFEST:
        raise BundleError(f"{mpath}: {mpath.stat().st_size} bytes; a manifest is never over {MAX_MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from None
    except RecursionError:
        raise BundleError(f"{mpath}: JSON nested too deeply; not an edgeprop manifest") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("schema_version"), int):
        raise BundleError(f"{mpath}: no integer schema_version; not an edgeprop bundle")
    version = manifest["schema_version"]
    if version > SCHEMA_VERSION:
        raise BundleError(f"{mpath}: schema version {version} is newer than this edgeprop understands "
                          f"({SCHEMA_VERSION}); upgrade edgeprop on this device")
    if version < 1:
        raise BundleError(f"{mpath}: schema version {version} is not valid")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{mpath}: no 'files' table of checksums")
    for rel, digest in files.items():
        fpath = _safe_relative(rel, root)
        if not fpath.is_file():
            raise BundleError(f"{fpath}: file is missing (listed in manifest.json)")
        if sha256_of(fpath) != digest:
            raise BundleError(f"{fpath}: sha256 does not match manifest.json (corrupt or modified file)")
    bundle = Bundle(root, manifest)
    used = bundle_files(manifest)
    unchecked = sorted((used | {INIT_STATE}) - set(files))
    if unchecked:
        raise BundleError(f"{mpath}: {unchecked} used but without a checksum in 'files'")
    for unit in bundle.units:
        for key in (unit.step_graph, unit.infer_graph):
            if key not in bundle.graphs:
                raise BundleError(f"{mpath}: unit '{unit.name}' names graph '{key}', which is not listed")
    # Shapes, dtypes, finiteness of every initial tensor, read one at a time (a device may
    # not have room for all of them at once); the small fixed embedding is kept.
    with open_arrays(bundle.path(INIT_STATE)) as (arrays, _):
        for unit in bundle.units:
            unit_state(unit, arrays, INIT_STATE)
        bundle.embedding = _embedding(bundle, arrays)
    return bundle


def bundle_files(manifest: dict) -> set[str]:
    """Every file a manifest names: graphs in each format, onnxruntime-training artifacts."""
    return ({f for g in manifest["graphs"].values() for f in Graph.files_of(g).values()}
            | {f for e in manifest.get("ort_training", {}).values() for f in e["files"].values()}
            | ({manifest[FUSED]["file"]} if FUSED in manifest else set()))


def write_manifest(root: Path, manifest: dict) -> None:
    """Fill in the checksums of every file the manifest names and write it atomically."""
    root = Path(root)
    files = sorted(bundle_files(manifest) | {INIT_STATE})
    manifest = dict(manifest, schema_version=SCHEMA_VERSION,
                    files={rel: sha256_of(root / rel) for rel in files})
    write_atomic(root / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
