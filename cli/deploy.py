"""`edgeprop deploy`: a bundle made into what a device runs (edgeprop.targets)."""
from __future__ import annotations

from edgeprop import bundle as bundles
from edgeprop import lock
from edgeprop.errors import EdgepropError

from . import shared

HELP = "write a folder that sets up and trains offline on a Linux device"


def add_arguments(dp) -> None:
    dp.add_argument("bundle")
    dp.add_argument("--device", required=True, help="a profile name (see `edgeprop devices`) or a .toml file")
    dp.add_argument("--out", required=True)
    dp.add_argument("--engine", default="onnxruntime")
    dp.add_argument("--engine-version", default=None,
                    help="pin the engine's version, e.g. 1.20.1 (default: the newest with a wheel for the device)")
    dp.add_argument("--python", default=None, help="the device's Python, e.g. 3.11 (default: the profile's)")
    dp.add_argument("--edgeprop-wheel", default=None, help="ship this edgeprop wheel instead of building one")
    dp.add_argument("--force", action="store_true", help="replace an existing --out folder")
    dp.add_argument("--fleet", action="store_true",
                    help="python target: also Flower's wheels and a `supernode` script (docs/fleet.md)")
    dp.add_argument("--target", choices=("python", "c99", "native"), default="python",
                    help="python: a folder for a Linux device; c99: firmware sources for a microcontroller; "
                         "native: C sources for a Linux device that trains with no Python")
    mcu = dp.add_argument_group("--target c99 / native", "the data and the run the C driver trains with")
    mcu.add_argument("--data", default="digits", help="the data set whose subset goes into flash")
    mcu.add_argument("--train-samples", type=int, default=None, help="the first N training samples (default all)")
    mcu.add_argument("--test-samples", type=int, default=None, help="the first N test samples (default all)")
    mcu.add_argument("--epochs", type=int, default=1)
    mcu.add_argument("--seed", type=int, default=0, help="as `edgeprop train --seed`: the same noise")
    mcu.add_argument("--order", default="interleaved", help="--target native: as `edgeprop train --order`")
    shared.add_inference_options(mcu, "the firmware's test chain; default: the bundle's")


def target(args):
    from edgeprop.targets import get_target
    if args.target == "c99":  # a microcontroller: C sources, a linker script and a Makefile
        if args.fleet:
            raise EdgepropError("--fleet needs the python target: a microcontroller cannot run a Flower SuperNode")
        try:
            return get_target("c99", data=args.data, train_samples=args.train_samples,
                              test_samples=args.test_samples, epochs=args.epochs, seed=args.seed,
                              temperature=shared.inference_temperature(args))
        except ImportError as e:
            raise EdgepropError(f"--target c99 runs on the desktop and needs the mcu extra "
                                f"(pip install 'edgeprop[mcu]'): {e}") from None
    if args.target == "native":  # a Linux device with a C compiler and no Python
        if args.fleet:
            raise EdgepropError("--fleet needs the python target: the native target runs no Flower SuperNode")
        try:
            return get_target("native", data=args.data, train_samples=args.train_samples,
                              test_samples=args.test_samples, epochs=args.epochs, seed=args.seed, order=args.order,
                              temperature=shared.inference_temperature(args))
        except ImportError as e:
            raise EdgepropError(f"--target native runs on the desktop and needs the native extra "
                                f"(pip install 'edgeprop[native]'): {e}") from None
    return get_target("python", engine=args.engine, engine_version=args.engine_version, python=args.python,
                      edgeprop_wheel=args.edgeprop_wheel, fleet=args.fleet)


def run(args) -> int:
    from edgeprop.devices import load_profile
    device = load_profile(args.device)
    chosen = target(args)
    bundle = bundles.load(args.bundle)
    with lock.held(bundle.root, "deploy it"):  # not while a run rewrites its checkpoint
        report = chosen.write(bundle, device, args.out, force=args.force)
    print(chosen.summary(report, device, args.out))
    return 0
