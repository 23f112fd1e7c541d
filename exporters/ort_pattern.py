"""onnxruntime's CPU arena for a whole model, replayed: the first run takes each buffer from
the BFC arena as it comes, the runs after it one block laid out from the first (the memory
pattern), placed in a region that holds it or a new one.

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


def _events(buffers):
    """(made?, buffer, bytes) in the order onnxruntime meets them: a node's outputs are made
    while it runs, buffers whose last reader it is are freed after it."""
    at: dict[int, list] = {}
    for k, (start, end, size) in enumerate(buffers):
        at.setdefault(start, []).append((True, k, size))
        at.setdefault(end, []).append((False, k, size))
    for i in sorted(at):
        yield from sorted(at[i], key=lambda e: not e[0])


def _pattern(buffers) -> int:
    """MemPatternPlanner's block for `buffers`: each new buffer in the best-fitting gap
    between live ones (the top's free space counting as one), else on top."""
    live: list[tuple[int, int, int]] = []  # (offset, size, buffer), by offset
    top = 0
    for made, k, size in _events(buffers):
        if not made:
            live = [b for b in live if b[2] != k]
            continue
        size = -(-size // 64) * 64
        current, best, waste = 0, None, None
        for offset, length, _ in [*live, (top, 0, None)]:
            gap = offset - current
            if gap >= size and (waste is None or gap - size < waste):
                best, waste = current, gap - size
            current = max(current, offset + length)
        best = current if best is None else best
        top = max(top, best + size)
        live.append((best, size, k))
        live.sort()
    return top


class _BFCArena:
    """onnxruntime's BFCArena with its defaults: regions of 1, 2, 4, ... MiB (a request larger
    than the next region doubles it until it fits, and the one after is no larger); the
    smallest free chunk that holds a request, split only when at least twice its size;
    neighbours coalesced on free. It counts the pages its chunks have touched."""
    def __init__(self, first: int = 1 << 20):
        self.next, self.regions = first, []  # region: [[offset, size, used], ...]
        self.touched: list[set[int]] = []

    def alloc(self, size: int) -> tuple[int, int]:
        size = -(-size // 256) * 256
        fits = [(c[1], r, i) for r, chunks in enumerate(self.regions) for i, c in enumerate(chunks)
                if not c[2] and c[1] >= size]
        if fits:
            _, r, i = min(fits)
        else:
            grew = size > self.next
            while size > self.next:
                self.next *= 2
            self.regions.append([[0, self.next, False]])
            self.touched.append(set())
            r, i = len(self.regions) - 1, 0
            self.next *= 1 if grew else 2
        chunks = self.regions[r]
        offset, length, _ = chunks[i]
        if length >= 2 * size:
            chunks[i:i + 1] = [[offset, size, True], [offset + size, length - size, False]]
        else:
            chunks[i][2] = True
        self.touched[r].update(range(offset >> 12, (offset + size + 4095) >> 12))
        return r, offset

    def free(self, handle: tuple[int, int]) -> None:
        r, offset = handle
        chunks = self.regions[r]
        i = next(i for i, c in enumerate(chunks) if c[0] == offset)
        chunks[i][2] = False
        for j in (i, i - 1):  # merge with the free chunk after, then before
            if 0 <= j < len(chunks) - 1 and not chunks[j][2] and not chunks[j + 1][2]:
                chunks[j][1] += chunks[j + 1][1]
                del chunks[j + 1]

    @property
    def resident(self) -> int:
        return 4096 * sum(len(pages) for pages in self.touched)


def arena_bytes(nodes, sizes: dict[str, int], shapes: dict[str, tuple], fed: set[str],
                outputs: set[str]) -> tuple[int, int]:
    """(the memory pattern's block, the arena's resident bytes after the runs). The first run
    takes each buffer from the arena as it comes; the later runs take the pattern's block.
    `nodes` as liveness.engine_graph gives them; `shapes`: each value's shape with its symbolic
    dims (symbolic_shapes); `fed`: graph inputs and constants (not in the arena)."""
    buffers = _buffers(nodes, sizes, shapes, fed, outputs)
    arena, held = _BFCArena(), {}
    for made, k, size in _events(buffers):
        if made:
            held[k] = arena.alloc(size)
        else:
            arena.free(held.pop(k))
    for handle in held.values():  # the graph's outputs, given back with the results
        arena.free(handle)
    block = _pattern(buffers)
    if block:
        arena.alloc(block)
    return block, arena.resident


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
