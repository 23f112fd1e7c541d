"""NoProp-DT trained from scratch on an emulated Cortex-M7 (STM32F746 profile, qemu-system-arm
mps2-an500): SRAM arena, stack and flash of the firmware, test accuracy reached on the
emulated MCU, and instructions per training step of each unit (qemu -icount shift=0: one
instruction per virtual nanosecond, read through SysTick and calibrated by a loop of known
length). Test accuracy of the mean chain (τ 0) and of the sampled chain (τ 1), beside the
host's from the same training (block-sequential, same seed and subset). Targets: SRAM arena
<= 64 KB, test accuracy >= 95% on digits, the firmware's accuracy = the host's.

    python bench/mcu.py [--blocks 3 --width 16 --epochs 40 --train-samples N --test-samples N]
    -> bench/results/mcu.json

Needs the mcu extra and scripts/install-mcu-tools.sh's Debian packages.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--train-samples", type=int, default=None, help="default: the whole digits train split")
    p.add_argument("--test-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "mcu.json"))
    args = p.parse_args()
    subprocess.run([str(ROOT / "scripts" / "install-mcu-tools.sh")], check=True)
    from edgeprop.devices import load_profile
    from edgeprop.exporters import export
    from edgeprop.targets.c99 import results, write_firmware

    work = Path(tempfile.mkdtemp(prefix="bench-mcu."))
    bundle = export(work / "bundle", blocks=args.blocks, width=args.width, batch_size=args.batch_size,
                    progress=False)
    device = load_profile("stm32f746")
    report = write_firmware(bundle, device, work / "fw", train_samples=args.train_samples,
                            test_samples=args.test_samples, epochs=args.epochs, seed=args.seed)
    build = subprocess.run(["make", "-s", "-C", str(work / "fw")], capture_output=True, text=True, check=True)
    sections = {k: int(v) for k, v in re.findall(r"fw\.elf \.(\w+) (\d+) bytes", build.stdout)}
    symbols = subprocess.run(["arm-none-eabi-nm", "-S", str(work / "fw" / "fw.elf")], capture_output=True,
                             text=True, check=True).stdout
    size = {name: int(s, 16) for _, s, _, name in (line.split() for line in symbols.splitlines()
                                                   if len(line.split()) == 4)}
    started = time.monotonic()
    run = subprocess.run(["make", "-s", "-C", str(work / "fw"), "run"], capture_output=True, text=True, check=True)
    seconds = time.monotonic() - started
    got = results(run.stdout + run.stderr)
    host = host_run(bundle, work / "fw" / "data.npz", args.epochs, args.seed)
    loops, ticks = got["calibrate"]
    per_tick = loops / ticks  # instructions per SysTick tick under -icount shift=0
    instructions = {u: round(t * per_tick / steps) for u, (steps, t) in got["ticks"].items()}
    arena = size["edgeprop_arena"] + size["edgeprop_scratch"]
    result = {
        "date": time.strftime("%Y-%m-%d"), "device": device.name, "board": "qemu-system-arm mps2-an500 (Cortex-M7)",
        "model": {"blocks": args.blocks, "width": args.width, "batch_size": args.batch_size},
        "epochs": args.epochs, "train_samples": report["train_samples"], "test_samples": report["test_samples"],
        "sram_arena_bytes": arena,
        "sram_arena_parts": {"state_batch_order": size["edgeprop_arena"], "graph_scratch": size["edgeprop_scratch"]},
        "stack_reserved_bytes": sections["stack"], "stack_used_bytes": got["stack"][0],
        "sram_total_bytes": sections["data"] + sections["bss"] + sections["stack"],
        "flash_bytes": sections["text"] + sections["edgeprop_state"] + sections["data"],
        "flash_parts": {"code_constants_data": sections["text"], "weights_and_optimizer": sections["edgeprop_state"]},
        "test_accuracy": got["accuracy"],  # the mean chain (τ 0, the bundle's default)
        "test_accuracy_sampled": got["accuracy_sampled"],  # the paper's chain (τ 1)
        "host_accuracy": host["accuracy"], "host_accuracy_sampled": host["accuracy_sampled"],
        "host_note": "edgeprop train --order block-sequential on onnxruntime, same seed and subset",
        "instructions_per_step": instructions,
        "instructions_per_tick": per_tick,
        "final_losses": {u: v[-1] for u, v in got["loss"].items()},
        "emulation_seconds": round(seconds, 1),
        "targets": {"sram_arena_le_64KB": arena <= 64 * 1024, "accuracy_ge_95": got["accuracy"] >= 0.95},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    assert np.isfinite(got["accuracy"])


def host_run(bundle: Path, data: Path, epochs: int, seed: int) -> dict:
    """The same training on the host (numpy + onnxruntime, block-sequential, the same seed and
    subset), evaluated on the same test subset with the same inference seed."""
    from edgeprop import bundle as bundles
    from edgeprop.datasets import load as load_data
    from edgeprop.runtimes import get_engine
    from edgeprop.trainer import TrainConfig, Trainer, evaluate
    b, engine = bundles.load(bundle), get_engine("onnxruntime", threads=1)
    trainer = Trainer(b, engine, load_data(str(data), "train"),
                      TrainConfig(epochs=epochs, order="block-sequential", seed=seed))
    trainer.run(progress=False, checkpoints=False)
    return evaluate(b, engine, load_data(str(data), "test"), trainer.state)


if __name__ == "__main__":
    main()
