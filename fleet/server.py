"""The fleet's ServerApp: samples clients, assigns units, averages each unit over the clients
that trained it, evaluates the global state on a test split and checkpoints it every round.

Flower's strategies do the sampling and the aggregation: FedAvgM (the default: the
average, weighted by samples, taken as a step with server momentum), FedAvg (the plain
average), FedProx (its mu goes to the clients, which pull each unit back towards the global
weights after every step) and FedAdam (a server-side Adam step on the averaged update). A unit
trained by no client this round keeps its weights. The global state is
BUNDLE/checkpoints/last.npz, written atomically after every round, so `edgeprop eval` reads
the fleet's model and a killed server resumes from its last finished round.
"""
from __future__ import annotations

import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from edgeprop import bundle as bundles
from edgeprop import datasets
from edgeprop.bundle import STATS, Bundle, flat_items
from edgeprop.errors import BundleError, EdgepropError
from edgeprop.storage import open_arrays, save_arrays
from edgeprop.trainer import evaluate

from . import records
from .assign import Policy, assign
from .assign import parse as parse_policy
from .client import SLOT_POLICIES

STRATEGIES = ("fedavgm", "fedavg", "fedprox", "fedadam")
# must match to resume
RESUMABLE = ("strategy", "assign", "local_epochs", "local_steps", "order", "slots", "seed", "mu", "server_lr",
             "server_momentum", "server_beta2", "tau", "secagg")


@dataclass
class Settings:
    rounds: int = 3
    fraction: float = 1.0       # share of the connected clients sampled each round
    min_clients: int = 1        # clients sampled each round at least
    wait_for: int = 0           # a round starts once this many clients are connected (0: min_clients)
    local_epochs: int = 1
    local_steps: int = 0        # > 0: a client's round is this many batches per unit, not whole epochs
    assign: str = "all"
    strategy: str = "fedavgm"   # closest to central with AdamW clients and whole epochs (docs/fleet.md)
    mu: float = 0.01            # FedProx's proximal weight
    server_lr: float = 0.01     # FedAdam's server learning rate (eta)
    server_beta2: float = 0.999  # FedAdam's second-moment decay (Adam's; Flower's default is 0.99)
    tau: float = 1e-9           # FedAdam's epsilon: far below the updates of SGD clients (Flower's: 1e-3)
    server_momentum: float = 0.9  # FedAvgM's server momentum
    slots: str = "reset"        # optimizer slots between rounds on each client (reset: measured better,
                                # docs/results.md; keep: a client's slots from its last round)
    order: str = "interleaved"
    seed: int = 0
    round_timeout: float = 600.0  # seconds a round waits for replies; late clients are left out
    test_data: str = "digits"
    restart: bool = False       # start over although the bundle holds a fleet checkpoint
    secagg: bool = False        # Flower's SecAgg+: the server sees only the clients' average

    def check(self) -> Settings:
        if self.rounds < 1:
            raise EdgepropError("--rounds must be at least 1")
        if not 0 < self.fraction <= 1:
            raise EdgepropError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.local_epochs < 1 or self.local_steps < 0:
            raise EdgepropError("--local-epochs must be at least 1 and --local-steps at least 0")
        if self.min_clients < 1:
            raise EdgepropError("--min-clients must be at least 1")
        if self.strategy not in STRATEGIES:
            raise EdgepropError(f"--strategy must be one of {', '.join(STRATEGIES)}")
        if self.slots not in SLOT_POLICIES:
            raise EdgepropError(f"--slots must be one of {', '.join(SLOT_POLICIES)}")
        if not self.mu >= 0 or not self.server_lr > 0 or not self.round_timeout > 0 or not self.tau > 0:
            raise EdgepropError("--mu must be >= 0, --server-lr, --tau and --round-timeout positive")
        if not 0 <= self.server_beta2 < 1:
            raise EdgepropError(f"--server-beta2 must be in [0, 1), got {self.server_beta2}")
        if not 0 <= self.server_momentum < 1:
            raise EdgepropError(f"--server-momentum must be in [0, 1), got {self.server_momentum}")
        if self.secagg and self.assign != "all":
            raise EdgepropError(f"--secagg needs --assign all (every client masks the same arrays), "
                                f"not {self.assign}")
        parse_policy(self.assign)
        return self

    @property
    def policy(self) -> Policy:
        return parse_policy(self.assign)


