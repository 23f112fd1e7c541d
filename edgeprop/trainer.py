"""The device-side trainer: feeds each unit's step graph, keeps weights, checkpoints, resumes.

Imports numpy only: the engine that runs the graphs is handed in (edgeprop.engine says what
it must do). The learning itself (forward, local loss, in-block gradient, optimizer update)
happens inside the compiled step graphs.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import numpy as np

from . import rss
from .bundle import INIT_STATE, STATS, Bundle, flat_items, split_state
from .datasets import Dataset, stratified_split
from .errors import BundleError, EdgepropError
from .progress import Progress
from .rules import ORDERS, Plan, for_bundle
from .sizes import format_size
from .state import StreamedState
from .storage import open_arrays, save_arrays, sha256_of, write_atomic

LR_SCHEDULES = ("constant", "cosine")


def learning_rate(base: float, schedule: str, step: int, total: int) -> float:
    """The learning rate of a unit's `step`-th update (1-based) out of `total`.

    lr is a step-graph input, so a schedule is plain arithmetic here, not a graph change."""
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * (step - 1) / total))
    return base


def base_learning_rates(bundle: Bundle, config: TrainConfig) -> dict[str, float]:
    """Each unit's learning rate before any schedule: the bundle's, unless the run overrides it
    (--head-lr for a unit whose role is "head", --lr for every other)."""
    def chosen(unit):
        override = config.head_lr if unit.role == "head" else config.lr
        return float(override if override is not None else unit.lr)
    return {u.name: chosen(u) for u in bundle.units}


@dataclass
class TrainConfig:
    epochs: int = 30
    order: str = "interleaved"
    seed: int = 0
    lr: float | None = None        # blocks' learning rate; None: the bundle's
    head_lr: float | None = None   # the head's learning rate; None: the bundle's
    lr_schedule: str = "constant"  # or "cosine": each unit decays from lr to 0 over its steps
    checkpoint_every: int | None = None  # work items (one unit's update each) between checkpoints
    checkpoint_seconds: float = 60.0     # ... or this much time, whichever comes first: flash wears
    stream: bool = False         # units not stepping stay in memory-mapped files, not in RAM
    budget: int | None = None    # bytes the working set may take; the watchdog stops training beyond it
    # ... or bytes the whole process may take on a device: the working set gets what is left
    # once the trainer has measured the runtime and data (its baseline)
    device_budget: int | None = None
    # Names of the units this run trains (None: all). A fleet client trains the units the
    # server assigned it; the others keep their weights (chained rules read their outputs).
    units: tuple[str, ...] | None = None
    # Share of the training data kept out of training (stratified, fixed): the validation
    # split `eval --predict-with best` judges the units on.
    holdout: float = 0.0
    # Step every unit of a batch in one call of the bundle's fused step graph (export
    # --fused-step): interleaved order, every unit's state and activations in memory at once.
    fused: bool = False

    def check(self) -> TrainConfig:
        if self.order not in ORDERS:
            raise EdgepropError(f"--order must be one of {', '.join(ORDERS)}")
        if self.fused and self.order != "interleaved":
            raise EdgepropError(f"--fused-step steps every unit of a batch at once: interleaved order only, "
                                f"not --order {self.order}")
        if self.fused and self.stream:
            raise EdgepropError("--fused-step holds every unit's state in memory at once: --stream does not apply")
        if self.epochs < 1:
            raise EdgepropError("--epochs must be at least 1")
        if not 0 <= self.holdout < 1:
            raise EdgepropError(f"--holdout must be a share of the training data in [0, 1), got {self.holdout}")
        for flag, lr in (("--lr", self.lr), ("--head-lr", self.head_lr)):
            if lr is not None and not (0 < lr <= float(np.finfo(np.float32).max)):  # the graphs take float32
                raise EdgepropError(f"{flag} must be a positive number below {float(np.finfo(np.float32).max):.3g}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise EdgepropError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise EdgepropError("--checkpoint-every must be at least 1")
        if not self.checkpoint_seconds > 0:
            raise EdgepropError("--checkpoint-seconds must be positive")
        if self.budget is not None and self.budget <= 0:
            raise EdgepropError("--budget must be positive")
        if self.device_budget is not None and self.device_budget <= 0:
            raise EdgepropError("the device's budget must be positive")
        check_seed(self.seed)
        return self


def check_seed(seed) -> None:
    """Seeds feed edgeprop.prng's 64-bit counter generator (and its C twin)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 1 << 63:
        raise EdgepropError(f"--seed must be an integer in 0..2^63-1, got {seed!r}")


