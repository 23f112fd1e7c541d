"""`edgeprop fleet join`: a device joins a fleet as a Flower SuperNode.

Before it hands over to flower-supernode it checks, on the device, what would otherwise fail
later and far away: the data fit the bundle, the device holds one unit, and the SuperLink
answers (flower-supernode itself retries a dead address for ever, a warning a try).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from edgeprop.errors import EdgepropError


def split_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' (or '[IPv6]:PORT') -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EdgepropError(f"SuperLink address {address!r}: expected HOST:PORT, e.g. server:9092")
    return host.strip("[]"), int(port)


def check_superlink(address: str, wait: float) -> None:
    """The SuperLink accepts a connection within `wait` seconds (tried once a second)."""
    host, port = split_address(address)
    deadline = time.monotonic() + wait
    while True:
        try:
            socket.create_connection((host, port), timeout=max(min(deadline - time.monotonic(), 5.0), 0.5)).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                reason = e.strerror or type(e).__name__
                raise EdgepropError(f"the SuperLink at {address} does not answer ({reason}) after {wait:g} s: "
                                    f"check the address and that flower-superlink runs there") from None
            time.sleep(1.0)


def supernode_command(superlink: str, node_config: dict, options: list[str]) -> list[str]:
    """flower-supernode's command line: this environment's, with the node config edgeprop's
    client reads (docs/fleet.md); `options` go on as they are (TLS, --insecure, ...)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = shutil.which("flower-supernode", path=path)
    if exe is None:
        raise EdgepropError("flower-supernode not found: pip install 'edgeprop[fleet]'")
    # TOML basic strings: JSON's quoting of a path is valid TOML
    config = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in node_config.items())
    return [exe, "--superlink", superlink, "--node-config", config, *options]
