"""Element-wise nodes of emx-onnx-cgen's C fused into one loop.

The traced optimizer is a chain of ~20 element-wise nodes over the unit's parameters (AdamW:
m, v, bias corrections, sqrt, the decayed weights), each its own loop over the whole vector:
the state streams through memory ~20 times per step, which at batch 1 is nearly all of a
block step's time. Here each run of consecutive calls whose node is one element-wise loop
(`out[i0] = f(a[i0], s[0], ...)`, 1-D, the same length, or a scalar) becomes one loop:
values used only inside the run stay in registers, the scalars are computed once before it,
and only what is read later (or is a graph output) is stored. A node alone is rewritten the
same way: each element is loaded once, before any select uses it, and bools move as bytes,
so gcc vectorizes a ReLU mask's LessOrEqual and Where (as emitted, a branch per element).

Safe with edgeprop's planned scratch (targets/c99.py plan_arena): in the original order a
temporary's bytes may be reused by one born after it dies, and a fused loop writes element i
of an output while later elements of earlier inputs are still to be read. So a run is fused
only if no array it stores overlaps an array it reads, other than the same bytes read and
written at the same index (an in-place node).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

CSIZE = {"float": 4, "double": 8, "bool": 1, "_Bool": 1, "int64_t": 8, "int32_t": 4, "uint8_t": 1}
# A node function that is one loop nest writing its output element by element.
_FN = re.compile(r"^EMX_NODE_FN void (node\d+_\w+)\((.*?)\) \{\n"
                 r"((?: +for \(idx_t i\d+ = 0; i\d+ < \d+; \+\+i\d+\) \{\n)+)"
                 r" +(\w+)((?:\[i\d+\])+) = ([^\n]*);\n(?: +\}\n)+\}$", re.M)
_LOOP = re.compile(r"for \(idx_t (i\d+) = 0; \1 < (\d+);")
_ANY_FN = re.compile(r"^EMX_NODE_FN void (node\d+_\w+)\((.*?)\) \{$", re.M)
_PARAM = re.compile(r"^(?:const )?(\w+) (\w+)((?:\[\d+\])+)$")
_CALL = re.compile(r"^    (node\d+_\w+)\((.*)\);$")
_VIEW = re.compile(r"^    \w+ \(?\*(\w+)\)?(?:\[\d+\])* = .*\(edgeprop_scratch \+ (\d+)\);$")


@dataclass
class Node:
    n: int              # elements (1: a scalar node)
    ctype: str          # the output's C type
    params: list[str]   # parameter names, the output last
    types: list[str]    # their C types
    expr: str           # the output element, in terms of params[k][i0] (flat) / params[k][0] (a scalar)


def _signatures(text: str) -> dict[str, list[tuple[str, str, int]]]:
    """Every node function's parameters: [(ctype, name, elements)]."""
    out = {}
    for m in _ANY_FN.finditer(text):
        params = []
        for part in m.group(2).split(", "):
            p = _PARAM.match(part.strip())
            if not p:
                params = None
                break
            size = 1
            for d in re.findall(r"\[(\d+)\]", p.group(3)):
                size *= int(d)
            params.append((p.group(1), p.group(2), size))
        if params:
            out[m.group(1)] = params
    return out


def _elementwise(text: str, signatures) -> dict[str, Node]:
    """Node functions whose loop nest reads each input at the output's own index (or reads a
    one-element input): their element expression, rewritten over flat indices."""
    nodes = {}
    for m in _FN.finditer(text):
        params = signatures.get(m.group(1))
        loops = _LOOP.findall(m.group(3))
        index = "".join(f"[{i}]" for i, _ in loops)
        n = 1
        for _, d in loops:
            n *= int(d)
        if not params or params[-1][1] != m.group(4) or m.group(5) != index or params[-1][2] != n \
                or params[-1][0] not in CSIZE or [i for i, _ in loops] != [f"i{k}" for k in range(len(loops))]:
            continue
        expr = m.group(6)
        for _, name, size in params[:-1]:
            full = re.escape(name + index)
            expr = re.sub(rf"\b{full}(?!\[)", f"{name}[i0]", expr) if size == n else expr
            expr = re.sub(rf"\b{re.escape(name)}(?:\[0\])+(?!\[)", f"{name}[0]", expr) if size == 1 else expr
        if n == 1:  # a scalar node's loop runs once: its i-indices are 0
            expr = re.sub(r"\[i0\]", "[0]", expr)
        names = [p[1] for p in params[:-1]]
        refs = re.findall(rf"\b({'|'.join(map(re.escape, names))})\b((?:\[[^\]]*\])*)", expr) if names else []
        if any(ref not in ("[i0]", "[0]") or (ref == "[i0]" and n == 1) for _, ref in refs):
            continue  # reads an input some other way (broadcast along one axis, ...)
        nodes[m.group(1)] = Node(n, params[-1][0], [p[1] for p in params], [p[0] for p in params], expr)
    return nodes