WATCH_SECONDS = 0.1  # how often the memory watchdog reads the peak resident set


class Trainer:
    """Runs a bundle's step graphs over a data set.

    Memory is measured from the OS: `baseline` is the process's resident set once the engine
    has loaded the graphs (interpreter, numpy, engine, data), and the working set is the peak
    above it since then: the state, the engine's arenas and the batches (see edgeprop.memory).
    Creating a Trainer restarts the OS's peak counter; rss.process_peak() keeps the
    process-wide figure.
    """

    def __init__(self, bundle: Bundle, engine, data: Dataset, config: TrainConfig, stream_folder=None):
        self.bundle, self.engine, self.config = bundle, engine, config.check()
        if config.holdout:
            data = validation_split(data, config.holdout)[0]
        self.stream_folder = stream_folder  # default: the bundle's checkpoints/stream
        # An engine that trains by itself (ort-training) holds each unit's parameters and
        # optimizer state; the trainer steps its units instead of running step graphs. The
        # weights are copied back after every step (rules and eval read them); the optimizer
        # slots in self.state are brought up to date by unit_state() and save().
        trains_itself = engine.trains_itself
        # The fused step graph replaces the units' own (loaded only if a run starts mid-batch).
        self.fused = self._fused_graph() if config.fused else None
        self.graphs = {} if trains_itself or self.fused else \
            load_graphs(bundle, engine, {u.step_graph for u in bundle.units})
        self.baseline = rss.current()
        self.budget = config.budget  # what the watchdog holds the working set to
        if config.budget is None and config.device_budget is not None:
            self.budget = max(config.device_budget - self.baseline, 1)
        rss.reset_peak()
        self.state = self._initial_state()
        self.rule = for_bundle(bundle, data, config.seed, self._run_unit, self.unit_state)
        self.held = self._engine_units() if trains_itself else {}
        if config.order not in self.rule.orders:
            raise EdgepropError(f"--order {config.order}: rule {bundle.rule} trains in "
                                f"{' or '.join(self.rule.orders)} order only")
        self._infer = {}  # inference graphs, loaded when a rule needs one during training
        self.trained = self._trained_units()  # bundle unit indices, in the order they step
        self.plan = Plan(len(self.trained), self.rule.n_batches, config.epochs, config.order)
        self.lr = base_learning_rates(bundle, config)
        self.done = 0
        self.steps = {u.name: 0 for u in bundle.units}
        self.losses = {u.name: float("nan") for u in bundle.units}  # each unit's latest loss
        # Per unit, per epoch: [sum of losses, updates]; one weighted loss per block to watch.
        self.history: dict[str, list[list[float]]] = {u.name: [] for u in bundle.units}
        self.saved = None  # work items done at the last checkpoint this run wrote or resumed from

    def _fused_graph(self):
        """The bundle's fused step graph, once this run is one it can serve."""
        c = self.config
        if self.engine.trains_itself:
            raise EdgepropError(f"engine {self.engine.name} steps each unit itself: --fused-step does not apply")
        if c.units is not None and set(c.units) != {u.name for u in self.bundle.units}:
            raise EdgepropError("--fused-step steps every unit of the bundle: it cannot train only some of them")
        return self.bundle.load_fused(self.engine)

    def _step_graph(self, key: str):
        if key not in self.graphs:  # a --fused-step run that starts mid-batch steps its first units alone
            self.graphs[key] = self.bundle.load_graph(self.engine, key)
        return self.graphs[key]

    def _trained_units(self) -> list[int]:
        names = [u.name for u in self.bundle.units]
        if self.config.units is None:
            return list(range(len(names)))
        unknown = sorted(set(self.config.units) - set(names))
        if unknown or not self.config.units:
            raise EdgepropError(f"units to train must be some of {', '.join(names)}; got {list(self.config.units)}")
        return sorted(names.index(n) for n in set(self.config.units))

    def _initial_state(self):
        with open_arrays(self.bundle.path(INIT_STATE)) as (arrays, _):
            return self._state_from(arrays, INIT_STATE)

    def _state_from(self, arrays, where: str):
        """Every unit's state from "UNIT/KEY" arrays: in RAM, or in stream files with --stream."""
        if self.config.stream:
            return StreamedState(self.bundle, arrays, where, self.stream_folder)
        return split_state(self.bundle, arrays, where)

    def _engine_units(self) -> dict:
        """Each unit's training session in an engine that trains by itself, given its state."""
        if self.rule.updates_itself:
            raise EdgepropError(f"engine {self.engine.name}: rule {self.bundle.rule} updates the weights itself; "
                                "train it with onnxruntime or litert")
        if self.config.stream:
            raise EdgepropError(f"engine {self.engine.name} holds every unit's state itself: --stream does not apply")
        held = {u.name: self.engine.load_unit(self.bundle, u) for u in self.bundle.units}
        for name, unit in held.items():
            unit.set_state(self.state[name], 0)
        return held

    def _run_unit(self, unit, feeds: dict) -> dict:
        """A unit's inference graph on its current weights (chained rules in block-sequential
        order recompute earlier units' outputs with it)."""
        if unit.infer_graph not in self._infer:
            self._infer[unit.infer_graph] = self.bundle.load_graph(self.engine, unit.infer_graph)
        return self._infer[unit.infer_graph].run({**infer_state(self.state[unit.name]), **feeds})

    def working_set(self) -> int:
        """Measured: peak resident bytes above the baseline since the graphs were loaded."""
        return rss.peak() - self.baseline

    def lr_at(self, unit: str, step: int) -> float:
        return learning_rate(self.lr[unit], self.config.lr_schedule, step, self.plan.epochs * self.plan.n_batches)

    # -- checkpoints -------------------------------------------------------------------------
    def _meta(self) -> dict:
        c = self.config
        return {"bundle": self.bundle.id, "done": self.done, "total": self.plan.total, "steps": self.steps,
                "losses": self.losses, "history": self.history, "epochs": c.epochs, "order": c.order, "seed": c.seed,
                "lr": self.lr, "lr_schedule": c.lr_schedule, "n_batches": self.plan.n_batches, "holdout": c.holdout,
                "memory": {"working_set": self.working_set(), "baseline": self.baseline, "stream": c.stream}}

    def unit_state(self, name: str) -> dict[str, np.ndarray]:
        """A unit's current tensors (fetched from an engine that holds them)."""
        if name in self.held:
            tensors, _ = self.held[name].get_state()
            for key, value in self.state[name].items():
                value[...] = tensors[key]
        return self.state[name]

    def set_unit_state(self, name: str, tensors: dict[str, np.ndarray], steps: int) -> None:
        """Start a unit's next update from these tensors, after `steps` updates (validate's
        lock-step starts every step from the torch reference's state)."""
        self.state[name] = {key: np.array(value, np.float32) for key, value in tensors.items()}
        self.steps[name] = steps
        if name in self.held:
            self.held[name].set_state(self.state[name], steps)

    def _kept(self) -> str:
        """What a run that stops on divergence leaves behind."""
        return "no checkpoint was written" if self.saved is None else f"the checkpoint at step {self.saved} is kept"

    def save(self) -> None:
        for name in self.held:  # the optimizer state lives in the engine
            self.unit_state(name)
        for unit, key, value in ((u, k, v) for u, t in self.state.items() for k, v in t.items()):
            if not np.all(np.isfinite(value)):  # a finite loss can hide inf weights (float32 overflow)
                raise EdgepropError(f"training diverged: {unit}'s '{key}' holds NaN or inf after step {self.done}; "
                                    f"{self._kept()}")
        save_arrays(self.bundle.checkpoint_path(), flat_items(self.state), self._meta())
        self.saved = self.done

    def resume(self) -> None:
        """Continue from the bundle's checkpoint, which must come from the same run settings."""
        path = self.bundle.checkpoint_path()
        if not path.is_file():
            raise EdgepropError(f"{path}: no checkpoint to resume from")
        with open_arrays(path) as (arrays, meta):
            mine = self._meta()
            for key in ("bundle", "epochs", "order", "seed", "lr", "lr_schedule", "n_batches", "holdout"):
                if meta.get(key, 0.0 if key == "holdout" else None) != mine[key]:  # older checkpoints: no holdout
                    raise EdgepropError(f"{path}: checkpoint was written with {key}={meta.get(key)!r}, "
                                        f"this run has {key}={mine[key]!r}; resume with the same settings")
            check_meta(meta, self.bundle, path, self.plan.total)
            self.state = self._state_from(arrays, str(path))
        self.done, self.steps, self.losses = int(meta["done"]), meta["steps"], meta["losses"]
        self.history = meta["history"]
        self.saved = self.done
        for name, unit in self.held.items():
            unit.set_state(self.state[name], self.steps[name])

    # -- training ----------------------------------------------------------------------------
    def step(self, i: int) -> float:
        k, epoch, batch = self.plan.item(i)
        unit_index = self.trained[k]
        unit = self.bundle.units[unit_index]
        state = self.state[unit.name]
        n = self.steps[unit.name] + 1
        lr = self.lr_at(unit.name, n)
        if self.rule.updates_itself:  # its update is not one step-graph run
            loss = self.rule.update(unit_index, epoch, batch, state, lr, n, self._step_graph(unit.step_graph))
        else:
            loss = self._graph_step(unit_index, epoch, batch, state, lr, n)
        self._record(unit.name, epoch, n, loss)
        return loss

    def _record(self, name: str, epoch: int, n: int, loss: float) -> None:
        """Unit `name`'s update `n` in `epoch` gave `loss`: stop on divergence, else log it."""
        if not np.isfinite(loss):
            raise EdgepropError(f"training diverged: {name} update {n} gave loss {loss}; {self._kept()}")
        self.steps[name] = n
        self.losses[name] = loss
        log = self.history[name]
        log.extend([0.0, 0] for _ in range(epoch + 1 - len(log)))
        log[epoch][0] += loss
        log[epoch][1] += 1

    def fused_step(self, i: int) -> None:
        """Work items i .. i+U-1, every unit on one batch, in one call of the fused step graph:
        each unit fed exactly what step() feeds it, the batch-wide feeds once."""
        _, epoch, batch = self.plan.item(i)
        fused = self.bundle.fused
        feeds, out, steps = {}, {}, []
        for index in self.trained:
            unit = self.bundle.units[index]
            state, n = self.state[unit.name], self.steps[unit.name] + 1
            steps.append((index, n))
            own = {**state, **self.rule.feeds(index, epoch, batch),
                   "lr": np.array(self.lr_at(unit.name, n), np.float32), "step": np.array(n, np.float32)}
            for key, value in own.items():
                if key in fused.shared:
                    feeds.setdefault(key, value)
                else:
                    feeds[fused.name(unit.name, key)] = value
            out.update({fused.name(unit.name, f"next.{key}"): value for key, value in state.items()})
        # The engine may write every next.U/K straight over U/K (native), as in _graph_step.
        results = self.fused.run(feeds, out=out) if getattr(self.fused, "fills_outputs", False) else \
            self.fused.run(feeds)
        for index, n in steps:
            unit = self.bundle.units[index]
            outputs = {key: results[fused.name(unit.name, key)] for key in self._outputs_of(unit.step_graph)}
            loss = float(outputs["loss"])
            if np.isfinite(loss):
                state = self.state[unit.name]
                for key in state:
                    if outputs[f"next.{key}"] is not state[key]:
                        state[key][...] = outputs[f"next.{key}"]
                self.rule.observe(index, epoch, batch, outputs)
            self._record(unit.name, epoch, n, loss)

    def _outputs_of(self, key: str) -> tuple[str, ...]:
        return tuple(t.name for t in self.bundle.graphs[key].outputs)

    def _graph_step(self, unit_index: int, epoch: int, batch: int, state: dict, lr: float, n: int) -> float:
        unit = self.bundle.units[unit_index]
        if unit.name in self.held:  # the engine keeps the optimizer slots; rules and eval read the weights
            held = self.held[unit.name]
            out = held.step(self.rule.feeds(unit_index, epoch, batch), lr)
            updated = {"param": held.params()}
        else:
            feeds = {**state, **self.rule.feeds(unit_index, epoch, batch),
                     "lr": np.array(lr, np.float32), "step": np.array(n, np.float32)}
            graph = self._step_graph(unit.step_graph)
            if getattr(graph, "fills_outputs", False):
                # The engine writes next.K straight over K (native): no output buffers, no copies.
                # A diverging step then leaves its state in memory; the run stops on it below,
                # and the last checkpoint on disk is the last good one.
                out = graph.run(feeds, out={f"next.{key}": value for key, value in state.items()})
            else:
                out = graph.run(feeds)
            updated = {key: out[f"next.{key}"] for key in state}
        loss = float(out["loss"])
        if np.isfinite(loss):
            # In place: the engine's output buffers go back to it, and no old state lingers.
            for key, value in updated.items():
                if value is not state[key]:
                    state[key][...] = value
            self.rule.observe(unit_index, epoch, batch, out)
        return loss

    def run(self, limit: int | None = None, progress: bool = True, checkpoints: bool = True) -> None:
        end = self.plan.total if limit is None else min(self.plan.total, limit)
        if checkpoints:  # fail now, not after an hour of training, if checkpoints cannot be written
            self.bundle.checkpoint_path().parent.mkdir(parents=True, exist_ok=True)
        bar = Progress(end, "train", start=self.done, enabled=progress)
        every, last_save = self.config.checkpoint_every, time.monotonic()
        last_watch = 0.0
        try:
            units = len(self.trained)
            while self.done < end:
                before = self.done
                if self.fused is not None and self.done % units == 0 and self.done + units <= end:
                    self.fused_step(self.done)
                    self.done += units
                else:
                    self.step(self.done)
                    self.done += 1
                if self.budget and time.monotonic() - last_watch >= WATCH_SECONDS:
                    self._watch(checkpoints)
                    last_watch = time.monotonic()
                due = (every and self.done // every > before // every) or \
                    time.monotonic() - last_save >= self.config.checkpoint_seconds
                if checkpoints and (due or self.done == end):
                    self.save()
                    last_save = time.monotonic()
                k, epoch, _ = self.plan.item(self.done - 1)
                bar.update(self.done, f"epoch {epoch + 1}/{self.plan.epochs} {self.bundle.units[self.trained[k]].name}")
        finally:
            bar.close()


    def _watch(self, checkpoints: bool) -> None:
        """Stop cleanly, with a checkpoint of the last finished step, once the measured working
        set has crossed the budget."""
        used = self.working_set()
        if used <= self.budget:
            return
        kept = "no checkpoint was written"
        if checkpoints:
            self.save()
            kept = f"a checkpoint at step {self.done} was written; continue with --resume"
        raise EdgepropError(f"memory budget exceeded: the working set reached {format_size(used)} "
                            f"(budget {format_size(self.budget)}) at step {self.done}; {kept}")


def infer_state(unit_state: dict) -> dict:
    """What of a unit's state its inference graph takes: the weights, and BatchNorm's running
    statistics where it has them (not the optimizer slots)."""
    return {key: value for key, value in unit_state.items() if key in ("param", STATS)}


def epoch_losses(history: dict[str, list[list[float]]]) -> dict[str, list[float]]:
    """Mean loss of every unit in every epoch it has trained (from a checkpoint's history)."""
    return {unit: [total / count for total, count in log if count] for unit, log in history.items()}


def load_graphs(bundle: Bundle, engine, keys: set[str]) -> dict:
    """Load the named graphs up front, so a graph the engine rejects fails before any work."""
    return {key: bundle.load_graph(engine, key) for key in sorted(keys)}


def check_meta(meta: dict, bundle: Bundle, path, total: int | None = None) -> None:
    """A checkpoint's record of the run: the types and ranges resume, info and eval rely on."""
    units = [u.name for u in bundle.units]

    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise BundleError(f"{path}: checkpoint field '{field}' {what}; the file is not one edgeprop wrote")

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    total = total if total is not None else meta.get("total")
    need(count(total), "total", "must be the run's step count")
    need(count(meta.get("done")) and meta["done"] <= total, "done", f"must be a step count in 0..{total}")
    steps, history, losses = meta.get("steps"), meta.get("history"), meta.get("losses")
    need(isinstance(steps, dict) and all(count(steps.get(u)) for u in units), "steps",
         "must give every unit's update count")
    need(isinstance(losses, dict), "losses", "must be an object")
    need(isinstance(history, dict) and all(isinstance(history.get(u), list) for u in units), "history",
         "must hold every unit's per-epoch losses")


def _own_meta(bundle: Bundle, path, meta: dict) -> dict:
    """`meta`, once it is known to be this bundle's checkpoint record and well formed."""
    if meta.get("bundle") != bundle.id:
        raise EdgepropError(f"{path}: checkpoint belongs to a different bundle")
    check_meta(meta, bundle, path)
    return meta


def checkpoint_meta(bundle: Bundle) -> dict:
    """The checkpoint's record of its run (checked), reading no array: {} when untrained."""
    path = bundle.checkpoint_path()
    if not path.is_file():
        return {}
    with open_arrays(path) as (_, meta):
        return _own_meta(bundle, path, meta)


def load_trained_state(bundle: Bundle) -> tuple[dict, dict]:
    """The checkpoint's state if there is one, else the initial state; plus the checkpoint meta."""
    path = bundle.checkpoint_path()
    if not path.is_file():
        state, _ = bundle.initial_state()
        return state, {}
    with open_arrays(path) as (arrays, meta):  # only the members the bundle's units use are read
        meta = _own_meta(bundle, path, meta)  # before any array: a foreign checkpoint is named as such
        return split_state(bundle, arrays, str(path)), meta


def validation_split(data: Dataset, holdout: float) -> tuple[Dataset, Dataset]:
    """(training, validation): `holdout` of every class kept out, the same split every time."""
    train, val = stratified_split(data.y, holdout)
    if len(val) == 0 or len(train) == 0:
        raise EdgepropError(f"--holdout {holdout}: leaves {len(train)} training and {len(val)} validation samples")
    return (Dataset(data.x[train], data.y[train], f"{data.name}[train]"),
            Dataset(data.x[val], data.y[val], f"{data.name}[validation]"))


def best_unit(bundle: Bundle, engine, train: Dataset, state: dict, holdout: float) -> tuple[int, float, int]:
    """(unit number, its accuracy, samples): the unit whose classifier scores best on the
    validation split held out of `train` at training (ties: the later unit)."""
    if not holdout:
        raise EdgepropError("--predict-with best judges the units on a validation split held out at training; "
                            "this checkpoint trained on all the training data: train with --holdout 0.1")
    val = validation_split(train, holdout)[1]
    scores = evaluate(bundle, engine, val, state).get("per_unit_accuracy")
    if not scores:
        raise EdgepropError(f"--predict-with best: rule {bundle.rule} has one prediction, not one per unit")
    k = max(range(len(scores)), key=lambda i: (scores[i], i))
    return k + 1, scores[k], len(val)


def evaluate(bundle: Bundle, engine, data: Dataset, state: dict, seed: int = 0, runs: int = 1, **options) -> dict:
    """Test accuracy with the rule's own prediction (averaged over `runs` where it is
    stochastic), and each unit's where the rule has one. `options`: the rule's own
    (its class lists them in `eval_options`), e.g. inference_steps."""
    check_seed(seed)
    if not isinstance(runs, int) or runs < 1:
        raise EdgepropError(f"--runs must be at least 1, got {runs!r}")
    rule = for_bundle(bundle, data, seed, state_of=lambda name: state[name])
    unknown = sorted(set(options) - set(getattr(rule, "eval_options", ())))
    if unknown:
        raise EdgepropError(f"rule {bundle.rule} takes no " + ", ".join("--" + k.replace("_", "-") for k in unknown))
    graphs = load_graphs(bundle, engine, {u.infer_graph for u in bundle.units})

    def run_unit(unit, feeds):
        return graphs[unit.infer_graph].run({**infer_state(state[unit.name]), **feeds})

    return {**rule.evaluate(data.x, data.y, run_unit, seed, runs, **options), "n": int(len(data)), "runs": runs}


EVAL_REPORT = "checkpoints/eval.json"  # the last `edgeprop eval` of the checkpoint, for info and plot


def save_eval(bundle: Bundle, report: dict) -> None:
    """Keep the last evaluation of the trained checkpoint beside it (info and plot show its
    per-block curves), tied to that checkpoint by its sha256; never written for an untrained
    bundle."""
    path = bundle.checkpoint_path()
    if path.is_file() and not bundle.path("checkpoints").is_symlink():  # never write outside the bundle
        report = {**report, "checkpoint_sha256": sha256_of(path)}
        try:
            write_atomic(bundle.path(EVAL_REPORT), (json.dumps(report, indent=1) + "\n").encode())
        except OSError:  # a read-only bundle still evaluates; info and plot then show no curve
            pass


def load_eval(bundle: Bundle) -> dict | None:
    """The saved evaluation, if it is of the checkpoint there now (else None: retrained since)."""
    path, ckpt = bundle.path(EVAL_REPORT), bundle.checkpoint_path()
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or not ckpt.is_file() or report.get("checkpoint_sha256") != sha256_of(ckpt):
        return None
    return report
