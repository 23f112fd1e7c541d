"""Federated NoProp-DT and `local` on Flower's simulation engine against central training.

    python bench/fleet.py [--data digits,fashion] [--rules noprop-dt,local] [--clients 100]
                          [--fraction 0.1] [--rounds 80] [--local-epochs 1]
                          [--partitions iid,dirichlet:0.5,dirichlet:0.1] [--assign all,blocks]
                          [--slots reset] [--strategies fedavgm] [--out bench/results/fleet.json]

For each data set and rule: export once (torch), then
  central    `edgeprop train` on the whole training split for the same total sample-epochs
             as the fleet (rounds x fraction x local epochs), in a torch-free process
  fleet      `edgeprop fleet simulate` per partition and assignment, torch-free; `blocks`
             deals ceil(units / clients per round) units to each client, the least that
             covers every unit each round
(`--slots keep,reset` also compares keeping each client's optimizer slots between rounds
with resetting them, `--strategies fedavgm,fedavg` the server's step with and without
momentum) and records the final test accuracy, the gap to central in points, the mean upload per
client per round (array payload bytes) against `all`'s, and wall time. Fashion-MNIST comes
from Debian's dataset-fashion-mnist package; without it those rows are skipped.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def central(bundle: Path, data: str, epochs: int, tmp: Path) -> dict:
    copy = tmp / "central"
    shutil.copytree(bundle, copy)
    _, seconds = edgeprop("train", copy, "--data", data, "--epochs", epochs, "--quiet")
    report, _ = edgeprop("eval", copy, "--data", data, "--json")
    return {"accuracy": json.loads(report)["accuracy"], "epochs": epochs, "seconds": seconds}


def fleet(bundle: Path, data: str, args, partition: str, assign: str, slots: str, strategy: str, tmp: Path) -> dict:
    copy, out = tmp / "fleet", tmp / "fleet.json"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(bundle, copy)
    _, seconds = edgeprop("fleet", "simulate", copy, "--data", data, "--clients", args.clients, "--rounds",
                          args.rounds, "--fraction", args.fraction, "--local-epochs", args.local_epochs,
                          "--partition", partition, "--assign", assign, "--slots", slots, "--strategy", strategy,
                          "--json", out)
    r = json.loads(out.read_text())
    uploads = [c["received"] for e in r["history"] for c in e["clients"]]
    downloads = [c["sent"] for e in r["history"] for c in e["clients"]]
    return {"accuracy": r["final_accuracy"], "accuracy_per_round": r["accuracy"],
            "upload_per_client_round": sum(uploads) / len(uploads),
            "download_per_client_round": sum(downloads) / len(downloads),
            "upload_per_round": sum(uploads) / len(r["history"]), "seconds": seconds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits,fashion")
    p.add_argument("--rules", default="noprop-dt,local")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=80)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--partitions", default="iid,dirichlet:0.5,dirichlet:0.1")
    p.add_argument("--assign", default="all,blocks")
    p.add_argument("--slots", default="reset")
    p.add_argument("--strategies", default="fedavgm")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "fleet.json"))
    args = p.parse_args()
    per_round = max(int(args.clients * args.fraction), 1)
    central_epochs = max(1, round(args.rounds * args.fraction * args.local_epochs))
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
                bundle = tmp / "bundle"
                edgeprop("export", "--rule", rule, "--data", source, "--out", bundle, "--quiet", device=False)
                units = len(json.loads((bundle / "manifest.json").read_text())["units"])
                ref = central(bundle, source, central_epochs, tmp)
                print(f"{data:8s} {rule:10s} central {central_epochs} epochs: {ref['accuracy']:.4f} "
                      f"({ref['seconds']:.0f} s)", flush=True)
                rows.append({"data": data, "rule": rule, "kind": "central", "units": units, **ref})
                for partition, assign, slots, strategy in itertools.product(
                        *(getattr(args, k).split(",") for k in ("partitions", "assign", "slots", "strategies"))):
                    policy = f"blocks:{math.ceil(units / per_round)}" if assign == "blocks" else assign
                    row = {"data": data, "rule": rule, "kind": "fleet", "units": units, "partition": partition,
                           "assign": policy, "slots": slots, "strategy": strategy}
                    name = f"{data:8s} {rule:10s} {partition:15s} {policy:9s} slots {slots:5s} {strategy:8s}"
                    try:
                        row.update(fleet(bundle, source, args, partition, policy, slots, strategy, tmp))
                    except RuntimeError as e:  # a setting that fails is a result too
                        row["error"] = str(e)
                        print(f"{name} FAILED: {e}", flush=True)
                        rows.append(row)
                        continue
                    row["vs_central_pp"] = round(100 * (row["accuracy"] - ref["accuracy"]), 2)
                    rows.append(row)
                    print(f"{name} acc {row['accuracy']:.4f} ({row['vs_central_pp']:+.2f} pp)  upload/client/round "
                          f"{row['upload_per_client_round'] / 1024:8.1f} KiB  {row['seconds']:.0f} s", flush=True)
    for r in rows:  # upload relative to `all` with the same data, rule and partition
        full = next((a for a in rows if a.get("assign") == "all" and "error" not in a and
                     (a["data"], a["rule"], a["partition"], a["slots"], a["strategy"]) ==
                     (r["data"], r["rule"], r.get("partition"), r.get("slots"), r.get("strategy"))), None)
        if full and "error" not in r:
            r["upload_vs_all"] = r["upload_per_client_round"] / full["upload_per_client_round"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("clients", "fraction", "rounds", "local_epochs")}
    out.write_text(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                               "settings": {**settings, "central_epochs": central_epochs},
                               "rows": rows, "skipped": skipped}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
