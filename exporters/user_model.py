"""`export --model FILE.py:FUNCTION` or `--model FILE.pt2`: the user's own model (desktop).

FILE.py:FUNCTION is imported and FUNCTION() called with no arguments: it returns the
torch.nn.Module. `--weights` then loads a state dict into it with torch.load(weights_only=
True), which reads tensors and never unpickles code. FILE.pt2 is an ExportedProgram
(torch.export.save); torch.export.load unpickles, so only load a .pt2 you made yourself.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from edgeprop.errors import EdgepropError


def is_user_model(text: str) -> bool:
    return text.endswith(".pt2") or ".py:" in text


def load(text: str, weights: str | None = None) -> nn.Module:
    """The module named by `text` (FILE.py:FUNCTION or FILE.pt2), with `weights` loaded."""
    if text.endswith(".pt2"):
        model = _exported_program(Path(text))
    else:
        model = _built(*text.rsplit(":", 1))
    if weights is not None:
        _load_weights(model, Path(weights))
    return model


def _built(file: str, function: str) -> nn.Module:
    path = Path(file)
    if not path.is_file():
        raise EdgepropError(f"--model {file}:{function}: no such file")
    spec = importlib.util.spec_from_file_location(f"edgeprop_user_model_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))  # the file may import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's code: one line saying where it failed
        raise EdgepropError(f"--model {file}: importing it failed: {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(str(path.parent.resolve()))
    build = getattr(module, function, None)
    if not callable(build):
        raise EdgepropError(f"--model {file}:{function}: {file} defines no function {function!r}")
    try:
        model = build()
    except Exception as e:  # noqa: BLE001
        raise EdgepropError(f"--model {file}:{function}: {function}() failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise EdgepropError(f"--model {file}:{function}: {function}() returned {type(model).__name__}, "
                            "not a torch.nn.Module")
    return model


def _exported_program(path: Path) -> nn.Module:
    if not path.is_file():
        raise EdgepropError(f"--model {path}: no such file")
    try:
        return torch.export.load(str(path)).module()
    except Exception as e:  # noqa: BLE001
        raise EdgepropError(f"--model {path}: not an ExportedProgram torch.export.load can read "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _load_weights(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise EdgepropError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickled code is refused here, as is a damaged file
        raise EdgepropError(f"--weights {path}: not a state dict torch.load(weights_only=True) reads "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict):
        raise EdgepropError(f"--weights {path}: holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise EdgepropError(f"--weights {path}: does not fit the model: {detail}") from None
