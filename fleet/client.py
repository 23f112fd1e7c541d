"""The fleet's ClientApp: trains the units the server assigns on this device's data.

torch-free: numpy, the engine and flwr. Each train message carries the units' weights and
statistics and a config (bundle id, units, local epochs, seed, optimizer-slot policy,
FedProx's mu, a learning-rate scale for this round); the reply carries the trained units'
weights and statistics and metrics: num-examples (FedAvg's weight), the units' last-epoch
loss, seconds, and how many units this device's memory holds (by-memory assignment). Bad
input (another bundle, data the model cannot take, a device too small for one unit) is a
one-line error reply: the server logs it and the round goes on without this client.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edgeprop import datasets
from edgeprop.bundle import Bundle
from edgeprop.datasets import Dataset
from edgeprop.errors import EdgepropError
from edgeprop.rules.base import Plan
from edgeprop.trainer import TrainConfig, Trainer

from . import records, secagg
from .assign import units_that_fit

SLOT_POLICIES = ("keep", "reset")  # optimizer slots between rounds: kept on the device, or zero
CLIENT_ERROR = 2  # flwr's ErrorCode.CLIENT_APP_RAISED_EXCEPTION
SLOTS, STEPS = "edgeprop.slots", "edgeprop.steps"  # this client's slots in its Flower Context.state


@dataclass
class Setup:
    """What one client trains with: the bundle, its share of data, its device, its engine."""
    bundle: Bundle
    data: Dataset
    client: int = -1        # a label for reports (simulation: the partition id)
    device: object = None   # edgeprop.device_profile.Profile, or None: no memory limit
    engine: str = "onnxruntime"
    capacity: int = 0       # units this device holds in one round (set by check)

    def check(self) -> Setup:
        """The data must fit the model, and the device at least one unit: before any round."""
        datasets.check(self.data, self.bundle.input_shape, self.bundle.num_classes)
        datasets.check_scale(self.data, *self.bundle.input_norm)
        self.capacity = len(self.bundle.units)
        if self.device is not None:
            self.capacity = units_that_fit(self.bundle, self.device, self.engine, self.data.nbytes)
        return self


def round_seed(seed: int, server_round: int, client: int) -> int:
    """Each client draws its own batches and noise each round, reproducibly."""
    return (seed * 1_000_003 + server_round * 10_007 + client + 1) % (1 << 63)


def round_items(plan: Plan, local_steps: int) -> list[int]:
    """The plan's items this round trains: all of them, or with local_steps > 0 only each
    unit's first local_steps batches (a round shorter than an epoch: FedSGD at 1)."""
    items = []
    for i in range(plan.total):
        _, epoch, batch = plan.item(i)
        if local_steps <= 0 or epoch * plan.n_batches + batch < local_steps:
            items.append(i)
    return items


def train(setup: Setup, engine, arrays: dict[str, np.ndarray], config: dict, memory: dict) -> tuple[dict, dict]:
    """Train the assigned units from `arrays` for the config's local epochs (or local steps);
    `memory` keeps this client's optimizer slots between rounds ("keep"). Returns (arrays, metrics)."""
    b = setup.bundle
    if config.get("bundle-id") != b.id:
        raise EdgepropError(f"the server trains bundle {config.get('bundle-id')}, this client holds {b.id} "
                            f"({b.root}); deploy the same bundle to both")
    units = [u for u in str(config.get("units", "")).split(",") if u]
    units = units[:setup.capacity]  # by-memory: as many as this device holds
    records.check_arrays(b, arrays, "the server's arrays")
    missing = [u for u in units if f"{u}/param" not in arrays]
    if missing:
        raise EdgepropError(f"the server assigned {', '.join(missing)} but sent no weights for them")
    seed = round_seed(int(config.get("seed", 0)), int(config.get("server-round", 1)), setup.client)
    cfg = TrainConfig(epochs=int(config.get("local-epochs", 1)), order=str(config.get("order", "interleaved")),
                      seed=seed, units=tuple(units))
    scale = float(config.get("lr-scale", 1.0))  # the server's learning-rate schedule over rounds
    if not 0 <= scale < float("inf"):
        raise EdgepropError(f"the server sent lr-scale {scale}; it must be a finite number >= 0")
    local_steps = config.get("local-steps", 0)
    if not (isinstance(local_steps, int) and local_steps >= 0):
        raise EdgepropError(f"the server sent local-steps {local_steps!r}; it must be a whole number >= 0")
    trainer = Trainer(b, engine, setup.data, cfg)
    trainer.lr = {name: lr * scale for name, lr in trainer.lr.items()}
    keep = config.get("slots") == "keep"
    for name in units:
        state = trainer.state[name]
        for key in records.SHARED:
            if key in state:
                state[key][...] = arrays[f"{name}/{key}"]
        if keep and name in memory:  # this client's own optimizer slots from its last round
            slots, steps = memory[name]
            for key, value in slots.items():
                state[key][...] = value
            trainer.steps[name] = steps
    mu = float(config.get("proximal-mu", 0.0))
    start = time.monotonic()
    for i in round_items(trainer.plan, local_steps):
        trainer.step(i)
        if mu > 0:  # FedProx, decoupled: pull the unit that stepped back towards the global weights
            name = b.units[trainer.trained[trainer.plan.item(i)[0]]].name
            param = trainer.state[name]["param"]
            param -= np.float32(trainer.lr_at(name, trainer.steps[name]) * mu) * (param - arrays[f"{name}/param"])
    trainer.done = trainer.plan.total
    for name in units:
        memory[name] = ({k: v.copy() for k, v in trainer.state[name].items() if k.startswith("opt.")},
                        trainer.steps[name])
        if not all(np.all(np.isfinite(v)) for v in trainer.state[name].values()):
            raise EdgepropError(f"training diverged: {name} holds NaN or inf after this round")
    losses = [trainer.history[n][-1][0] / trainer.history[n][-1][1] for n in units]
    metrics = {"num-examples": len(setup.data), "loss": float(np.mean(losses)), "seconds": time.monotonic() - start,
               "capacity": setup.capacity, "client": setup.client}
    return records.shared_arrays(b, trainer.state, units), metrics


