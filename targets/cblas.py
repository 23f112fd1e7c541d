"""Matrix products of emx-onnx-cgen's C through OpenBLAS.

emx-onnx-cgen writes every MatMul and Gemm as a triple loop, which is what a microcontroller
wants and a tenth of what a desktop or Pi core does with a packed, vectorised kernel. For a
host build each 2-D float MatMul/Gemm node function keeps its signature and gets a body
that calls cblas_sgemm (transposes, alpha, beta and a broadcast C included); any other
product (batched, integer) stays a loop.

Where the BLAS comes from, first found wins: the `scipy-openblas32` wheel (the OpenBLAS that
numpy and scipy ship, with its headers; symbols prefixed `scipy_`), then the system's OpenBLAS
(`pkg-config openblas`: Debian/Raspberry Pi OS/Jetson's libopenblas-dev).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Blas:
    name: str                   # what it is, for messages and the build cache
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...]
    prefix: str                 # symbol prefix: "scipy_" for the wheel, "" for a system OpenBLAS


INSTALL_HINT = "pip install scipy-openblas32 (or apt install libopenblas-dev)"


def find_blas() -> Blas | None:
    """The OpenBLAS this host can build against, or None (the generated loops are used)."""
    try:
        import scipy_openblas32 as wheel
        lib = wheel.get_lib_dir()
        return Blas(f"scipy-openblas32 {getattr(wheel, '__version__', '')}".strip(), (f"-I{wheel.get_include_dir()}",),
                    (f"-L{lib}", f"-l{wheel.get_library()}", f"-Wl,-rpath,{lib}"), "scipy_")
    except ImportError:
        pass
    if shutil.which("pkg-config"):
        flags = [subprocess.run(["pkg-config", opt, "openblas"], capture_output=True, text=True)
                 for opt in ("--cflags", "--libs", "--modversion")]
        if all(f.returncode == 0 for f in flags):
            return Blas(f"openblas {flags[2].stdout.strip()}", tuple(flags[0].stdout.split()),
                        tuple(flags[1].stdout.split()), "")
    return None


_NODE = re.compile(r"/\*\n \* Node (\d+):\n \* OpType: (MatMul|Gemm)\n(.*?)\*/\n"
                   r"(EMX_NODE_FN void \w+\((.*?)\) \{\n)(.*?)\n\}\n", re.S)
_PARAM = re.compile(r"^(const )?float (\w+)((?:\[\d+\])+)$")


def _params(signature: str):
    """[(name, dims)] of a node function's parameters, or None if one is not a float array."""
    found = []
    for part in signature.split(", "):
        m = _PARAM.match(part.strip())
        if not m:
            return None
        found.append((m.group(2), tuple(int(d) for d in re.findall(r"\[(\d+)\]", m.group(3)))))
    return found


def _sgemm_body(op: str, attrs: dict, params, prefix: str) -> str | None:
    """The C body computing the node with one cblas_sgemm, or None where it is not a plain
    2-D float product."""
    if any(len(dims) > 2 for _, dims in params):
        return None
    ta, tb = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    (a, ad), (b, bd), (out, od) = params[0], params[1], params[-1]
    if len(ad) != 2 or len(bd) != 2 or len(od) != 2:
        return None
    m, k = (ad[1], ad[0]) if ta else ad
    n = bd[0] if tb else bd[1]
    if (bd[1] if tb else bd[0]) != k or od != (m, n):
        return None
    lines = []
    beta_blas = 0.0
    if op == "Gemm" and len(params) == 4 and beta != 0.0:
        c, cd = params[2]
        if len(cd) == 1 and cd[0] in (1, n):
            elem = "[j]" if cd[0] == n and n != 1 else "[0]"
        elif len(cd) == 2 and cd[0] in (1, m) and cd[1] in (1, n):
            elem = f"[{'i' if cd[0] == m and m != 1 else '0'}][{'j' if cd[1] == n and n != 1 else '0'}]"
        else:
            return None
        lines += [f"    for (int i = 0; i < {m}; ++i)",
                  f"        for (int j = 0; j < {n}; ++j) {out}[i][j] = {beta!r}f * {c}{elem};"]
        beta_blas = 1.0
    elif op == "Gemm" and len(params) != 3 and len(params) != 4:
        return None
    trans = ("CblasNoTrans", "CblasTrans")
    lines.append(f"    {prefix}cblas_sgemm(CblasRowMajor, {trans[ta]}, {trans[tb]}, {m}, {n}, {k}, {alpha!r}f, "
                 f"&{a}[0][0], {ad[1]}, &{b}[0][0], {bd[1]}, {beta_blas!r}f, &{out}[0][0], {n});")
    return "\n".join(lines)


