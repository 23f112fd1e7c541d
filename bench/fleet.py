"""Federated NoProp-DT and `local` on Flower's simulation engine against central training.

    python bench/fleet.py [--data digits,fashion] [--rules noprop-dt,local] [--clients 100]
                          [--fraction 0.1] [--rounds 80] [--local-epochs 1] [--local-steps 0]
                          [--partitions iid,dirichlet:0.5,dirichlet:0.1] [--assign all,blocks]
                          [--slots reset] [--strategies fedavgm] [--server-momentum 0.9]
                          [--server-lr 0.01] [--fleet-export "--optimizer sgd ..."]
                          [--seeds 0] [--blocks-clients same|scaled] [--out bench/results/fleet.json]

For each data set and rule: export once (torch), then
  central    `edgeprop train` on the whole training split for the same total sample-epochs
             as the fleet (rounds x fraction x local epochs; with --local-steps S, rounds x
             clients a round x S x batch / training samples), in a torch-free process
  fleet      `edgeprop fleet simulate` per partition and assignment, torch-free; `blocks`
             deals ceil(units / clients per round) units to each client, the least that
             covers every unit each round; `blocks:K` deals K
(`--slots keep,reset` also compares keeping each client's optimizer slots between rounds
with resetting them, `--strategies fedavgm,fedavg` the server's step with and without
momentum) and records the final test accuracy, the mean of the last rounds' accuracy (one
round's is noisy under server momentum), the gap to central in points, the mean upload per
client per round (array payload bytes) against `all`'s, and wall time. `--seeds 0,1,2` runs
central and every fleet setting once per seed (the seed draws the partition, the clients
sampled, batches and noise) and adds a row per setting with the means. `--blocks-clients
scaled` samples T/K times the clients a round for `blocks` (capped at all of them): each
unit then hears from as many clients as under `all`, each client uploading K of T units.
`--fleet-export` exports the fleet's bundle with these extra flags (central keeps the
default export: what a user would train otherwise), e.g. SGD clients for `--strategies
fedadam --local-steps 2` (docs/fleet.md). Fashion-MNIST comes from Debian's
dataset-fashion-mnist package; without it those rows are skipped.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgeprop import datasets

ROOT = Path(__file__).resolve().parents[1]
DATA = {"digits": "digits", "fashion": "/usr/share/datasets/fashion-mnist"}
# A device-side command: torch and onnx cannot be imported in it (tests/conftest.py's guard).
DEVICE = ("import sys; sys.modules.update(torch=None, onnx=None); from edgeprop.cli import main; "
          "sys.exit(main(sys.argv[1:]))")


def edgeprop(*args, device: bool = True) -> tuple[str, float]:
    """Run an edgeprop command; (stdout, wall seconds)."""
    cmd = [sys.executable, "-c", DEVICE, *map(str, args)] if device else [sys.executable, "-m", "edgeprop",
                                                                          *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"edgeprop {' '.join(map(str, args))}: {out.stderr.strip().splitlines()[-1:]}")
    return out.stdout, time.perf_counter() - t0


LAST = 10  # rounds whose mean accuracy is reported beside the final round's


def central(bundle: Path, data: str, epochs: int, seed: int, tmp: Path) -> dict:
    copy = tmp / "central"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(bundle, copy)
    _, seconds = edgeprop("train", copy, "--data", data, "--epochs", epochs, "--seed", seed, "--quiet")
    report, _ = edgeprop("eval", copy, "--data", data, "--json")
    return {"accuracy": json.loads(report)["accuracy"], "epochs": epochs, "seconds": seconds}


def fleet(bundle: Path, data: str, args, partition: str, assign: str, slots: str, strategy: str, fraction: float,
          seed: int, tmp: Path) -> dict:
    copy, out = tmp / "fleet", tmp / "fleet.json"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(bundle, copy)
    _, seconds = edgeprop("fleet", "simulate", copy, "--data", data, "--clients", args.clients, "--rounds",
                          args.rounds, "--fraction", fraction, "--local-epochs", args.local_epochs,
                          "--partition", partition, "--assign", assign, "--slots", slots, "--strategy", strategy,
                          "--local-steps", args.local_steps, "--server-momentum", args.server_momentum,
                          "--server-lr", args.server_lr, "--seed", seed, "--json", out)
    r = json.loads(out.read_text())
    uploads = [c["received"] for e in r["history"] for c in e["clients"]]
    downloads = [c["sent"] for e in r["history"] for c in e["clients"]]
    return {"accuracy": r["final_accuracy"], "accuracy_per_round": r["accuracy"],
            "last_rounds_mean": sum(r["accuracy"][-LAST:]) / len(r["accuracy"][-LAST:]), "fraction": fraction,
            "upload_per_client_round": sum(uploads) / len(uploads),
            "download_per_client_round": sum(downloads) / len(downloads),
            "upload_per_round": sum(uploads) / len(r["history"]), "seconds": seconds}


def run_fleet(bundle: Path, source: str, data: str, rule: str, units: int, setting: tuple, seed: int, ref: dict,
              args, tmp: Path) -> dict:
    """One fleet run of (partition, assign, slots, strategy) at `seed`, as a row."""
    partition, assign, slots, strategy = setting
    per_round = max(int(args.clients * args.fraction), 1)
    fraction, policy = args.fraction, assign
    if assign.startswith("blocks"):  # `blocks`: the fewest units per client that cover every unit each round
        k = int(assign.split(":")[1]) if ":" in assign else math.ceil(units / per_round)
        policy = f"blocks:{k}"
        if args.blocks_clients == "scaled":  # each unit hears from as many clients as under `all`
            fraction = min(1.0, args.fraction * units / k)
    row = {"data": data, "rule": rule, "kind": "fleet", "units": units, "partition": partition, "assign": policy,
           "slots": slots, "strategy": strategy, "seed": seed}
    name = f"{data:8s} {rule:10s} seed {seed} {partition:15s} {policy:9s} slots {slots:5s} {strategy:8s}"
    try:
        row.update(fleet(bundle, source, args, partition, policy, slots, strategy, fraction, seed, tmp))
    except RuntimeError as e:  # a setting that fails is a result too
        print(f"{name} FAILED: {e}", flush=True)
        return {**row, "error": str(e)}
    row["vs_central_pp"] = round(100 * (row["accuracy"] - ref["accuracy"]), 2)
    print(f"{name} acc {row['accuracy']:.4f} ({row['vs_central_pp']:+.2f} pp), last {LAST} rounds "
          f"{row['last_rounds_mean']:.4f}  upload/client/round {row['upload_per_client_round'] / 1024:8.1f} KiB  "
          f"{row['seconds']:.0f} s", flush=True)
    return row


def sample_epochs(args, source: str, batch: int) -> int:
    """Central's epochs: the fleet's total samples over the training split's size."""
    if not args.local_steps:
        return max(1, round(args.rounds * args.fraction * args.local_epochs))
    n = len(datasets.load(source, "train"))
    return max(1, round(args.rounds * max(1, int(args.clients * args.fraction)) * args.local_steps * batch / n))


