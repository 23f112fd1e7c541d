"""Options several commands share, declared once, and what they turn into."""
from __future__ import annotations

from pathlib import Path

from edgeprop import datasets
from edgeprop.errors import EdgepropError


def add_quiet(p) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_engine(p) -> None:
    """--engine, --threads, --provider: the engine that runs the bundle's graphs here."""
    p.add_argument("--engine", default="onnxruntime",
                   help="onnxruntime (default), litert, tflm, ort-training or native (compiled to C here)")
    p.add_argument("--threads", type=int, default=1, help="engine threads (default: 1)")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"],
                   help="onnxruntime execution provider: cuda runs the graphs on a GPU (onnxruntime-gpu)")
    add_ort_optimization(p)


def add_ort_optimization(p) -> None:
    p.add_argument("--ort-optimization", default=None, choices=["disabled", "basic", "extended", "layout", "all"],
                   help="onnxruntime's graph optimisation level (default: extended; layout and all add the "
                        "NCHWc conv layout on x86, which the planner pads for: more memory, no faster steps)")


def add_budget(p, text: str) -> None:
    """--budget: bytes the working set may take (read by `limits`)."""
    p.add_argument("--budget", default=None, help=text)


def add_device(p, text: str) -> None:
    """--device: a device profile the run must fit (read by `limits`)."""
    p.add_argument("--device", default=None, help=text)


def engine(args, name: str | None = None):
    """The engine --engine (or `name`), --threads, --provider and --ort-optimization ask for."""
    from edgeprop.runtimes import get_engine
    name = name or args.engine
    options = {"provider": args.provider} if getattr(args, "provider", "cpu") != "cpu" else {}
    if args.ort_optimization:
        if name != "onnxruntime":
            raise EdgepropError(f"--ort-optimization is onnxruntime's; engine {name} has no such levels")
        options["optimization"] = args.ort_optimization
    return get_engine(name, threads=args.threads, **options)


def vector_width(args, device) -> int | None:
    """The NCHWc block the planner pads conv activations to: only where onnxruntime will use
    that layout (--ort-optimization layout or all) on an x86 CPU: the device's, else this host's."""
    if args.ort_optimization not in ("layout", "all"):
        return None
    from edgeprop.cpu import host_vector_width
    return device.vector_width if device is not None else host_vector_width()


def limits(args):
    """(budget in bytes or None, device profile or None) from --budget / --device."""
    from edgeprop.devices import load_profile
    from edgeprop.sizes import parse_size
    budget = parse_size(args.budget, "--budget") if args.budget is not None else None
    device = load_profile(args.device) if args.device is not None else None
    return budget, device


def add_data(p) -> None:
    p.add_argument("--data", default=None, help="digits, an .npz file or an IDX folder (default: the data the "
                                               "bundle was exported from)")


def data_source(bundle, source: str | None) -> str:
    """--data, else the source the bundle was exported from, where it can be found."""
    if source is not None:
        return source
    source = str(bundle.manifest.get("data", {}).get("source", ""))
    if source != "digits" and not Path(source).exists():
        raise EdgepropError(f"{bundle.root} was exported from data at '{source}', not found here; give --data")
    return source


def data(bundle, source: str | None, split: str):
    """A data set, checked against what the bundle was exported for, before any work."""
    loaded = datasets.load(data_source(bundle, source), split)
    datasets.check(loaded, bundle.input_shape, bundle.num_classes)
    datasets.check_scale(loaded, *bundle.input_norm)
    return loaded


def desktop():
    """edgeprop.exporters, or a clear error where the export extra (torch) is missing."""
    try:
        from edgeprop import exporters
        from edgeprop.exporters import bundle_export, validate  # noqa: F401  (torch, onnx, onnxscript)
    except ImportError as e:
        raise EdgepropError(f"this command runs on the desktop and needs the export extra "
                            f"(pip install 'edgeprop[export]'): {e}") from None
    return exporters


def add_inference_options(sp, default: str) -> None:
    """--temperature τ / --inference mean|sample: NoProp-DT's (and -CT's) inference chain
    z_t = a_t û_t + b_t z_{t-1} + τ √c_t ε. Read them back with inference_temperature(args)."""
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--temperature", type=float, default=None, metavar="TAU",
                   help=f"noprop-dt, noprop-ct: inference temperature τ >= 0, the scale of the noise the chain "
                        f"adds ({default})")
    g.add_argument("--inference", choices=["mean", "sample"], default=None,
                   help="mean: τ 0, the mean chain (the default); sample: τ 1, the paper's stochastic chain")


def inference_temperature(args) -> float | None:
    """τ from --temperature or --inference (None: neither was given)."""
    from edgeprop.schedule import INFERENCE_MODES, check_temperature
    if getattr(args, "inference", None) is not None:
        return INFERENCE_MODES[args.inference]
    return None if args.temperature is None else check_temperature(args.temperature)
