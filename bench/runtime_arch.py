"""The runtime figure per CPU architecture: interpreter, numpy, onnxruntime, edgeprop's engine
module and the environment onnxruntime's first session makes (model_memory.measure_onnx's
baseline), here and on emulated aarch64.

    python bench/runtime_arch.py --site SITE [--out bench/results/runtime_arch.json]

SITE: an aarch64 site-packages folder holding a deployed folder's wheels (numpy, onnxruntime,
edgeprop), as tests/aarch64.py's `install` makes it (pip --target under qemu). The arm64
Python runs under `qemu-aarch64-static -L ROOT` (tests/aarch64.py's root filesystem). qemu's
own memory (its binary, its heap, the translated-code buffer: 26 MiB for an empty interpreter,
growing with the code run) sits at host addresses; the guest's mappings, which a device would
hold, are counted alone from /proc/self/smaps.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PHASES = """
import sys
def guest():  # Rss of the guest's mappings; qemu's own are at host addresses (0x7f...) or its [heap]
    total, counted = 0, False
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if len(parts) >= 5 and "-" in parts[0] and not parts[0].endswith(":"):
            name = parts[5] if len(parts) > 5 else ""
            counted = int(parts[0].split("-")[0], 16) < 0x7f0000000000 and name != "[heap]" and "qemu" not in name
        elif parts[0] == "Rss:" and counted:
            total += int(parts[1]) * 1024
    return total
def process():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
emulated = sys.argv[2] == "1"
rss = guest if emulated else process
out = {"empty": rss()}
import numpy; out["numpy"] = rss()
import onnxruntime; out["onnxruntime"] = rss()
from edgeprop.runtimes import get_engine
engine = get_engine("onnxruntime"); out["engine module"] = rss()
engine.load(sys.argv[1]); out["first session"] = rss()
import platform
out["versions"] = {"machine": platform.machine(), "onnxruntime": onnxruntime.__version__,
                   "numpy": numpy.__version__, "python": sys.version.split()[0]}
if emulated:
    out["qemu process"] = process()
print(__import__("json").dumps(out))
"""


def tiny(folder: Path) -> Path:
    """A one-node model any onnxruntime since 1.16 reads (IR version 10)."""
    import onnx
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "tiny", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, str(folder / "tiny.onnx"))
    return folder / "tiny.onnx"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--site", required=True, help="aarch64 site-packages with numpy, onnxruntime, edgeprop")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "runtime_arch.json"))
    args = p.parse_args()
    import aarch64  # tests/aarch64.py
    why = aarch64.missing_tools()
    if why:
        sys.exit(f"runtime_arch: {why}")
    root = aarch64.root_filesystem()
    with tempfile.TemporaryDirectory() as folder:
        model = tiny(Path(folder))
        here = subprocess.run([sys.executable, "-c", PHASES, str(model), "0"], capture_output=True, text=True,
                              check=True, cwd=folder)
        arm = aarch64.python(root, "-c", PHASES, model, "1", cwd=Path(folder), env={"PYTHONPATH": args.site})
    if arm.returncode != 0:
        sys.exit(f"runtime_arch: the arm64 run failed: {arm.stderr[-500:]}")
    result = {"x86_64": json.loads(here.stdout), "aarch64": json.loads(arm.stdout)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for arch, phases in result.items():
        print(arch, phases["versions"], "; ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in phases.items()
                                                   if isinstance(v, int)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