SETTING = ("data", "rule", "kind", "partition", "assign", "slots", "strategy")


def means(rows: list[dict], seeds: list[int]) -> list[dict]:
    """With several seeds: one row per setting (central included) with the means over them."""
    if len(seeds) < 2:
        return []
    out = {}
    for r in rows:
        if "error" not in r:
            out.setdefault(tuple(r.get(k) for k in SETTING), []).append(r)
    summary = []
    for key, group in out.items():
        row = {**dict(zip(SETTING, key)), "kind": key[2] + "-mean", "seeds": [r["seed"] for r in group]}
        for metric in ("accuracy", "last_rounds_mean", "vs_central_pp", "vs_all_pp"):
            if metric in group[0]:
                row[metric] = round(sum(r[metric] for r in group) / len(group), 4)
        summary.append(row)
        print(f"mean over seeds {row['seeds']}: {' '.join(str(v) for v in key if v)} accuracy {row['accuracy']:.4f}"
              + (f" ({row['vs_central_pp']:+.2f} pp from central)" if "vs_central_pp" in row else "")
              + (f" ({row['vs_all_pp']:+.2f} pp from all)" if "vs_all_pp" in row else ""), flush=True)
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits,fashion")
    p.add_argument("--rules", default="noprop-dt,local")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=80)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--local-steps", type=int, default=0, help="batches per unit and round instead of epochs")
    p.add_argument("--partitions", default="iid,dirichlet:0.5,dirichlet:0.1")
    p.add_argument("--assign", default="all,blocks")
    p.add_argument("--slots", default="reset")
    p.add_argument("--strategies", default="fedavgm")
    p.add_argument("--server-momentum", type=float, default=0.9)
    p.add_argument("--server-lr", type=float, default=0.01, help="FedAdam's eta")
    p.add_argument("--fleet-export", default="", help="extra `edgeprop export` flags for the fleet's bundle")
    p.add_argument("--seeds", default="0")
    p.add_argument("--blocks-clients", default="same", choices=["same", "scaled"])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "fleet.json"))
    args = p.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    rows, skipped = [], []
    for data in args.data.split(","):
        source = DATA.get(data, data)
        if source != "digits" and not Path(source).exists():  # Fashion-MNIST: Debian's package
            hint = " (apt install dataset-fashion-mnist)" if data == "fashion" else ""
            skipped.append(f"{data}: {source} not found{hint}")
            print(f"skip: {skipped[-1]}", file=sys.stderr)
            continue
        for rule in args.rules.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                bundle = fleet_bundle = tmp / "bundle"
                edgeprop("export", "--rule", rule, "--data", source, "--out", bundle, "--quiet", device=False)
                if args.fleet_export:
                    fleet_bundle = tmp / "fleet-bundle"
                    edgeprop("export", "--rule", rule, "--data", source, "--out", fleet_bundle, "--quiet",
                             *shlex.split(args.fleet_export), device=False)
                manifest = json.loads((fleet_bundle / "manifest.json").read_text())
                units = len(manifest["units"])
                central_epochs = sample_epochs(args, source, manifest["batch_size"])
                for seed in seeds:
                    ref = central(bundle, source, central_epochs, seed, tmp)
                    print(f"{data:8s} {rule:10s} seed {seed} central {central_epochs} epochs: {ref['accuracy']:.4f} "
                          f"({ref['seconds']:.0f} s)", flush=True)
                    rows.append({"data": data, "rule": rule, "kind": "central", "units": units, "seed": seed, **ref})
                    for setting in itertools.product(
                            *(getattr(args, k).split(",") for k in ("partitions", "assign", "slots", "strategies"))):
                        rows.append(run_fleet(fleet_bundle, source, data, rule, units, setting, seed, ref, args, tmp))
    runs = [r for r in rows if r["kind"] == "fleet" and "error" not in r]
    for r in runs:  # upload relative to `all` with the same data, rule, partition and seed
        same = ("data", "rule", "partition", "slots", "strategy", "seed")
        full = next((a for a in runs if a["assign"] == "all" and all(a[k] == r[k] for k in same)), None)
        if full:
            r["upload_vs_all"] = r["upload_per_client_round"] / full["upload_per_client_round"]
            r["vs_all_pp"] = round(100 * (r["accuracy"] - full["accuracy"]), 2)
    rows += means(rows, seeds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("clients", "fraction", "rounds", "local_epochs", "local_steps",
                                              "server_momentum", "server_lr", "fleet_export", "seeds",
                                              "blocks_clients")}
    out.write_text(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                               "settings": settings,
                               "rows": rows, "skipped": skipped}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