def _memory_from(context: Context) -> dict:
    if SLOTS not in context.state:
        return {}
    slots, steps = records.from_record(context.state[SLOTS]), context.state[STEPS]
    out = {}
    for key, value in slots.items():
        unit, slot = key.rsplit("/", 1)
        out.setdefault(unit, ({}, int(steps[unit])))[0][slot] = value
    return out


def _memory_to(context: Context, memory: dict) -> None:
    context.state[SLOTS] = records.to_record(
        {f"{u}/{k}": v for u, (slots, _) in memory.items() for k, v in slots.items()})
    context.state[STEPS] = ConfigRecord({u: steps for u, (_, steps) in memory.items()})


def client_app(resolve: Callable[[Context], Setup], engine_options: dict | None = None) -> ClientApp:
    """A ClientApp whose clients are described by `resolve(context)` (checked once per
    process and client, then reused every round)."""
    app = ClientApp(mods=[secagg.client_mod])  # SecAgg+ rounds only
    setups: dict = {}

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        try:
            key = (context.node_id, tuple(sorted(context.node_config.items())))
            if key not in setups:
                setups[key] = resolve(context).check()
            setup = setups[key]
            from edgeprop.runtimes import get_engine
            engine = get_engine(setup.engine, **(engine_options or {"threads": 1}))
            memory = _memory_from(context)
            keys = records.shared_keys(setup.bundle)
            if secagg.is_secure(msg):
                arrays, config = secagg.unpack(msg, keys)
            else:
                arrays, config = records.from_record(msg.content["arrays"]), dict(msg.content["config"])
            arrays, metrics = train(setup, engine, arrays, config, memory)
            if config.get("slots") == "keep":  # else nothing need be held between rounds
                _memory_to(context, memory)
            if secagg.is_secure(msg):
                if len(arrays) != len(keys):
                    raise EdgepropError(f"secure aggregation needs every unit, this device holds "
                                        f"{setup.capacity} of {len(setup.bundle.units)}")
                return Message(secagg.pack(arrays, keys, metrics), reply_to=msg)
        except (EdgepropError, OSError) as e:
            print(f"edgeprop fleet client: error: {e}", file=sys.stderr)
            return Message(Error(CLIENT_ERROR, f"{e}"), reply_to=msg)
        return Message(RecordDict({"arrays": records.to_record(arrays), "metrics": MetricRecord(metrics)}),
                       reply_to=msg)

    return app


def setup_from_node(context: Context) -> Setup:
    """A real SuperNode's client, from its --node-config: data=PATH (required; its training
    split), device=PROFILE, bundle=PATH (default: the run config's), client=N (a label for
    reports, and this device's share of the round's seed), engine=NAME. Without client=N (or
    with a negative one) the node id stands in: two devices must never draw the same batches
    and noise, or their averaged updates would not average the noise out."""
    from edgeprop import bundle as bundles
    from edgeprop.devices import load_profile
    node, run = dict(context.node_config), dict(context.run_config)
    if "data" not in node:
        raise EdgepropError("this SuperNode has no data: start it with --node-config \"data='PATH'\"")
    bundle = bundles.load(str(node.get("bundle", run.get("bundle", ""))))
    device = load_profile(str(node["device"])) if node.get("device") else None
    client = int(node.get("client", -1))
    return Setup(bundle, datasets.load(str(node["data"]), "train"), client if client >= 0 else context.node_id,
                 device, str(node.get("engine", "onnxruntime")))