def strategy(s: Settings):
    common = {"fraction_train": s.fraction, "fraction_evaluate": 0.0, "min_train_nodes": s.min_clients,
              "min_available_nodes": max(s.min_clients, s.wait_for)}
    if s.strategy == "fedprox":
        return FedProx(**common, proximal_mu=s.mu)
    if s.strategy == "fedadam":
        return FedAdam(**common, eta=s.server_lr, beta_2=s.server_beta2, tau=s.tau)
    if s.strategy == "fedavgm":
        return FedAvgM(**common, server_momentum=s.server_momentum)
    return FedAvg(**common)


def unit_pace(bundle: Bundle) -> dict[str, float]:
    """FedAdam's step per unit as a multiple of --server-lr: Adam divides the clients' learning
    rates out of their updates, so each unit steps at its rate over the first unit's (a head's
    is ten times a block's)."""
    return {u.name: u.lr / bundle.units[0].lr for u in bundle.units}


def merge(global_arrays: dict, results: list[tuple[float, dict]]) -> tuple[dict, dict]:
    """Each unit's arrays averaged over the results (num-examples, arrays) that carry it,
    weighted by num-examples; a unit no result carries keeps its global arrays. Also the
    samples behind each unit."""
    sums, weights = {}, {}
    for n, arrays in results:
        for key, value in arrays.items():
            sums[key] = sums.get(key, 0.0) + n * value.astype(np.float64)
            weights[key] = weights.get(key, 0.0) + n
    merged = {k: (sums[k] / weights[k]).astype(np.float32) if k in sums else v for k, v in global_arrays.items()}
    return merged, {records.unit_of(k): int(w) for k, w in weights.items()}


