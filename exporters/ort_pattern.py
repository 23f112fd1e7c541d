"""onnxruntime's memory pattern: the one block its runs after the first take from the arena.

The block is not the live peak. Measured with a same-as-requested arena (bench/planner.py's
ViT-B/16 at batch 8, EXTENDED): 172 MiB for the dynamo export, 65 MiB for the legacy one, whose
live tensors both peak at about 45 MiB. Two of onnxruntime's planners make it:

- the allocation planner gives a value the buffer of a dead value of the same shape (an
  element-wise op first tries its input's), and that buffer keeps its place until the last
  value sharing it dies. It must prove the shapes equal: the dynamo exporter writes every
  intermediate in the one symbolic `batch`, so buffers pass from layer to layer; the legacy
  exporter's shape inference leaves a new `unk__N` per layer, and little is shared;
- the pattern planner (MemPatternPlanner), fed the first run's allocations and frees, puts
  each new buffer in the best-fitting gap between live ones, else above the highest live
  one; long-lived shared buffers split the gaps, and the block grows.
"""
from __future__ import annotations

from .liveness import ALIASES

# Element-wise kernels onnxruntime's CPU provider may run in place (MayInplace in their kernel
# definitions): the output takes an input's buffer when that input dies at the node.
IN_PLACE = {"Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Tanh", "LeakyRelu", "Clip", "Erf", "Gelu",
            "HardSigmoid", "Neg", "Abs", "Sqrt", "Exp", "Log", "Cast"}


def _buffers(nodes, sizes: dict[str, int], shapes: dict[str, tuple], fed: set[str], outputs: set[str]):
    """[(node index a buffer is made at, node index its last reader runs at, bytes)], as
    onnxruntime's allocation planner shares buffers."""
    last_read = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            last_read[name] = i

    def same(a: str, b: str) -> bool:  # onnxruntime shares only between shapes it knows equal
        return sizes.get(a) == sizes.get(b) and shapes.get(a) is not None and shapes.get(a) == shapes.get(b)

    owner: dict[str, str] = {}     # value -> the value whose buffer it uses
    made: dict[str, int] = {}      # buffer -> node index it is made at
    ends: dict[str, int] = {}      # buffer -> last node index any of its values is read at
    free: list[str] = []           # dead buffers, the latest first
    for i, node in enumerate(nodes):
        for out in node.output:
            if not out or out in fed or sizes.get(out) is None:
                continue
            buf = None
            if node.op_type in ALIASES and node.input:
                if node.input[0] not in owner:  # a view of an input or a constant: no buffer
                    continue
                buf = owner[node.input[0]]
            elif node.op_type in IN_PLACE:
                buf = next((owner[x] for x in node.input if x in owner and ends[owner[x]] <= i
                            and owner[x] not in outputs and same(owner[x], out)), None)
            if buf is None:
                buf = next((b for b in free if same(b, out)), None)
                if buf is not None:
                    free.remove(buf)
            if buf is None:
                buf, made[out] = out, i
            owner[out] = buf
            end = len(nodes) if out in outputs else last_read.get(out, i)
            ends[buf] = max(ends.get(buf, i), end)
        for name in {*node.input, *node.output}:
            buf = owner.get(name)
            if buf is not None and ends[buf] == i and buf not in free:
                free.insert(0, buf)
    return [(made[b], ends[b], sizes[b]) for b in made]


def pattern_bytes(nodes, sizes: dict[str, int], shapes: dict[str, tuple], fed: set[str],
                  outputs: set[str]) -> int:
    """The memory pattern's block: MemPatternPlanner's layout of the buffers `_buffers` finds.
    `nodes` as liveness.engine_graph gives them; `shapes`: each value's shape with its symbolic
    dims; `fed`: graph inputs and constants (not in the arena)."""
    events: dict[int, list] = {}
    for k, (start, end, size) in enumerate(_buffers(nodes, sizes, shapes, fed, outputs)):
        events.setdefault(start, []).append((0, k, size))  # made while its node runs
        events.setdefault(end, []).append((1, k, size))    # freed after its last reader
    live: list[tuple[int, int, int]] = []  # (offset, size, buffer), by offset
    top = 0
    for i in sorted(events):
        for kind, k, size in sorted(events[i], key=lambda e: e[0]):
            if kind == 1:
                live = [b for b in live if b[2] != k]
                continue
            size = -(-size // 64) * 64
            current, best, waste = 0, None, None
            for offset, length, _ in [*live, (top, 0, None)]:  # the best-fitting gap, the top's too
                gap = offset - current
                if gap >= size and (waste is None or gap - size < waste):
                    best, waste = current, gap - size
                current = max(current, offset + length)
            best = current if best is None else best
            top = max(top, best + size)
            live.append((best, size, k))
            live.sort()
    return top


def symbolic_shapes(model) -> dict[str, tuple | None]:
    """Each value's shape as ONNX's shape inference gives it at a symbolic batch (None where
    a dim is unknown): what onnxruntime compares before it shares a buffer."""
    import onnx
    g = onnx.shape_inference.infer_shapes(model).graph
    shapes = {}
    for v in [*g.input, *g.value_info, *g.output]:
        dims = v.type.tensor_type.shape.dim
        key = tuple(d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else None
                    for d in dims)
        shapes[v.name] = None if None in key or not v.type.tensor_type.HasField("shape") else key
    return shapes
