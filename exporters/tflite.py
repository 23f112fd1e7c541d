"""Lower a traced step or inference graph to `.tflite` with litert-torch (no TensorFlow).

Only builtin TFLite ops are allowed: a Flex (TensorFlow) op needs the Flex delegate, which
a Pi's tflite-runtime or LiteRT build lacks (what breaks TFLite training on a Pi today).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path

from edgeprop.errors import BundleError, EdgepropError


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


def _constant(graph_module, node):
    """The value of `node` if it is a constant tensor of the traced graph, else None."""
    import torch
    while getattr(node, "target", None) == torch.ops.aten.lift_fresh_copy.default:  # torch.tensor(b1)
        node = node.args[0]
    if getattr(node, "op", None) == "get_attr":
        return getattr(graph_module, node.target)
    return None


def without_pow(graph_module):
    """A copy of the traced graph with `base ** x` for a constant positive base (AdamW's bias
    corrections β^step) written as exp(x · ln β): TFLite Micro has no POW kernel, and one
    .tflite file serves both LiteRT and TFLM. ln β is taken in float64, then rounded once."""
    import torch
    gm = copy.deepcopy(graph_module)
    for node in list(gm.graph.nodes):
        if node.target not in (torch.ops.aten.pow.Tensor_Tensor, torch.ops.aten.pow.Scalar):
            continue
        base = node.args[0] if isinstance(node.args[0], (int, float)) else _constant(gm, node.args[0])
        if base is None or (torch.is_tensor(base) and base.numel() != 1) or float(base) <= 0:
            continue  # left as POW: TFLM will refuse the graph, naming the op
        with gm.graph.inserting_before(node):
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (node.args[1], math.log(float(base))))
            node.replace_all_uses_with(gm.graph.call_function(torch.ops.aten.exp.default, (scaled,)))
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def to_tflite(graph_module, args, path: Path) -> None:
    """Write `graph_module(*args)` as a .tflite file whose signature takes args_0, args_1, ...
    and returns output_0, output_1, ... in the step function's order."""
    litert_torch, Interpreter = require()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _terminal_captured(f"converting {path.name} with litert-torch"):
        litert_torch.convert(without_pow(graph_module), tuple(args)).export(str(path))
    interpreter = Interpreter(model_path=str(path))
    try:  # a graph LiteRT cannot prepare fails here, at export, not on the device
        interpreter.allocate_tensors()
    except RuntimeError as e:
        path.unlink()
        detail = " ".join(str(e).split())
        raise EdgepropError(f"{path.name}: LiteRT cannot run the converted graph ({detail})") from None
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    flex = sorted(op for op in ops if op.startswith("Flex") or op == "CUSTOM")
    if flex:
        path.unlink()
        raise EdgepropError(f"{path.name}: the TFLite graph needs non-builtin ops {flex} (Flex delegate)")


def tflm_arena(path: Path, batch: int, bigger, scratch: Path) -> list[int] | None:
    """TFLite Micro's arena for the .tflite graph at `path` (traced at `batch`) as [c, s],
    bytes = c + s·B like every memory fact: exact at `batch` (the tflm engine's own figure);
    the slope from the graph traced at batch + 1 (`bigger()`, converted to `scratch`). None
    where tflite-micro is not installed (its wheels are x86-64 Linux only) or TFLM cannot
    run the graph: the planner then estimates, and the tflm engine says what is wrong."""
    try:
        from edgeprop.runtimes.tflm import arena_bytes
    except ImportError:
        return None
    try:
        exact = arena_bytes(path.read_bytes(), str(path))
        to_tflite(*bigger()[:2], scratch)
        slope = arena_bytes(scratch.read_bytes(), str(scratch)) - exact
    except BundleError:
        return None
    return [exact - slope * batch, slope]