class Fleet:
    """One federated run of a bundle: its global state, its history, its checkpoint."""

    def __init__(self, bundle: Bundle, settings: Settings, log: Callable[[str], None] = print):
        self.bundle, self.settings, self.log = bundle, settings.check(), log
        self.test = datasets.load(settings.test_data, "test")
        datasets.check(self.test, bundle.input_shape, bundle.num_classes)
        datasets.check_scale(self.test, *bundle.input_norm)
        self.state, _ = bundle.initial_state()
        self.round, self.history = 0, []
        self.capacity = {}  # units each node's device holds, from its replies (by-memory)
        self.strategy = strategy(settings)
        self.pace = unit_pace(bundle) if settings.strategy == "fedadam" else {}
        self._resume()
        opt = bundle.optimizer if isinstance(bundle.optimizer, dict) else {}
        if self.pace and (opt.get("name") != "sgd" or opt.get("weight_decay")):
            log("note: FedAdam measured within 1 pp of central training with SGD clients without weight decay "
                "(export --optimizer sgd --weight-decay 0) and rounds of a batch or two (--local-steps); "
                "docs/fleet.md")

    # -- checkpoint ---------------------------------------------------------------------------
    def _settings_record(self) -> dict:
        return {k: v for k, v in asdict(self.settings).items() if k in RESUMABLE}

    def _resume(self) -> None:
        path = self.bundle.checkpoint_path()
        if not path.is_file() or self.settings.restart:
            return
        with open_arrays(path) as (arrays, meta):
            fleet = meta.get("fleet")
            if meta.get("bundle") != self.bundle.id:
                raise EdgepropError(f"{path}: checkpoint belongs to a different bundle")
            if not isinstance(fleet, dict):
                raise EdgepropError(f"{path} holds a checkpoint of `edgeprop train`; a fleet run would replace it: "
                                    f"run the fleet on a copy of the bundle, or pass --restart")
            if fleet.get("settings") != self._settings_record():
                raise EdgepropError(f"{path}: fleet checkpoint was written with {fleet.get('settings')}, this run has "
                                    f"{self._settings_record()}; resume with the same settings or pass --restart")
            done, history = fleet.get("round"), fleet.get("history")
            if not (isinstance(done, int) and 0 <= done and isinstance(history, list) and len(history) == done):
                raise BundleError(f"{path}: fleet checkpoint's 'round' and 'history' do not agree; the file is not "
                                  f"one edgeprop wrote")
            self.state = bundles.split_state(self.bundle, arrays, str(path))
            server = {k[len("server/"):]: arrays[k] for k in arrays if k.startswith("server/")}
        self.round, self.history = done, history
        self._set_server_state(server)
        self.log(f"resumed from round {self.round} ({path})")

    def save(self) -> None:
        for unit, tensors in self.state.items():  # a diverged global state never replaces a good one
            if not all(np.all(np.isfinite(v)) for v in tensors.values()):
                raise EdgepropError(f"the global state diverged: {unit} holds NaN or inf after round {self.round}; "
                                    f"the checkpoint of the round before is kept")
        extra = {f"server/{k}": v for k, v in self._server_state().items()}
        units = [u.name for u in self.bundle.units]
        meta = {"bundle": self.bundle.id, "done": 0, "total": 0, "steps": {u: 0 for u in units}, "losses": {},
                "history": {u: [] for u in units},
                "fleet": {"round": self.round, "rounds": self.settings.rounds, "settings": self._settings_record(),
                          "history": self.history}}
        save_arrays(self.bundle.checkpoint_path(), [*flat_items(self.state), *extra.items()], meta)

    def _server_state(self) -> dict[str, np.ndarray]:
        """The strategy's own state, kept for a resume: FedAdam's moments "m_t/KEY", "v_t/KEY",
        FedAvgM's momentum "momentum/KEY" (Flower holds it as a list in the arrays' order)."""
        out = {f"{slot}/{k}": v for slot in ("m_t", "v_t")
               for k, v in (getattr(self.strategy, slot, None) or {}).items()}
        momentum = getattr(self.strategy, "momentum_vector", None)
        if momentum is not None:
            out.update({f"momentum/{k}": v for k, v in zip(self.global_arrays(), momentum, strict=True)})
        return out

    def _set_server_state(self, server: dict[str, np.ndarray]) -> None:
        for slot in ("m_t", "v_t"):
            moments = {k.split("/", 1)[1]: v for k, v in server.items() if k.startswith(slot + "/")}
            if moments and hasattr(self.strategy, slot):
                setattr(self.strategy, slot, moments)
        if hasattr(self.strategy, "momentum_vector") and any(k.startswith("momentum/") for k in server):
            keys = [f"momentum/{k}" for k in self.global_arrays()]
            if set(keys) != {k for k in server if k.startswith("momentum/")}:
                raise BundleError(f"{self.bundle.checkpoint_path()}: the server's momentum does not match the "
                                  f"bundle's units; the file is not one edgeprop wrote")
            self.strategy.momentum_vector = [server[k] for k in keys]

    # -- rounds ---------------------------------------------------------------------------------
    def global_arrays(self) -> dict[str, np.ndarray]:
        return records.shared_arrays(self.bundle, self.state)

    def evaluate(self) -> float:
        from edgeprop.runtimes import get_engine
        return float(evaluate(self.bundle, get_engine("onnxruntime", threads=1), self.test, self.state)["accuracy"])

    def _wait_for_clients(self, grid: Grid) -> None:
        """Flower's strategies size the sample from the clients connected at that moment:
        wait (up to the round timeout) until `wait_for` have connected."""
        need, deadline = max(self.settings.wait_for, self.settings.min_clients), time.monotonic() + \
            self.settings.round_timeout
        while len(list(grid.get_node_ids())) < need and time.monotonic() < deadline:
            time.sleep(0.2)

    def _messages(self, grid: Grid, server_round: int, current: dict) -> tuple[list[Message], dict]:
        s = self.settings
        self._wait_for_clients(grid)
        random.seed(s.seed * 1_000_003 + server_round)  # Flower samples nodes with `random`
        config = ConfigRecord({"bundle-id": self.bundle.id, "local-epochs": s.local_epochs,
                               "local-steps": s.local_steps, "order": s.order,
                               "slots": s.slots, "seed": s.seed})
        sampled = list(self.strategy.configure_train(server_round, records.to_record(current), config, grid))
        nodes = [m.metadata.dst_node_id for m in sampled]
        units = assign(s.policy, nodes, len(self.bundle.units), server_round, self.capacity)
        names = [u.name for u in self.bundle.units]
        messages, sent = [], {}
        for m in sampled:
            node = m.metadata.dst_node_id
            mine = [names[i] for i in units[node]]
            cfg = ConfigRecord({**dict(m.content["config"]), "units": ",".join(mine)})
            arrays = records.to_record(records.shared_arrays(self.bundle, self.state, mine))
            sent[node] = arrays.count_bytes()
            messages.append(Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=node,
                                    message_type=MessageType.TRAIN))
        return messages, sent

    def run_round(self, grid: Grid, context: Context | None = None) -> dict:
        server_round, started = self.round + 1, time.monotonic()
        current = self.global_arrays()
        messages, sent = self._messages(grid, server_round, current)
        exchange = self._secure_exchange if self.settings.secagg else self._exchange
        results, clients, failed = exchange(grid, context, server_round, current, messages, sent)
        if results:
            self.aggregate(server_round, current, results)
        else:
            self.log(f"round {server_round}: no client answered; the global state is unchanged")
        accuracy = self.evaluate()
        self.round = server_round
        entry = {"round": server_round, "accuracy": accuracy, "clients": clients, "failed": failed,
                 "seconds": time.monotonic() - started}
        self.history.append(entry)
        self.save()
        self.log(f"round {server_round}/{self.settings.rounds}: accuracy {accuracy:.4f}, {len(clients)} clients, "
                 f"{len(failed)} left out, {entry['seconds']:.1f} s")
        return entry

    def _exchange(self, grid: Grid, context, server_round: int, current: dict, messages: list[Message],
                  sent: dict) -> tuple[list[tuple[float, dict]], list[dict], list[dict]]:
        """Send the train messages, check the replies: ([(num-examples, arrays)], clients, failed)."""
        replies = list(grid.send_and_receive(messages, timeout=self.settings.round_timeout))
        # An error reply may come from the SuperLink (a node that stopped sending heartbeats):
        # the message it answers names the node.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        results, clients, failed, answered = [], [], [], set()
        for r in replies:
            node = sent_to.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
            answered.add(node)
            if r.has_error():
                failed.append({"node": node, "error": r.error.reason})
                self.log(f"round {server_round}: node {node} left out: {r.error.reason}")
                continue
            try:
                arrays = records.from_record(r.content["arrays"])
                records.check_arrays(self.bundle, arrays, f"node {node}'s reply")
                metrics = r.content["metrics"]
                if not float(metrics["num-examples"]) > 0:
                    raise EdgepropError(f"node {node}'s reply: num-examples must be positive")
            except (EdgepropError, KeyError, TypeError, ValueError) as e:
                failed.append({"node": node, "error": str(e)})
                self.log(f"round {server_round}: node {node} left out: {e}")
                continue
            results.append((float(metrics["num-examples"]), arrays))
            clients.append(self._client_entry(node, metrics, sent.get(node, 0), r.content["arrays"].count_bytes(),
                                              sorted({records.unit_of(k) for k in arrays})))
        for node in sent:
            if node not in answered:
                failed.append({"node": node, "error": f"no reply within {self.settings.round_timeout:g} s"})
                self.log(f"round {server_round}: node {node} left out: no reply in time")
        return results, clients, failed

    def _secure_exchange(self, grid: Grid, context, server_round: int, current: dict, messages: list[Message],
                         sent: dict) -> tuple[list[tuple[float, dict]], list[dict], list[dict]]:
        """The same round through SecAgg+: one result, the clients' average, which nobody
        could see before it was summed."""
        from .secagg import secure_average
        nodes = [m.metadata.dst_node_id for m in messages]
        config = {**dict(messages[0].content["config"]), "server-round": server_round}
        average, metrics = secure_average(grid, context, server_round, current, nodes, config,
                                          self.settings.round_timeout)
        units = sorted({records.unit_of(k) for k in current})
        clients = [self._client_entry(n, m, sent[n], sent[n], units) for n, m in metrics.items()]
        failed = [{"node": n, "error": "did not finish the SecAgg+ round"} for n in nodes if n not in metrics]
        for f in failed:
            self.log(f"round {server_round}: node {f['node']} left out: {f['error']}")
        if average is not None:
            records.check_arrays(self.bundle, average, "the SecAgg+ average")
        return ([] if average is None else [(1.0, average)]), clients, failed

    def _client_entry(self, node: int, metrics, sent: int, received: int, units: list[str]) -> dict:
        self.capacity[node] = int(metrics["capacity"])
        return {"node": node, "client": int(metrics["client"]), "sent": sent, "received": received,
                "samples": int(metrics["num-examples"]), "units": units, "loss": float(metrics["loss"]),
                "seconds": float(metrics["seconds"])}

    def aggregate(self, server_round: int, current: dict, results: list[tuple[float, dict]]) -> None:
        """Average each unit over the results (num-examples, arrays) that carry it, then let the
        strategy take its server step (FedAvgM: with momentum; FedAdam: Adam on the averaged
        update; FedAvg, FedProx: the average itself)."""
        merged, samples = merge(current, results)
        # A unit nobody trained this round has no update: it keeps its weights and the server
        # keeps its momentum (FedAdam: its moments) for it, rather than stepping on a zero delta.
        idle = {records.unit_of(k) for k in current} - set(samples)
        before = {k: v.copy() for k, v in self._server_state().items()
                  if records.unit_of(k.split("/", 1)[1]) in idle} if idle else {}
        # The strategy steps from one message holding the average; it never travels.
        meta = Metadata(0, "", 0, 0, "", "", time.time(), 0, MessageType.TRAIN)
        one = Message(RecordDict({"arrays": records.to_record(merged),
                                  "metrics": MetricRecord({"num-examples": 1})}), metadata=meta)
        if isinstance(self.strategy, FedAvgM):  # its step starts from this round's global state
            self.strategy.current_arrays = records.to_record(current)
        elif isinstance(self.strategy, FedAdam):  # (as configure_train would set it)
            self.strategy.current_arrays = dict(current)
        quiet = logging.getLogger("flwr")  # it would log "Received 1 results" for this one message
        level, _ = quiet.level, quiet.setLevel(logging.WARNING)
        try:
            arrays, _ = self.strategy.aggregate_train(server_round, [one])
        finally:
            quiet.setLevel(level)
        result = records.from_record(arrays)
        for key, value in result.items():
            unit = records.unit_of(key)
            if unit in idle:
                value = current[key]
            elif key.endswith("/" + STATS):  # running statistics are averages: never a server step
                value = merged[key]
            elif self.pace.get(unit, 1.0) != 1.0:
                value = current[key] + np.float32(self.pace[unit]) * (value - current[key])
            self.state[unit][key.rsplit("/", 1)[1]][...] = value
        if idle:
            server = self._server_state()
            for key, value in server.items():  # "momentum/UNIT/param": before this round, or none yet
                if records.unit_of(key.split("/", 1)[1]) in idle:
                    server[key] = before.get(key, np.zeros_like(value))
            self._set_server_state(server)

    def run(self, grid: Grid, context: Context | None = None) -> list[dict]:
        while self.round < self.settings.rounds:
            self.run_round(grid, context)
        return self.history


def settings_from(run_config: dict) -> tuple[str, Settings]:
    """(bundle path, Settings) from a Flower run config (the App's pyproject [tool.flwr.app.config])."""
    known = {k.replace("_", "-"): k for k in Settings.__dataclass_fields__}
    values = {known[k]: v for k, v in run_config.items() if k in known}
    if "bundle" not in run_config:
        raise EdgepropError("the run config has no 'bundle' (the bundle's folder on the server)")
    return str(run_config["bundle"]), Settings(**values)


def server_app(fleet: Fleet | None = None) -> ServerApp:
    """A ServerApp that runs `fleet` (simulation: made and checked before Flower starts), or
    one made from the run config (the App's pyproject [tool.flwr.app.config])."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        if fleet is not None:
            fleet.run(grid, context)
            return
        from edgeprop import lock
        try:
            path, settings = settings_from(dict(context.run_config))
            bundle = bundles.load(path)
            bundle.check_writable()
            with lock.held(bundle.root, "run a fleet on it"):
                Fleet(bundle, settings).run(grid, context)
        except (EdgepropError, OSError) as e:
            print(f"edgeprop fleet server: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return app
