"""Lower a traced step or inference graph to `.tflite` with litert-torch (no TensorFlow).

Only builtin TFLite ops are allowed: a Flex (TensorFlow) op needs the Flex delegate, which
a Pi's tflite-runtime or LiteRT build lacks (what breaks TFLite training on a Pi today).
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

from edgeprop.errors import EdgepropError


@contextlib.contextmanager
def _terminal_captured(what: str):
    """litert-torch (and torchao, which it imports) print progress and C++ logs straight to
    the terminal: hold them, and show them only when `what` fails."""
    with tempfile.TemporaryFile("w+") as log:
        saved = os.dup(1), os.dup(2)
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        except ImportError as e:
            raise EdgepropError(f"--tflite needs the tflite extra: pip install 'edgeprop[tflite]' ({e})") from None
        except Exception as e:
            log.seek(0)
            raise EdgepropError(f"{what} failed ({e}):\n{log.read()[-4000:]}") from e
        finally:
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def require():
    """litert-torch and the LiteRT interpreter, or an error saying how to install them
    (called before an export starts any work)."""
    with _terminal_captured("importing litert-torch"):
        import litert_torch
        from ai_edge_litert.interpreter import Interpreter
    logging.getLogger("litert_torch").setLevel(logging.ERROR)
    return litert_torch, Interpreter


def to_tflite(graph_module, args, path: Path) -> None:
    """Write `graph_module(*args)` as a .tflite file whose signature takes args_0, args_1, ...
    and returns output_0, output_1, ... in the step function's order."""
    litert_torch, Interpreter = require()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _terminal_captured(f"converting {path.name} with litert-torch"):
        litert_torch.convert(graph_module, tuple(args)).export(str(path))
    ops = {op["op_name"] for op in Interpreter(model_path=str(path))._get_ops_details()}
    flex = sorted(op for op in ops if op.startswith("Flex") or op == "CUSTOM")
    if flex:
        path.unlink()
        raise EdgepropError(f"{path.name}: the TFLite graph needs non-builtin ops {flex} (Flex delegate)")
