"""`edgeprop fleet app`: a Flower App folder that Flower's own commands run.

    APP/pyproject.toml          [tool.flwr.app]: components and the run config (bundle path,
                                rounds, fraction, assignment, strategy, ...); `flwr run APP
                                CONNECTION --run-config "rounds=10"` overrides any of them
    APP/edgeprop_fleet/server.py   app = edgeprop.fleet.server.server_app()
    APP/edgeprop_fleet/client.py   app = edgeprop.fleet.client.client_app(setup_from_node)

The App holds no code of its own: the SuperLink and every SuperNode need edgeprop with the
fleet extra installed, and each SuperNode the bundle (same bundle id) and its data.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from edgeprop.bundle import Bundle
from edgeprop.storage import check_output, new_folder

from .server import Settings

PACKAGE = "edgeprop_fleet"

SERVER = '''"""The fleet's ServerApp (written by `edgeprop fleet app`)."""
from edgeprop.fleet.server import server_app

app = server_app()
'''

CLIENT = '''"""The fleet's ClientApp (written by `edgeprop fleet app`): a SuperNode's --node-config
gives its data=PATH, and optionally device=PROFILE, bundle=PATH, client=N, engine=NAME."""
from edgeprop.fleet.client import client_app, setup_from_node

app = client_app(setup_from_node)
'''


def _toml_value(value) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def pyproject(bundle: Bundle, settings: Settings) -> str:
    config = {"bundle": str(bundle.root.resolve()),
              **{k.replace("_", "-"): v for k, v in asdict(settings).items() if k != "wait_for"}}
    lines = "\n".join(f"{k} = {_toml_value(v)}" for k, v in config.items())
    return f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgeprop-fleet"
version = "1.0.0"
description = "edgeprop: train bundle {bundle.id} ({bundle.rule}) across a fleet"
license = "Apache-2.0"
# edgeprop[fleet] must be installed on the SuperLink and every SuperNode (edgeprop deploy).
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["{PACKAGE}"]

[tool.flwr.app]
publisher = "edgeprop"

[tool.flwr.app.components]
serverapp = "{PACKAGE}.server:app"
clientapp = "{PACKAGE}.client:app"

[tool.flwr.app.config]
{lines}
'''


def write(bundle: Bundle, settings: Settings, out: str | Path, force: bool = False) -> Path:
    out = Path(out)
    check_output(out, bundle.root, force)
    with new_folder(out, mark=True) as tmp:
        (tmp / "pyproject.toml").write_text(pyproject(bundle, settings.check()))
        (tmp / PACKAGE).mkdir()
        (tmp / PACKAGE / "__init__.py").write_text("")
        (tmp / PACKAGE / "server.py").write_text(SERVER)
        (tmp / PACKAGE / "client.py").write_text(CLIENT)
    return out
