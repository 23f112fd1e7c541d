"""`edgeprop devices`: the device profiles edgeprop knows."""
from __future__ import annotations

import json

HELP = "list the device profiles edgeprop knows"


def add_arguments(d) -> None:
    d.add_argument("--json", action="store_true")


def run(args) -> int:
    from edgeprop.devices import HERE, profiles
    from edgeprop.sizes import format_size as fmt
    rows = profiles()
    if args.json:
        print(json.dumps([{**vars(p), "budget": p.budget} for p in rows], indent=1))
        return 0
    print(f"{'name':17s} {'kind':5s} {'arch':11s} {'cores':>5s} {'RAM':>10s} {'for training':>12s} "
          f"{'flash':>10s}  engines")
    for p in rows:
        ram = fmt(p.ram) + (f" +{fmt(p.psram)}" if p.psram else "")
        print(f"{p.name:17s} {p.kind:5s} {p.arch:11s} {p.cores:5d} {ram:>10s} {fmt(p.budget):>12s} "
              f"{fmt(p.flash):>10s}  {', '.join(p.engines)}")
    print(f"\nAdd your own: copy a file from {HERE} and pass --device FILE.toml")
    return 0