def fuse_elementwise(text: str, fn: str) -> tuple[str, int]:
    """`text` with the runs of element-wise calls in function `fn` fused; returns the new text
    and how many calls went into fused loops."""
    head = re.search(rf"^void {fn}\(.*\) \{{$", text, re.M)
    if not head:
        return text, 0
    start = head.end() + 1
    end = text.index("\n}\n", start)
    signatures = _signatures(text)
    nodes = _elementwise(text, signatures)
    lines = text[start:end].split("\n")
    offsets = {m.group(1): int(m.group(2)) for m in map(_VIEW.match, lines) if m}
    calls = [(i, m.group(1), [a.strip() for a in m.group(2).split(",")]) for i, m in enumerate(map(_CALL.match, lines))
             if m]
    sizes = {}  # argument -> bytes, from the parameter it is passed as
    for _, name, args in calls:
        for (ctype, _, size), a in zip(signatures.get(name, ()), args):
            sizes[a] = size * CSIZE.get(ctype, 8)
    fused_calls, out_lines, at = 0, [], 0
    runs = _runs(calls, nodes)
    for run in runs:
        code = _fuse(run, calls, nodes, offsets, sizes)
        if code is None:
            continue
        first, last = run[0][0], run[-1][0]
        out_lines += lines[at:first] + code
        at = last + 1
        fused_calls += len(run)
    out_lines += lines[at:]
    return text[:start] + "\n".join(out_lines) + text[end:], fused_calls


def _runs(calls, nodes):
    """Maximal runs of consecutive element-wise calls over one length (scalars joining any),
    with at least one vector call (a node alone gains its scalars hoisted and a flat loop)."""
    runs, cur, n = [], [], None
    for call in calls + [(None, None, None)]:
        node = nodes.get(call[1])
        if node is not None and (node.n == 1 or n is None or node.n == n):
            cur.append(call)
            n = n if node.n == 1 else node.n
            continue
        if any(nodes[c[1]].n > 1 for c in cur):
            runs.append(cur)
        cur, n = ([call], None if nodes[call[1]].n == 1 else nodes[call[1]].n) if node is not None else ([], None)
    return runs


def _memory(ctype: str) -> str:
    """How a loop reads and writes an element: a bool (0 or 1) as a byte, which gcc vectorizes
    (it vectorizes no _Bool load or store, so a ReLU mask's Where would stay a branch)."""
    return "unsigned char" if ctype in ("bool", "_Bool") else ctype


def _fuse(run, calls, nodes, offsets, sizes) -> list[str] | None:
    made = {args[-1] for _, _, args in run}
    later = {a for i, _, args in calls if i > run[-1][0] for a in args}
    n = next(nodes[name].n for _, name, _ in run if nodes[name].n > 1)
    # What the run stores: outputs read after it, and graph outputs (not scratch temporaries).
    stored = [a for a in made if a in later or a not in offsets]
    read = {a for _, _, args in run for a in args[:-1] if a not in made}
    for s in stored:
        if s not in offsets:
            continue
        lo, hi = offsets[s], offsets[s] + sizes[s]
        for r in read | (set(stored) - {s}):
            if r in offsets and offsets[r] < hi and lo < offsets[r] + sizes[r] and \
                    not (offsets[r] == lo and sizes[r] == sizes[s]):
                return None  # bytes it writes are still to be read at other indices
    local = {}     # produced value -> C local
    loads = {}     # a one-element array read in the loop -> the local it is loaded into, once
    element = {}   # an array read at i0 -> the local that holds its element
    pre, body = [], []
    for k, (_, name, args) in enumerate(run):
        node = nodes[name]
        expr = node.expr
        for param, ctype, arg in zip(node.params[:-1], node.types[:-1], args[:-1]):
            def value(m, arg=arg, ctype=ctype, scalar=node.n == 1):
                if arg in local:
                    return local[arg]
                if scalar:
                    return f"((const {ctype} *)({arg}))[0]"
                if m.group(1) == "0":
                    if arg not in loads:
                        loads[arg] = f"ep_s{len(loads)}"
                        pre.insert(0, f"    const {ctype} {loads[arg]} = ((const {ctype} *)({arg}))[0];")
                    return loads[arg]
                if arg not in element:  # loaded unconditionally, once: a select (Where) then vectorizes
                    element[arg] = f"ep_a{len(element)}"
                    kind = _memory(ctype)
                    body.append(f"        const {kind} {element[arg]} = ((const {kind} *)({arg}))[i0];")
                return element[arg]
            expr = re.sub(rf"\b{param}\[(i0|0)\]", value, expr)
        var = f"ep_v{k}"
        local[args[-1]] = var
        line = f"const {node.ctype} {var} = {expr};"
        store = f"(({_memory(node.ctype)} *)({args[-1]}))"
        if node.n == 1:
            pre.append(f"    {line}")
            if args[-1] in stored:
                pre.append(f"    {store}[0] = {var};")
        else:
            body.append(f"        {line}")
            if args[-1] in stored:
                body.append(f"        {store}[i0] = {var};")
    return ["    {  /* fused by edgeprop (targets/fuse.py): " + ", ".join(name for _, name, _ in run) + " */",
            *pre, "#pragma GCC ivdep", f"    for (idx_t i0 = 0; i0 < {n}; ++i0) {{", *body, "    }", "    }"]

