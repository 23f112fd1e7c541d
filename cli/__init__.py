"""`edgeprop`: export and validate on the desktop; train, eval, profile and info on the device.

export and validate need the `export` extra (torch); the other commands never import it.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from edgeprop.errors import EdgepropError

# One module per command (edgeprop.cli.<name>): its HELP, add_arguments(parser) and run(args).
# The order is the order of `edgeprop --help`.
COMMANDS = ("export", "validate", "train", "eval", "plot", "devices", "profile", "deploy", "fleet", "info")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeprop", description=__doc__)
    sub = p.add_subparsers(dest="command")
    for name in COMMANDS:
        command = importlib.import_module(f"{__name__}.{name}")
        sp = sub.add_parser(name, help=command.HELP)
        command.add_arguments(sp)
        sp.set_defaults(func=command.run)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:  # a bare `edgeprop` shows what it can do
        p.print_help()
        return 0
    try:
        return args.func(args)
    except EdgepropError as e:
        print(f"edgeprop {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # disk full, permission denied, ...: say so without a traceback
        print(f"edgeprop {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgeprop {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
