"""Secure aggregation with Flower's SecAgg+: the server learns the clients' weighted average,
never one client's weights.

Flower runs the protocol through its legacy workflow (SecAggPlusWorkflow, which asks a
legacy strategy to pick the clients, configure_fit, and takes the average to it,
aggregate_fit); here both calls are the Fleet's: it has sampled the clients and made their
config, and it takes back the average for its own strategy's step. Every client masks the
same arrays, so SecAgg+ needs `--assign all`. On the client, Flower's secaggplus_mod runs
the protocol's stages and masks what edgeprop's client returns, in the legacy records.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from . import records

# Each client's mask seed is shared with half the sampled clients; a round still unmasks
# with two thirds of those shares back (Flower's fractions of the sampled clients).
SHARES, THRESHOLD = 0.5, 0.67


class _Round:
    """The two calls SecAggPlusWorkflow makes of a legacy strategy, answered by the Fleet."""

    def __init__(self, nodes: list[int], config: dict):
        self.nodes, self.config, self.results = nodes, config, []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(SimpleNamespace(node_id=n), FitIns(parameters, self.config)) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.results = results  # each FitRes carries the same unmasked average
        return (results[0][1].parameters if results else None), {}


def secure_average(grid: Grid, context: Context, server_round: int, current: dict[str, np.ndarray],
                   nodes: list[int], config: dict, timeout: float) -> tuple[dict | None, dict[int, dict]]:
    """One SecAgg+ round over `nodes`: (the average weighted by samples, or None where too
    few clients finished; {node: its metrics} of those that did)."""
    step = _Round(nodes, config)
    legacy = LegacyContext(context, strategy=step, client_manager=SimpleNamespace(num_available=lambda: len(nodes)))
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = records.to_record(current)
    SecAggPlusWorkflow(SHARES, THRESHOLD, timeout=timeout)(grid, legacy)
    if not step.results:
        return None, {}
    average = parameters_to_ndarrays(step.results[0][1].parameters)
    return ({k: np.asarray(v, np.float32) for k, v in zip(current, average, strict=True)},
            {proxy.node_id: {**fit.metrics, "num-examples": fit.num_examples} for proxy, fit in step.results})


def client_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's secaggplus_mod, for the messages of a SecAgg+ round only."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secure(msg: Message) -> bool:
    """A SecAgg+ round's train message: the legacy records (FitIns)."""
    return "fitins.parameters" in msg.content.array_records


def unpack(msg: Message, keys: list[str]) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, config) of a SecAgg+ round's train message; `keys`: every shared array's name."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    return dict(zip(keys, parameters_to_ndarrays(fitins.parameters), strict=True)), dict(fitins.config)


def pack(arrays: dict[str, np.ndarray], keys: list[str], metrics: dict):
    """The reply secaggplus_mod masks: every shared array, in the server's order."""
    fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([arrays[k] for k in keys]), int(metrics["num-examples"]),
                 {k: v for k, v in metrics.items() if k != "num-examples"})
    return compat.fitres_to_recorddict(fit, keep_input=True)
