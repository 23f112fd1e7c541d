"""Options several commands share, declared once, and what they turn into."""
from __future__ import annotations

from edgeprop import datasets
from edgeprop.errors import EdgepropError


def add_quiet(p) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_engine(p) -> None:
    """--engine, --threads, --provider: the engine that runs the bundle's graphs here."""
    p.add_argument("--engine", default="onnxruntime", help="inference engine (default: onnxruntime)")
    p.add_argument("--threads", type=int, default=1, help="engine threads (default: 1)")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"],
                   help="onnxruntime execution provider: cuda runs the graphs on a GPU (onnxruntime-gpu)")


def add_budget(p, text: str) -> None:
    """--budget: bytes the working set may take (read by `limits`)."""
    p.add_argument("--budget", default=None, help=text)


def add_device(p, text: str) -> None:
    """--device: a device profile the run must fit (read by `limits`)."""
    p.add_argument("--device", default=None, help=text)


def engine(args):
    """The engine --engine, --threads and --provider ask for."""
    from edgeprop.runtimes import get_engine
    options = {"provider": args.provider} if args.provider != "cpu" else {}
    return get_engine(args.engine, threads=args.threads, **options)


def limits(args):
    """(budget in bytes or None, device profile or None) from --budget / --device."""
    from edgeprop.devices import load_profile
    from edgeprop.sizes import parse_size
    budget = parse_size(args.budget, "--budget") if args.budget is not None else None
    device = load_profile(args.device) if args.device is not None else None
    return budget, device


def data(bundle, source: str, split: str):
    """A data set, checked against what the bundle was exported for."""
    loaded = datasets.load(source, split)
    datasets.check(loaded, bundle.input_shape, bundle.num_classes)
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
