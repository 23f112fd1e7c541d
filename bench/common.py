"""What the benchmarks share: each measurement in a fresh process of its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def spawn(script: str, *args, python: str = sys.executable) -> dict:
    """Run `script --worker ARGS...` in a fresh process with one math thread (with `python`:
    another environment's interpreter); its last stdout line is the JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([str(python), script, "--worker", *map(str, args)], capture_output=True,
                         text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
