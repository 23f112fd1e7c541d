"""`edgeprop fleet`: federated training on Flower (the fleet-sim extra for simulate).

    edgeprop fleet simulate BUNDLE --clients 20 --rounds 3     virtual clients on this machine
    edgeprop fleet app BUNDLE --out APP                        a Flower App for a real fleet
    edgeprop fleet join [--device D] BUNDLE HOST:PORT DATA [...]  a device joins as a SuperNode
"""
from __future__ import annotations

import argparse
import json
import sys

from edgeprop import bundle as bundles
from edgeprop import lock
from edgeprop.errors import EdgepropError

from . import shared

HELP = "federated training on Flower: simulate a fleet, or write a Flower App for a real one"


def _settings_arguments(p) -> None:
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fraction", type=float, default=1.0, help="share of the clients sampled each round (default: 1)")
    p.add_argument("--min-clients", type=int, default=1, help="a round waits for this many clients (default: 1)")
    p.add_argument("--local-epochs", type=int, default=1, help="epochs each client trains per round (default: 1)")
    p.add_argument("--local-steps", type=int, default=0,
                   help="batches each client trains per unit and round instead of whole epochs (default: 0, "
                        "epochs); with SGD clients and --strategy fedadam, 1 or 2 come closest to central training")
    p.add_argument("--assign", default="all", help="all | blocks:K | by-memory: which units each client trains")
    p.add_argument("--strategy", default="fedavgm", choices=["fedavgm", "fedavg", "fedprox", "fedadam"],
                   help="the server's step: FedAvg with server momentum (default; closest to central training "
                        "with AdamW clients and whole local epochs), plain FedAvg, FedProx or FedAdam (with SGD "
                        "clients and --local-steps 2: within 1 pp of central, docs/fleet.md)")
    p.add_argument("--mu", type=float, default=0.01, help="FedProx's proximal weight (default: 0.01)")
    p.add_argument("--server-lr", type=float, default=0.01, help="FedAdam's server learning rate (default: 0.01)")
    p.add_argument("--server-beta2", type=float, default=0.999, help="FedAdam's beta 2 (default: 0.999)")
    p.add_argument("--tau", type=float, default=1e-9, help="FedAdam's epsilon (default: 1e-9)")
    p.add_argument("--server-momentum", type=float, default=0.9, help="FedAvgM's server momentum (default: 0.9)")
    p.add_argument("--slots", default="reset", choices=["keep", "reset"],
                   help="each client's optimizer slots between rounds: zero each round (default; measured "
                        "better) or kept from its last round")
    p.add_argument("--order", default="interleaved", choices=["interleaved", "block-sequential"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round-timeout", type=float, default=600.0,
                   help="seconds a round waits for replies; late clients are left out (default: 600)")
    p.add_argument("--restart", action="store_true", help="start over although the bundle holds a fleet checkpoint")
    p.add_argument("--secagg", action="store_true", help="Flower's SecAgg+: the server sees only the clients' "
                                                          "average, never one client's weights (needs --assign all)")


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="fleet_command", required=True)
    s = sub.add_parser("simulate", help="simulate N clients on Flower's simulation engine")
    s.add_argument("bundle")
    shared.add_data(s)
    s.add_argument("--clients", type=int, default=10)
    s.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | shard:K (default: iid)")
    s.add_argument("--device", default=None,
                   help="device profile(s) of the clients, comma-separated, dealt in turn (by-memory uses them)")
    s.add_argument("--engine", default="onnxruntime")
    _settings_arguments(s)
    s.add_argument("--json", default=None, metavar="FILE", help="write the report as JSON ('-': stdout)")
    s.add_argument("--plot", default=None, metavar="PNG", help="plot test accuracy per round (needs matplotlib)")
    a = sub.add_parser("app", help="write a Flower App (flower-superlink, flower-supernode, flwr run)")
    a.add_argument("bundle")
    a.add_argument("--out", required=True, help="the App's folder")
    a.add_argument("--force", action="store_true", help="replace an App folder edgeprop wrote")
    a.add_argument("--test-data", default=None, help="the server's test split for evaluation (default: the "
                                                       "bundle's export data)")
    _settings_arguments(a)
    j = sub.add_parser("join", help="join a fleet as a Flower SuperNode, once the data, the device and the "
                                    "SuperLink are checked (options before BUNDLE; flower-supernode's after DATA)")
    j.add_argument("--device", default=None, help="this device's profile (by-memory assignment)")
    j.add_argument("--engine", default="onnxruntime")
    j.add_argument("--client", type=int, default=-1, help="a label for this client in the server's reports")
    j.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the SuperLink (default: 30)")
    j.add_argument("bundle")
    j.add_argument("superlink", help="the SuperLink's HOST:PORT (its Fleet API, 9092 by default)")
    j.add_argument("data", help="this device's training data: an .npz file or an IDX folder")
    j.add_argument("supernode_options", nargs=argparse.REMAINDER, metavar="...",
                   help="passed on to flower-supernode, e.g. --root-certificates ca.crt")


