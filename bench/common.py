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


def backprop_cnn():
    """The NoProp-DT CNN block's image path and joint head (without the label path), as one
    network trained by back-prop: the twin the CNN comparisons measure NoProp against."""
    from torch import nn
    return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(),
                         nn.Conv2d(64, 128, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2048, 256),
                         nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