def use_blas(text: str, prefix: str, guard: str | None = None) -> tuple[str, int]:
    """`text` (emx-onnx-cgen's C) with every plain 2-D float MatMul/Gemm computed by
    cblas_sgemm; returns the new text and how many nodes were rewritten. `guard`: a macro
    name; the BLAS bodies are used only where it is defined, the generated loops otherwise
    (a device folder whose compiler may find no BLAS)."""
    count = 0

    def rewrite(m: re.Match) -> str:
        nonlocal count
        params = _params(m.group(5))
        attrs = dict(re.findall(r"\*   (\w+): (\S+)", m.group(3)))
        body = _sgemm_body(m.group(2), attrs, params, prefix) if params else None
        if body is None:
            return m.group(0)
        count += 1
        if guard:
            body = f"#ifdef {guard}\n{body}\n#else\n{m.group(6)}\n#endif"
        return m.group(0)[:m.start(4) - m.start(0)] + m.group(4) + body + "\n}\n"

    text = _NODE.sub(rewrite, text)
    if count:
        include = "#include <cblas.h>\n"
        text = (f"#ifdef {guard}\n{include}#endif\n" if guard else include) + text
    return text, count


def _perm(node) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def fold_transposes(model) -> int:
    """Rewrite an onnx.ModelProto in place so that BLAS does the traced graph's 2-D transposes:
    the exporter writes W^T, x^T and dL/dW^T as Transpose nodes (a quarter of a block step's
    time when generated as loops), but a product takes either operand transposed for free.
    A transpose of a transpose is its input; a MatMul or Gemm reading a transpose reads its
    input with transA/transB toggled (a 2-D MatMul becomes a Gemm without C). Transposes
    left unread are removed by the caller's dead-node pass. Returns how many reads moved."""
    import onnx
    from onnx import helper, shape_inference
    graph = model.graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in (*shape_inference.infer_shapes(model).graph.value_info, *graph.input, *graph.output,)}
    ranks.update({t.name: len(t.dims) for t in graph.initializer})
    swaps = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Transpose" and _perm(n) == [1, 0]}
    outputs = {o.name for o in graph.output}
    moved = 0
    for node in graph.node:
        if node.op_type == "Transpose" and _perm(node) == [1, 0] and node.input[0] in swaps \
                and node.output[0] not in outputs:
            # T(T(a)) = a: readers of this node read a instead
            source = swaps[node.input[0]]
            for reader in graph.node:
                for i, name in enumerate(reader.input):
                    if name == node.output[0]:
                        reader.input[i] = source
                        moved += 1
            swaps.pop(node.output[0], None)
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or any(ranks.get(x) != 2 for x in node.input[:2]):
            continue
        if not any(x in swaps for x in node.input[:2]):
            continue
        if node.op_type == "MatMul":
            node.op_type = "Gemm"
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        for i, flag in ((0, "transA"), (1, "transB")):
            if node.input[i] in swaps:
                node.input[i] = swaps[node.input[i]]
                attrs[flag] = 1 - int(attrs.get(flag, 0))
                moved += 1
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(k, v) for k, v in sorted(attrs.items()))
    onnx.checker.check_model(model)
    return moved