def settings(args, test_data: str):
    from edgeprop.fleet.server import Settings
    return Settings(rounds=args.rounds, fraction=args.fraction, min_clients=args.min_clients,
                    local_epochs=args.local_epochs, local_steps=args.local_steps, assign=args.assign,
                    strategy=args.strategy, mu=args.mu,
                    server_lr=args.server_lr, server_beta2=args.server_beta2, tau=args.tau,
                    server_momentum=args.server_momentum, slots=args.slots,
                    order=args.order, seed=args.seed,
                    round_timeout=args.round_timeout, test_data=test_data, restart=args.restart,
                    secagg=args.secagg).check()


def run(args) -> int:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise EdgepropError("edgeprop fleet needs Flower: pip install 'edgeprop[fleet-sim]'") from None
    return {"simulate": simulate, "app": write_app, "join": join}[args.fleet_command](args)


def simulate(args) -> int:
    from edgeprop.devices import load_profile
    from edgeprop.fleet.simulate import simulate as run_simulation
    bundle = bundles.load(args.bundle)
    source = shared.data_source(bundle, args.data)
    train = shared.data(bundle, source, "train")
    config = settings(args, source)
    devices = [load_profile(d) for d in args.device.split(",")] if args.device else None
    if args.plot:
        from .charts import _check_png
        _check_png(args.plot)
    bundle.check_writable()
    log = (lambda line: print(line, file=sys.stderr)) if args.json == "-" else print
    with lock.held(bundle.root, "run a fleet on it"):
        report = run_simulation(bundle, train, args.clients, config, args.partition, devices, args.engine, log)
    if args.json == "-":
        json.dump(report, sys.stdout, indent=1)
        print()
    elif args.json:
        from edgeprop.storage import write_atomic
        write_atomic(args.json, (json.dumps(report, indent=1) + "\n").encode())
    if args.plot:
        from .charts import accuracy_per_round
        log(f"wrote {accuracy_per_round(report, args.plot)}")
    log(f"final accuracy {report['final_accuracy']:.4f} after {len(report['history'])} rounds; "
        f"checkpoint: {bundle.checkpoint_path()}")
    return 0


def write_app(args) -> int:
    from edgeprop.fleet.app import write
    bundle = bundles.load(args.bundle)
    config = settings(args, shared.data_source(bundle, args.test_data))
    out = write(bundle, config, args.out, args.force)
    print(f"wrote {out}; run it with flower-superlink, flower-supernode and flwr run (docs/fleet.md)")
    return 0


def join(args) -> int:
    """Check everything this device can check, then become flower-supernode (exec)."""
    import os
    from pathlib import Path

    from edgeprop import datasets
    from edgeprop.devices import load_profile
    from edgeprop.fleet.client import Setup
    from edgeprop.fleet.join import check_superlink, split_address, supernode_command
    split_address(args.superlink)
    if not args.wait >= 0:
        raise EdgepropError(f"--wait must be >= 0 seconds, got {args.wait}")
    bundle = bundles.load(args.bundle)
    device = load_profile(args.device) if args.device else None
    data = str(Path(args.data).resolve()) if Path(args.data).exists() else args.data
    Setup(bundle, datasets.load(data, "train"), args.client, device, args.engine).check()
    node = {"bundle": str(bundle.root.resolve()), "data": data, "client": args.client, "engine": args.engine}
    if args.device:  # a profile's name, or its file
        node["device"] = str(Path(args.device).resolve()) if Path(args.device).exists() else args.device
    command = supernode_command(args.superlink, node, [o for o in args.supernode_options if o != "--"])
    check_superlink(args.superlink, args.wait)
    print(f"joining the fleet at {args.superlink} with {data}", flush=True)
    os.execve(command[0], command, {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
