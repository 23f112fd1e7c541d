"""`edgeprop fleet simulate`: many virtual clients on one machine, on Flower's simulation
engine (Ray), each client a partition of one data set. The server and the clients are the
same code a real fleet runs (edgeprop.fleet.server, edgeprop.fleet.client)."""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import numpy as np

from edgeprop.bundle import Bundle
from edgeprop.datasets import Dataset
from edgeprop.errors import EdgepropError

from .assign import check_coverage
from .client import Setup, client_app
from .partition import partition
from .server import Fleet, Settings, server_app


def simulate(bundle: Bundle, train: Dataset, clients: int, settings: Settings, how: str = "iid",
             devices: list | None = None, engine: str = "onnxruntime",
             log: Callable[[str], None] = print) -> dict:
    """Run the fleet over `clients` partitions of `train`; returns the report (see report())."""
    if clients < 1:
        raise EdgepropError(f"--clients must be at least 1, got {clients}")
    per_round = max(int(clients * settings.fraction), settings.min_clients)
    if settings.min_clients > clients:
        raise EdgepropError(f"--min-clients {settings.min_clients} is more than --clients {clients}")
    check_coverage(settings.policy, per_round, len(bundle.units))
    parts = partition(train.y, clients, how, settings.seed)
    setups = [Setup(bundle, Dataset(train.x[p], train.y[p], f"{train.name}#{i}"), i,
                    devices[i % len(devices)] if devices else None, engine) for i, p in enumerate(parts)]
    for s in setups:  # bad data or a device too small for one unit: refuse before Flower starts
        s.check()
    settings.wait_for = clients  # every virtual client is there from the start: sample from all
    fleet = Fleet(bundle, settings, log)
    start = fleet.round
    if start >= settings.rounds:
        log(f"the checkpoint has all {settings.rounds} rounds already")
        return report(fleet, parts)
    from flwr.simulation import run_simulation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("flwr").setLevel(logging.WARNING)  # our own line per round says enough
        run_simulation(server_app(fleet), client_app(lambda context: setups[int(context.node_config["partition-id"])]),
                       clients, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                                "init_args": {"logging_level": "error", "log_to_driver": False}})
    if fleet.round < settings.rounds:
        raise EdgepropError(f"the simulation stopped after round {fleet.round} of {settings.rounds}; "
                            f"the checkpoint holds round {fleet.round}: run again to resume")
    return report(fleet, parts)


def report(fleet: Fleet, parts: list[np.ndarray]) -> dict:
    """Final accuracy, the history, and bytes sent to / received from each client per round."""
    h = fleet.history
    return {"bundle": str(fleet.bundle.root), "rule": fleet.bundle.rule, "units": len(fleet.bundle.units),
            "settings": vars(fleet.settings), "clients": len(parts), "samples": [len(p) for p in parts],
            "final_accuracy": h[-1]["accuracy"] if h else None,
            "accuracy": [e["accuracy"] for e in h],
            "bytes": [{str(c["client"]): {"sent": c["sent"], "received": c["received"]} for c in e["clients"]}
                      for e in h],
            "history": h}
