"""Why federated training trails central training, and which server step closes the gap.

    python bench/fleet_gap.py BUNDLE [--data digits] [--clients 100] [--per-round 10]
                              [--rounds 40] [--local-epochs 2] [--partition iid] [--seed 0]
                              [--server-lr 1] [--momentum 0]
                              [--slots reset|keep|average|keep-v|average-v]
                              [--assign all|blocks:K] [--equal-compute] [--lr-schedule cosine]
                              [--local-steps S] [--server-adam ETA] [--tau 1e-3] [--beta2 0.99]
                              [--tail-average F]
                              [--client-lr-scale S]
                              [--out bench/results/fleet_gap.json]

One federated run in one process, without Flower's simulation engine (Ray): each round
samples --per-round clients, trains each with the fleet's own client code
(edgeprop.fleet.client.train), averages with the server's (edgeprop.fleet.server.merge) and
then takes the server step w -= server_lr * m, m = momentum * m + (w - average) (FedAvgM's;
momentum 0 and server_lr 1: plain FedAvg). `--slots average` also averages the clients'
AdamW slots (m, v, step count) on the server and sends them back each round: three times the
upload, a variant edgeprop does not ship, measured to see what the reset slots cost;
`keep-v` / `average-v` keep (or average) only Adam's second moment and the step count, the
first moment starting from zero each round: scaled steps instead of a fresh Adam's first
steps of about lr * sign(gradient). `--lr-schedule cosine` has the server scale the clients'
learning rate by a cosine over the rounds (config "lr-scale", read by the fleet's client).
`--server-adam ETA` takes FedAdam's server step instead of FedAvgM's (Flower's equations,
β1 0.9, `--beta2`, `--tau`; each unit's step times its learning rate over the first unit's,
as the fleet's server does); `--local-steps S` makes a client's round S batches per unit
instead of whole epochs (with SGD clients and FedAdam: docs/fleet.md); `--tail-average F`
also evaluates the mean of the global weights over the last F of the rounds.
`--assign blocks:K` deals each sampled client K units as the server does (edgeprop.fleet.assign);
a unit nobody trained this round keeps its weights and its momentum. `--equal-compute` gives a
client with K of T units T/K times the local epochs (rounded), the compute of a client training
all of them. Prints the test accuracy every 10 rounds and appends the final one to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.modules.update(torch=None, onnx=None)  # the fleet's device side: never torch

from edgeprop import bundle as bundles  # noqa: E402
from edgeprop import datasets  # noqa: E402
from edgeprop.datasets import Dataset  # noqa: E402
from edgeprop.fleet import records  # noqa: E402
from edgeprop.fleet.assign import assign, check_coverage  # noqa: E402
from edgeprop.fleet.assign import parse as parse_policy  # noqa: E402
from edgeprop.fleet.client import Setup, train  # noqa: E402
from edgeprop.fleet.partition import partition  # noqa: E402
from edgeprop.fleet.server import merge, unit_pace  # noqa: E402
from edgeprop.runtimes import get_engine  # noqa: E402
from edgeprop.trainer import evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--data", default="digits")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--partition", default="iid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--slots", default="reset", choices=["reset", "keep", "average", "keep-v", "average-v"])
    p.add_argument("--assign", default="all")
    p.add_argument("--equal-compute", action="store_true")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--server-adam", type=float, default=0.0, help="FedAdam's server learning rate (0: FedAvgM)")
    p.add_argument("--tau", type=float, default=1e-3, help="FedAdam's tau (Flower's default)")
    p.add_argument("--local-steps", type=int, default=0, help="a client's round: this many batches, not epochs")
    p.add_argument("--beta2", type=float, default=0.99, help="FedAdam's beta 2 (Flower's default)")
    p.add_argument("--tail-average", type=float, default=0.0,
                   help="also evaluate the mean of the global weights over this share of the last rounds")
    p.add_argument("--client-lr-scale", type=float, default=1.0,
                   help="the clients' learning rate times this, every round (with --lr-schedule: times both)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "fleet_gap.json"))
    a = p.parse_args()
    b = bundles.load(a.bundle)
    engine = get_engine("onnxruntime", threads=1)
    data, test = datasets.load(a.data, "train"), datasets.load(a.data, "test")
    setups = [Setup(b, Dataset(data.x[i], data.y[i], f"client{c}"), c).check()
              for c, i in enumerate(partition(data.y, a.clients, a.partition, a.seed))]
    state, _ = b.initial_state()
    names = [u.name for u in b.units]
    pace = unit_pace(b)  # FedAdam's step per unit, as the fleet's server takes it
    policy = parse_policy(a.assign)
    check_coverage(policy, a.per_round, len(names))
    if policy.kind == "by-memory" or (policy.kind == "blocks" and a.slots.startswith("average")):
        p.error("--assign: all or blocks:K; blocks:K with --slots reset or keep")
    kept = [{} for _ in setups]  # --slots keep: each client's own
    shared = {n: ({k: np.zeros_like(v) for k, v in state[n].items() if k.startswith("opt.")}, 0) for n in names}
    momentum, rng, start = None, np.random.default_rng(a.seed), time.perf_counter()
    tail, tail_n, adam = None, 0, None
    for r in range(1, a.rounds + 1):
        current = {k: v.copy() for k, v in records.shared_arrays(b, state).items()}
        results, slot_results, steps = [], [], {}
        sampled = [int(c) for c in rng.choice(a.clients, a.per_round, replace=False)]
        dealt = assign(policy, sampled, len(names), r)
        scale = 0.5 * (1 + np.cos(np.pi * (r - 1) / a.rounds)) if a.lr_schedule == "cosine" else 1.0
        scale *= a.client_lr_scale
        for c in sampled:
            mine = [names[i] for i in dealt[c]]
            epochs = a.local_epochs * (max(1, round(len(names) / len(mine))) if a.equal_compute else 1)
            config = {"bundle-id": b.id, "units": ",".join(mine), "local-epochs": epochs, "seed": a.seed,
                      "local-steps": a.local_steps, "server-round": r, "lr-scale": scale,
                      "slots": "reset" if a.slots == "reset" else "keep"}
            memory = kept[c] if not a.slots.startswith("average") else \
                {n: ({k: v.copy() for k, v in s.items()}, st) for n, (s, st) in shared.items()}
            if a.slots.endswith("-v"):  # the second moment only: the first starts from zero
                for slots, _ in memory.values():
                    slots.pop("opt.m", None)
            arrays, metrics = train(setups[c], engine, current, config, memory)
            results.append((metrics["num-examples"], arrays))
            slot_results.append((metrics["num-examples"],
                                 {f"{n}/{k}": v for n, (s, _) in memory.items() for k, v in s.items()}))
            steps = {n: st for n, (_, st) in memory.items()}
        merged, samples = merge(current, results)
        # The pseudo-gradient, as the server sees it: only the units trained this round step,
        # and only their momentum (or moments) move; running statistics are never stepped.
        delta = {k: current[k] - merged[k] for k in merged
                 if not k.endswith("/stats") and records.unit_of(k) in samples}
        if a.server_adam:  # FedAdam's step (Reddi et al.; Flower's equations): Adam on the pseudo-gradient
            adam = adam or {}
            for k, d in delta.items():
                m, v = adam.get(k, (np.zeros_like(d), np.zeros_like(d)))
                adam[k] = (0.9 * m - 0.1 * d, a.beta2 * v + (1 - a.beta2) * d * d)
            eta = a.server_adam * np.sqrt(1 - a.beta2 ** (r + 1)) / (1 - 0.9 ** (r + 1))
            merged = {**merged, **{k: current[k] + eta * pace[records.unit_of(k)] * adam[k][0]
                                   / (np.sqrt(adam[k][1]) + a.tau) for k in delta}}
        elif a.server_lr != 1.0 or a.momentum:  # FedAvgM's step on the pseudo-gradient
            momentum = momentum or {}
            momentum.update({k: a.momentum * momentum[k] + d if k in momentum else d for k, d in delta.items()})
            merged = {**merged, **{k: current[k] - a.server_lr * momentum[k] for k in delta}}
        for key, value in merged.items():
            state[records.unit_of(key)][key.rsplit("/", 1)[1]][...] = value
        if a.slots.startswith("average"):
            slots, _ = merge({k: np.zeros(1) for k in slot_results[0][1]}, slot_results)
            shared = {n: ({k.rsplit("/", 1)[1]: v for k, v in slots.items() if records.unit_of(k) == n}, steps[n])
                      for n in names}
        if a.tail_average and r > a.rounds * (1 - a.tail_average):  # a running mean of the global weights
            tail_n += 1
            tail = {n: {k: v.copy() if tail is None else tail[n][k] + (v - tail[n][k]) / tail_n
                        for k, v in s.items()} for n, s in state.items()}
        if r % 10 == 0 or r == a.rounds:
            accuracy = float(evaluate(b, engine, test, state)["accuracy"])
            print(f"round {r}: {accuracy:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    row = {k: v for k, v in vars(a).items() if k != "out"}
    row.update(rule=b.rule, accuracy=accuracy, seconds=round(time.perf_counter() - start, 1))
    if tail:
        row["tail_average_accuracy"] = float(evaluate(b, engine, test, tail)["accuracy"])
        print(f"mean of the last {tail_n} rounds' weights: {row['tail_average_accuracy']:.4f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.read_text()) if out.is_file() else []
    out.write_text(json.dumps([*rows, row], indent=1) + "\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
