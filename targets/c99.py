"""The c99 target: a bundle and a data subset -> a firmware folder that trains NoProp-DT on a
microcontroller, block by block, with no malloc.

    fw/
      graphs/*.c       every step and inference graph, compiled by emx-onnx-cgen, their
                       temporaries moved from the stack into one static scratch area planned
                       by liveness (emitted with --large-temp-threshold 0: nothing on the heap)
      model.h/.c       the bundle: sizes, each unit's graphs, coefficients and learning rate,
                       the label embedding, the data subset (flash, const) and every unit's
                       weights and optimizer state (flash, written back after its block trains)
      driver.c ...     c99/ (beside this module): the block-sequential schedule, the generator,
                       start-up code
      link.ld          FLASH and RAM lengths from the device profile
      Makefile         `make` (arm-none-eabi-gcc), `make run` (qemu-system-arm, mps2-an500),
                       `make host` / `make run-host` (the same driver built natively)
      data.npz         the subset, for `edgeprop train BUNDLE --data fw/data.npz` on a host
      layout.json      where each unit's state lies in weights.bin, which a run writes back

The driver feeds each step exactly what edgeprop's numpy trainer feeds it in block-sequential
order from the same seed (edgeprop.prng's draws, the same rounding of z, the same padding of
the last batch), so the weights agree with a host run to float tolerance.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeprop.bundle import Bundle
from edgeprop.bundle import load as load_bundle
from edgeprop.datasets import load as load_data
from edgeprop.device_profile import Profile
from edgeprop.errors import EdgepropError
from edgeprop.schedule import check_temperature
from edgeprop.storage import check_output, new_folder

FIRMWARE = Path(__file__).resolve().parent / "c99"  # the C sources: the source tree's, or the installed package's
SOURCES = ("edgeprop_fw.h", "prng.h", "driver.c", "startup.c", "semihost.c", "host.c")
CTYPES = {"float": 4, "double": 8, "bool": 1, "_Bool": 1, "int64_t": 8, "int32_t": 4, "int16_t": 2, "int8_t": 1,
          "uint64_t": 8, "uint32_t": 4, "uint16_t": 2, "uint8_t": 1}
ALIGN = 8
# Nodes whose generated loop reads input[i] only to write output[i] (Reshape and its kin copy
# in flat order): they may run in place.
IN_PLACE = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Relu", "Neg", "Exp", "Log", "Abs", "Clip", "Where",
            "Reshape", "Squeeze", "Unsqueeze", "Identity", "Sigmoid", "Tanh"}
FLAT_COPY = {"Reshape", "Squeeze", "Unsqueeze", "Identity"}  # output and input may differ in shape
STACK_BYTES = 8 * 1024  # the driver's locals and libm; the graphs' temporaries live in the arena
# Graph inputs and outputs -> the driver's buffers (edgeprop_fw.h's enum); "next.K" is written over K.
BUFFERS = {"param": "EP_STATE0", "opt.m": "EP_STATE0 + 1", "opt.v": "EP_STATE0 + 2", "x": "EP_X", "z": "EP_Z",
           "target": "EP_TARGET", "mask": "EP_MASK", "loss_scale": "EP_LOSS_SCALE", "lr": "EP_LR",
           "step": "EP_STEP", "loss": "EP_LOSS", "u_hat": "EP_OUT", "logits": "EP_OUT"}


def require_cgen():
    try:
        import emx_onnx_cgen  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise EdgepropError(f"the c99 target compiles graphs with emx-onnx-cgen: pip install 'edgeprop[mcu]' ({e})") \
            from None


# -- graphs -> C, temporaries -> a planned arena -----------------------------------------------

@dataclass
class Arg:
    name: str    # the C identifier ("next_param")
    ctype: str
    dims: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return CTYPES[self.ctype] * int(np.prod(self.dims))


@dataclass
class GraphC:
    key: str                 # the bundle's graph key ("block_step")
    file: str                # graphs/block_step.c
    inputs: list[str]        # ONNX names, in the C function's order
    outputs: list[str]
    scratch: int             # bytes of the planned scratch area
    temps: int               # temporaries in it
    unplanned: int           # bytes the temporaries take with one buffer each (emx-onnx-cgen's own)
    offsets: dict[str, int] = field(default_factory=dict)
    in_place: bool = True    # every output next.K may be written over input K


def c_name(onnx_name: str) -> str:
    return re.sub(r"\W", "_", onnx_name)


def _optimised(src: Path, dst: Path, rewrite=None) -> None:
    """Fold the traced graph's constant shape arithmetic, which emx-onnx-cgen rejects in part
    (e.g. an Expand to the empty shape of a scalar). Only constant folding: onnxscript's full
    optimize() also rewrites AdamW's `+ 1e-8` away as an addition of zero (then 0/0 = NaN for
    every parameter whose gradient is still zero)."""
    import onnx
    from onnxscript import optimizer
    model = onnx.load(str(src))
    optimizer.fold_constants(model)  # in place
    if rewrite is not None:  # a host build's own graph rewrites (edgeprop.targets.cblas)
        rewrite(model)
    optimizer.remove_unused_nodes(model)
    onnx.save(model, str(dst))


_COMPILED: dict[str, tuple[str, GraphC]] = {}  # graph file sha256 -> generated C: a process compiles a graph once


def emit_c(src: Path, c_file: Path, fn: str, rewrite=None) -> None:
    """One ONNX graph -> C with emx-onnx-cgen, as the driver (and the native engine) call it;
    `rewrite(model)` changes the folded graph in place first. An op it cannot compile is
    named in the error."""
    folded = c_file.with_name(f".{c_file.stem}.onnx")
    _optimised(src, folded, rewrite)
    try:
        proc = subprocess.run([sys.executable, "-m", "emx_onnx_cgen", "compile", str(folded), str(c_file),
                               "--model-name", fn,
                               "--large-temp-threshold", "0",   # temporaries never on the heap
                               "--large-weight-threshold", "0",  # constants inline, not in a file
                               "--no-restrict-arrays",           # the driver aliases next.K with K
                               "--color", "never"], capture_output=True, text=True)
    finally:
        folded.unlink(missing_ok=True)
    if proc.returncode != 0:
        text = proc.stdout + proc.stderr
        op = re.search(r"Unsupported op (?:ai\.onnx\.)?([\w.]+)|op_type=(\w+)", text)
        if op:
            reason = re.search(r"Result: (.*?)(?: \(while lowering|$)", text, re.M)
            raise EdgepropError(f"graph {src.name}: emx-onnx-cgen cannot compile op {op.group(1) or op.group(2)}"
                                + (f" ({reason.group(1)})" if reason and "Unsupported op" not in reason.group(1)
                                   else ""))
        lines = text.strip().splitlines()
        raise EdgepropError(f"emx-onnx-cgen could not compile graph {src.name}: {' '.join(lines[-2:])}")


def compile_graphs(bundle: Bundle, keys: list[str], out: Path) -> dict[str, GraphC]:
    """bundle graphs -> out/graphs/<key>.c, each with its temporaries in `edgeprop_scratch`.
    emx-onnx-cgen runs once per graph, side by side."""
    graphs = out / "graphs"
    graphs.mkdir(parents=True, exist_ok=True)
    digest = {key: bundle.manifest["files"][bundle.graphs[key].file] for key in keys}
    todo = [key for key in keys if digest[key] not in _COMPILED]

    def emit(key):
        emit_c(bundle.graph_path(key), graphs / f"{key}.c", f"ep_{key}")

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(emit, todo))
    for key in todo:
        graph = bundle.graphs[key]
        _COMPILED[digest[key]] = plan_arena((graphs / f"{key}.c").read_text(), f"ep_{key}", key,
                                            [t.name for t in graph.inputs], [t.name for t in graph.outputs])
    for key in keys:
        (graphs / f"{key}.c").write_text(_COMPILED[digest[key]][0])
    return {key: _COMPILED[digest[key]][1] for key in keys}


_DECL = re.compile(r"^    (\w+) (tmp\d+_\w+)((?:\[\d+\])+);$")
_CALL = re.compile(r"^    (node\d+_\w+)\((.*)\);$")
_ARG = re.compile(r"^(?:const )?(\w+) (\w+)((?:\[\d+\])+)$")


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in re.findall(r"\[(\d+)\]", text))


def c_name_out(name: str, outputs: list[str]) -> bool:
    return name in {c_name(o) for o in outputs}


def _sink(calls, temps, inputs: list[str], outputs: list[str]):
    """Move each node that only makes temporaries down to just before its first consumer, so
    that what it makes is not alive (and holding scratch bytes) any longer than needed. The
    exporter's order computes e.g. AdamW's decayed weights long before the last node uses
    them. A node reading a state input K stays before the node that writes next.K."""
    calls = list(calls)
    state = {c_name(o[5:]): c_name(o) for o in outputs if o.startswith("next.") and o[5:] in inputs}
    for fn_name, _ in reversed(list(calls)):
        i = next(j for j, c in enumerate(calls) if c[0] == fn_name)
        used = calls[i][1]
        made = [a for a in used if a in temps and not any(a in c[1] for c in calls[:i])]
        if not made or any(a not in temps and c_name_out(a, outputs) for a in used):
            continue  # makes no temporary, or touches a graph output: stays where it is
        later = [j for j in range(i + 1, len(calls)) if any(a in calls[j][1] for a in made)]
        if not later:
            continue
        target = later[0]
        writes = [j for j in range(len(calls)) for k, nk in state.items() if k in used and nk in calls[j][1]]
        if writes and target > min(writes):
            continue
        if target > i + 1:
            calls.insert(target - 1, calls.pop(i))
    return calls


def plan_arena(text: str, fn: str, key: str, inputs: list[str], outputs: list[str],
               in_place: bool = True) -> tuple[str, GraphC]:
    """Rewrite emx-onnx-cgen's model function: each temporary (a local array of its own, on the
    stack with --large-temp-threshold 0) becomes a view into the shared `edgeprop_scratch`, at
    an offset planned by liveness over the node calls, so temporaries that are never alive at
    once share bytes. Also checks that every output "next.K" can be written over input K
    (K's last read comes before next.K's first write), which lets a block step in place, and
    makes the constants static (several graphs are linked into one program). `in_place=False`:
    a graph that cannot step in place is not an error; GraphC.in_place says which it is."""
    head = re.search(rf"^void {fn}\((.*)\) \{{$", text, re.M)
    if not head:
        raise EdgepropError(f"graph {key}: emx-onnx-cgen's output has no function {fn}")
    args = []
    for part in head.group(1).split(", "):
        m = _ARG.match(part.strip())
        if not m:
            raise EdgepropError(f"graph {key}: unexpected parameter '{part}' in the generated C")
        args.append(Arg(m.group(2), m.group(1), _dims(m.group(3))))
    names = [c_name(n) for n in inputs + outputs]
    if [a.name for a in args] != names:
        raise EdgepropError(f"graph {key}: the generated C takes {[a.name for a in args]}, the manifest says {names}")
    body_start = head.end() + 1
    body_end = text.index("\n}\n", body_start)
    temps: dict[str, Arg] = {}
    calls: list[tuple[str, list[str]]] = []  # (node function, its arguments), in order
    for line in text[body_start:body_end].splitlines():
        if m := _DECL.match(line):
            if m.group(1) not in CTYPES:
                raise EdgepropError(f"graph {key}: temporary of unknown type {m.group(1)}")
            temps[m.group(2)] = Arg(m.group(2), m.group(1), _dims(m.group(3)))
        elif m := _CALL.match(line):
            calls.append((m.group(1), [a.strip() for a in m.group(2).split(",")]))
        elif line.strip():
            raise EdgepropError(f"graph {key}: unexpected line in the generated model function: {line.strip()}")
    calls = _sink(calls, temps, inputs, outputs)
    # Liveness: [first call, last call] that names each temporary or argument.
    first, last = {}, {}
    for i, (_, used) in enumerate(calls):
        for name in used:
            first.setdefault(name, i)
            last[name] = i
    unused = [t for t in temps if t not in first]
    if unused:
        raise EdgepropError(f"graph {key}: temporaries {unused} are never used")
    ops = {f"node{n}": op for n, op in re.findall(r"\* Node (\d+):\n \* OpType: (\w+)", text)}
    steps_in_place = True
    for out in outputs:
        if out.startswith("next.") and out[5:] in inputs:
            src, dst = c_name(out[5:]), c_name(out)
            if src not in last or dst not in first or last[src] < first[dst]:
                continue
            if last[src] == first[dst] and ops.get(calls[last[src]][0].split("_")[0]) in IN_PLACE:
                continue  # one element-wise node reads K[i] and then writes next.K[i] (SGD's last Sub)
            if in_place:
                raise EdgepropError(f"graph {key}: '{out}' is written (node {first[dst]}) before '{out[5:]}' is last "
                                    f"read (node {last[src]}); it cannot step in place")
            steps_in_place = False
    # An element-wise node may write its output over an input of the same shape that dies at
    # that node (output[i] depends on input[i] alone): the two share one buffer.
    group = {t: t for t in temps}  # temporary -> the one whose buffer it uses
    for i, (fn_name, used) in enumerate(calls):
        op = ops.get(fn_name.split("_")[0])
        out = used[-1]
        if op not in IN_PLACE or out not in temps or first[out] != i:
            continue
        for a in used[:-1]:
            shape = (lambda t: (t.ctype, t.nbytes)) if op in FLAT_COPY else (lambda t: (t.ctype, t.dims))
            if a in temps and last[a] == i and shape(temps[a]) == shape(temps[out]):
                group[out] = group[a]
                break
    members: dict[str, list[str]] = {}
    for t in temps:
        members.setdefault(group[t], []).append(t)
    span = {g: (min(first[t] for t in ts), max(last[t] for t in ts)) for g, ts in members.items()}
    # First fit, largest first: a buffer goes at the lowest offset clear of every placed
    # buffer whose life overlaps its own (a node's inputs and output never share, but above).
    placed: list[tuple[int, int, int, int]] = []  # (offset, end, first, last)
    offsets = {}
    for g in sorted(members, key=lambda g: (-temps[g].nbytes, span[g][0])):
        size = -(-temps[g].nbytes // ALIGN) * ALIGN
        born, dies = span[g]
        offset = 0
        for o, e, f, la in sorted(placed):
            if la < born or f > dies:
                continue  # never alive together
            if offset + size <= o:
                break
            offset = max(offset, e)
        placed.append((offset, offset + size, born, dies))
        for t in members[g]:
            offsets[t] = offset
    scratch = max((e for _, e, _, _ in placed), default=0)

    def view(t: Arg) -> str:
        rows = "".join(f"[{d}]" for d in t.dims[1:])
        ptr = f"{t.ctype} (*{t.name}){rows}" if rows else f"{t.ctype} *{t.name}"
        cast = f"{t.ctype} (*){rows}" if rows else f"{t.ctype} *"
        return f"    {ptr} = ({cast})(void *)(edgeprop_scratch + {offsets[t.name]});"

    body = "\n".join([view(temps[t]) for t in temps]
                     + [f"    {fn_name}({', '.join(used)});" for fn_name, used in calls])
    rest = text[body_end:]
    # The function that the driver calls with an array of buffers, in the manifest's order.
    casts = []
    for i, a in enumerate(args):
        rows = "".join(f"[{d}]" for d in a.dims[1:])
        const = "const " if i < len(inputs) else ""
        casts.append(f"({const}{a.ctype} (*){rows})io[{i}]" if rows else f"({const}{a.ctype} *)io[{i}]")
    wrapper = f"\n\nvoid {fn}_run(void *const *io) {{\n    {fn}({', '.join(casts)});\n}}\n"
    prologue = (f"/* Rewritten by edgeprop (targets/c99.py): temporaries are views into edgeprop_scratch,\n"
                f" * {len(temps)} of them in {scratch} bytes (one buffer each would take "
                f"{sum(t.nbytes for t in temps.values())}). */\n"
                f"extern unsigned char edgeprop_scratch[];\n")
    top = text[:body_start]
    top = re.sub(r"^extern const .*;\n", "", top, flags=re.M)           # constants: static, one per graph
    top = re.sub(r"^const EMX_UNUSED ", "static const EMX_UNUSED ", top, flags=re.M)
    top = re.sub(r"^#include <string.h>\n", "#include <string.h>\n" + prologue, top, count=1, flags=re.M)
    info = GraphC(key, f"graphs/{key}.c", inputs, outputs, scratch, len(temps),
                  sum(t.nbytes for t in temps.values()), offsets, steps_in_place)
    return top + body + rest + wrapper, info


# -- the firmware folder --------------------------------------------------------------------------

# Compiler flags and the qemu-system-arm board for each Cortex-M a profile may name.
CPUS = {
    "cortex-m7": ("-mcpu=cortex-m7 -mthumb -mfpu=fpv5-sp-d16 -mfloat-abi=hard", "mps2-an500"),  # STM32F7: SP FPU
    "cortex-m4": ("-mcpu=cortex-m4 -mthumb -mfpu=fpv4-sp-d16 -mfloat-abi=hard", "mps2-an386"),
}


def hexf(value) -> str:
    """A float exactly, as a C99 hexadecimal literal."""
    return float(value).hex()


def c_array(values, per_line: int = 8) -> str:
    flat = np.asarray(values).reshape(-1)
    fmt = hexf if flat.dtype.kind == "f" else (lambda v: str(int(v)))
    items = [fmt(v) for v in flat]
    rows = ("    " + ", ".join(items[i:i + per_line]) + "," for i in range(0, len(items), per_line))
    return "{\n" + "\n".join(rows) + "\n}"


@dataclass
class Plan:
    """SRAM and flash the firmware needs, as driver.c lays them out."""
    state: int     # the training unit's param and optimizer slots
    batch: int     # one batch's inputs and targets, the epoch's sample order
    eval: int      # evaluation's buffers (share bytes with the two above)
    scratch: int   # the graphs' temporaries, planned by liveness; the largest graph's
    stack: int

    @property
    def arena(self) -> int:
        union = max(self.state + self.batch, self.eval)
        return -(-union // ALIGN) * ALIGN + self.scratch


def _check(bundle: Bundle, device: Profile) -> None:
    if device.kind != "mcu":
        raise EdgepropError(f"--target c99 is for microcontrollers; {device.name} is a {device.kind} device")
    if device.arch not in CPUS:
        raise EdgepropError(f"--target c99 knows no compiler flags for arch '{device.arch}' ({', '.join(CPUS)})")
    check_bundle(bundle, "c99")


def check_bundle(bundle: Bundle, target: str) -> None:
    """What the driver (c99/driver.c) runs: a NoProp-DT bundle whose graphs it feeds."""
    if bundle.rule != "noprop-dt":
        raise EdgepropError(f"--target {target} runs NoProp-DT bundles; this one is {bundle.rule}")
    if bundle.model.get("dropout_shapes"):
        raise EdgepropError(f"--target {target} does not feed dropout masks yet: export the bundle with --dropout 0")
    if bundle.model.get("learned_embedding"):
        raise EdgepropError(f"--target {target} keeps W_embed fixed: export the bundle with --embedding one-hot or "
                            "orthogonal (a learned embedding trains in the head's state)")
    blocks, head = bundle.blocks, bundle.head
    if head is None or bundle.units != [*blocks, head] or [b.t for b in blocks] != list(range(1, len(blocks) + 1)):
        raise EdgepropError(f"--target {target} needs the units in order block1..blockT, then the head")
    slots = {len(u.state) for u in bundle.units}
    if len(slots) != 1 or slots.pop() > 4 or any(u.state[0].name != "param" for u in bundle.units):
        raise EdgepropError(f"--target {target} needs the same param and at most 3 optimizer slots in every unit")
    for key, graph in bundle.graphs.items():
        unknown = [t.name for t in (*graph.inputs, *graph.outputs)
                   if t.name not in BUFFERS and not (t.name.startswith("next.") and t.name[5:] in BUFFERS)]
        if unknown:
            raise EdgepropError(f"--target {target}: graph {key} has inputs the driver does not feed: {unknown}")


def subset(data: str, split: str, n: int | None):
    d = load_data(data, split)
    n = len(d) if n is None else n
    if not 1 <= n <= len(d):
        raise EdgepropError(f"--{split}-samples {n}: the {split} split of {data} has {len(d)} samples")
    return d.x[:n], d.y[:n]


def sample_type(x_train, x_test) -> str:
    """How the driver holds samples: bytes where every one is a whole number in 0..255."""
    integral = x_train.dtype.kind in "ui" and x_train.min() >= 0 and max(x_train.max(), x_test.max()) <= 255
    return "uint8_t" if integral else "float"


def model_sources(bundle: Bundle, graphs: dict[str, GraphC], x_train, y_train, x_test, y_test, epochs: int,
                  seed: int, eval_seed: int, temperature: float,
                  linux: dict | None = None) -> tuple[str, str, dict, Plan]:
    """model.h and model.c: the bundle's numbers and data, the way driver.c reads them.
    `linux`: model.h's extra defines for a Linux build (edgeprop.targets.native), whose data
    and state are files, not arrays in model.c."""
    units, sched = bundle.units, bundle.schedule
    slots = len(units[0].state)
    state, offset, layout = {}, 0, []
    init, _ = bundle.initial_state()
    flat = []
    for u in units:
        layout.append({"name": u.name, "offset": offset, "n_params": u.n_params, "slots": [t.name for t in u.state]})
        flat.extend(init[u.name][t.name] for t in u.state)
        state[u.name] = offset
        offset += slots * u.n_params
    sample = sample_type(x_train, x_test)
    d, n_in, classes, B = int(bundle.model["embed_dim"]), int(np.prod(bundle.input_shape)), bundle.num_classes, \
        bundle.batch_size
    mean, std = bundle.input_norm
    pmax = max(u.n_params for u in units)
    scratch = max(g.scratch for g in graphs.values())
    header = f"""/* The bundle, for driver.c: written by `edgeprop deploy --target c99` (bundle {bundle.id}). */
#ifndef EDGEPROP_MODEL_H
#define EDGEPROP_MODEL_H
#include <stdint.h>
typedef {sample} ep_sample;         /* how the data subset is stored in flash */
#define EP_UNITS {len(units)}
#define EP_SLOTS {slots}            /* param and the optimizer's slots */
#define EP_PMAX {pmax}              /* the largest unit's parameters */
#define EP_STATE_FLOATS {offset}
#define EP_BATCH {B}
#define EP_IN {n_in}
#define EP_DIM {d}                  /* label embedding */
#define EP_CLASSES {classes}
#define EP_NTRAIN {len(y_train)}
#define EP_NTEST {len(y_test)}
#define EP_EPOCHS {epochs}
#define EP_SEED {seed}u
#define EP_EVAL_SEED {eval_seed}u
#define EP_TEMPERATURE {hexf(temperature)}  /* inference temperature tau: 0 the mean chain, 1 sampled */
#define EP_MEAN ((float){hexf(np.float32(mean))})
#define EP_STD ((float){hexf(np.float32(std))})
#define EP_SCRATCH_BYTES {scratch}
""" + "".join(f"#define {k} {v}\n" for k, v in (linux or {"EP_INTERLEAVED": 0}).items()) + "#endif\n"
    lines = ['/* The bundle\'s units, data and initial state: written by `edgeprop deploy --target c99`. */',
             '#include "edgeprop_fw.h"', ""]
    for key, g in graphs.items():
        io = [BUFFERS[n[5:] if n.startswith("next.") else n] for n in g.inputs + g.outputs]
        lines += [f"void ep_{key}_run(void *const *io);",
                  f"static const uint8_t io_{key}[] = {{{', '.join(io)}}};"]
    lines += ["", "const ep_unit ep_units[EP_UNITS] = {"]
    for u in units:
        head = u.role == "head"
        ab = sched.alpha_bar[-1] if head else sched.alpha_bar[u.t - 1]
        a, b, c = (0.0, 0.0, 0.0) if head else sched.coefficients(u.t)
        w = 0.0 if head else sched.weights[u.t - 1]
        step, infer = graphs[u.step_graph], graphs[u.infer_graph]
        lines.append(
            f"    {{\"{u.name}\", {int(head)}, {u.n_params}, ep_state + {state[u.name]}, "
            f"(float){hexf(np.float32(u.lr))}, (float){hexf(np.float32(w))}, "
            f"{hexf(np.sqrt(ab))}, {hexf(np.sqrt(1 - ab))}, "
            f"(float){hexf(np.float32(a))}, (float){hexf(np.float32(b))}, "
            f"{hexf(np.sqrt(c))}, {classes if head else d}, {classes if head else d}, "
            f"{{ep_{u.step_graph}_run, io_{u.step_graph}, {len(step.inputs) + len(step.outputs)}}}, "
            f"{{ep_{u.infer_graph}_run, io_{u.infer_graph}, {len(infer.inputs) + len(infer.outputs)}}}}},")
    lines += ["};", "",
              f"const float ep_embedding[EP_CLASSES][EP_DIM] = {c_array(bundle.embedding.astype(np.float32))};"]
    if linux:  # the data and the state are files (files.c)
        lines += ["float ep_state[EP_STATE_FLOATS];", ""]
    else:
        kind = sample.replace("_t", "")
        lines += [f"static const ep_sample train_x[EP_NTRAIN][EP_IN] = {c_array(x_train.astype(kind))};",
                  f"static const uint8_t train_y[EP_NTRAIN] = {c_array(y_train, 32)};",
                  f"static const ep_sample test_x[EP_NTEST][EP_IN] = {c_array(x_test.astype(kind))};",
                  f"static const uint8_t test_y[EP_NTEST] = {c_array(y_test, 32)};",
                  "const ep_sample (*ep_train_x)[EP_IN] = train_x, (*ep_test_x)[EP_IN] = test_x;",
                  "const uint8_t *ep_train_y = train_y, *ep_test_y = test_y;",
                  "/* In flash, not copied to SRAM at start-up: rewritten by flash_write() as each unit finishes. */",
                  "float ep_state[EP_STATE_FLOATS] __attribute__((section(\".edgeprop_state\"), aligned(8))) = "
                  f"{c_array(np.concatenate(flat).astype(np.float32))};", ""]
    maxdim = max(d, classes)
    plan = Plan(state=4 * slots * pmax, batch=4 * (B * n_in + B * d + B * maxdim + B + 4) + 2 * len(y_train),
                eval=4 * (B * n_in + 2 * B * d + B * maxdim), scratch=scratch, stack=STACK_BYTES)
    return header, "\n".join(lines), {"units": layout, "state_floats": offset}, plan


def write_firmware(bundle_path: str | Path | Bundle, device: Profile, out: str | Path, data: str = "digits",
                   train_samples: int | None = None, test_samples: int | None = None, epochs: int = 1, seed: int = 0,
                   eval_seed: int = 0, temperature: float | None = None, force: bool = False) -> dict:
    """Write the firmware folder for `device` (see the module's docstring); return its plan.
    `temperature`: the inference chain's τ (default: the bundle's); the firmware also reports
    the sampled chain (τ 1) beside it."""
    require_cgen()
    if isinstance(bundle_path, Bundle):
        bundle, bundle_path = bundle_path, bundle_path.root
    else:
        bundle = load_bundle(bundle_path)
    _check(bundle, device)
    temperature = bundle.temperature if temperature is None else check_temperature(temperature)
    if epochs < 1:
        raise EdgepropError("--epochs must be at least 1")
    x_train, y_train = subset(data, "train", train_samples)
    x_test, y_test = subset(data, "test", test_samples)
    if len(y_train) > 65535 or bundle.num_classes > 256:
        raise EdgepropError("--target c99 takes at most 65535 training samples and 256 classes")
    out = Path(out)
    check_output(out, bundle_path, force)
    cpu, board = CPUS[device.arch]
    with new_folder(out, mark=True) as tmp:
        graphs = compile_graphs(bundle, sorted(bundle.graphs), tmp)
        header, source, layout, plan = model_sources(bundle, graphs, x_train, y_train, x_test, y_test, epochs,
                                                      seed, eval_seed, temperature)
        (tmp / "model.h").write_text(header)
        (tmp / "model.c").write_text(source)
        for name in SOURCES:
            shutil.copy(FIRMWARE / name, tmp / name)
        sizes = {"title": device.title, "profile": device.source or device.name, "flash": device.flash,
                 "ram": device.ram, "arena": plan.arena, "state": plan.state, "batch": plan.batch,
                 "scratch": plan.scratch, "stack": plan.stack}
        (tmp / "link.ld").write_text((FIRMWARE / "link.ld.in").read_text().format(**sizes))
        makefile = (FIRMWARE / "Makefile.in").read_text().format(
            **sizes, cpu_flags=cpu, graphs=" ".join(g.file for g in graphs.values()))
        (tmp / "Makefile").write_text(makefile.replace("-M mps2-an500 -cpu cortex-m7",
                                                       f"-M {board} -cpu {device.arch}"))
        np.savez(tmp / "data.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
        report = {"device": device.name, "bundle": str(bundle_path), "epochs": epochs, "seed": seed,
                  "eval_seed": eval_seed, "temperature": temperature, "train_samples": len(y_train),
                  "test_samples": len(y_test),
                  "sram": {"arena": plan.arena, "state": plan.state, "batch": plan.batch, "eval": plan.eval,
                           "scratch": plan.scratch, "stack": plan.stack, "ram": device.ram},
                  "graphs": {k: {"scratch": g.scratch, "temporaries": g.temps, "one_buffer_each": g.unplanned}
                             for k, g in graphs.items()},
                  **layout}
        (tmp / "layout.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def summary(report: dict, out: Path) -> str:
    s = report["sram"]
    fits = s["arena"] + s["stack"] <= s["ram"]
    return (f"wrote {out} for {report['device']}: SRAM arena {s['arena']} bytes (state {s['state']}, batch "
            f"{s['batch']}, graph scratch {s['scratch']}) + stack {s['stack']} of {s['ram']} bytes"
            f"{'' if fits else ' -- does NOT fit: the link will fail'}\n"
            f"build and run: make -C {out} run (arm-none-eabi-gcc, qemu-system-arm), or make -C {out} run-host")


class Target:
    """`edgeprop deploy --target c99`: the firmware folder, trained on a data subset in flash."""

    name = "c99"

    def __init__(self, data: str = "digits", train_samples: int | None = None, test_samples: int | None = None,
                 epochs: int = 1, seed: int = 0, temperature: float | None = None):
        self.data, self.train_samples, self.test_samples = data, train_samples, test_samples
        self.epochs, self.seed, self.temperature = epochs, seed, temperature

    def check(self, bundle: Bundle, device: Profile) -> dict:
        """The compiler and board flags for `device`; an error when it cannot run the bundle.
        (The SRAM plan needs the compiled graphs: `write` reports it.)"""
        _check(bundle, device)
        cpu, board = CPUS[device.arch]
        return {"cpu_flags": cpu, "board": board}

    def write(self, bundle: Bundle, device: Profile, out: str | Path, force: bool = False) -> dict:
        return write_firmware(bundle, device, out, data=self.data, train_samples=self.train_samples,
                              test_samples=self.test_samples, epochs=self.epochs, seed=self.seed,
                              temperature=self.temperature, force=force)

    def summary(self, report: dict, device: Profile, out: Path) -> str:
        return summary(report, out)


def results(text: str) -> dict:
    """The firmware's "ep ..." lines: per-epoch losses (float bits), accuracy, ticks, stack."""
    out = {"loss": {}, "ticks": {}}
    for line in text.splitlines():
        words = line.split()
        if words[:2] == ["ep", "loss"]:
            out["loss"].setdefault(words[2], []).append(float(np.uint32(int(words[4], 16)).view(np.float32)))
        elif words[:2] == ["ep", "ticks"]:
            out["ticks"][words[2]] = (int(words[3]), int(words[4]))
        elif words[:2] == ["ep", "accuracy"]:
            out["accuracy"] = int(words[2]) / int(words[3])
        elif words[:2] == ["ep", "accuracy-sampled"]:
            out["accuracy_sampled"] = int(words[2]) / int(words[3])
        elif words[:2] in (["ep", "stack"], ["ep", "calibrate"]):
            out[words[1]] = [int(w) for w in words[2:]]
        elif words[:2] == ["ep", "done"]:
            out["done"] = True
    return out


# -- checking generated graphs against onnxruntime -------------------------------------------------

HARNESS = """/* Runs one generated graph on inputs read from a file, writes its outputs (host gcc). */
#include <stdio.h>
unsigned char edgeprop_scratch[{scratch} + 8] __attribute__((aligned(8)));
void ep_{key}_run(void *const *io);
static float buffers[{floats}];
int main(int argc, char **argv) {{
    static const unsigned offsets[] = {{{offsets}}};
    void *io[{n_io}];
    for (int i = 0; i < {n_io}; ++i) io[i] = buffers + offsets[i];
    FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
    if (!in || !out || fread(buffers, 4, {n_in}, in) != {n_in}) return 2;
    ep_{key}_run(io);
    return fwrite(buffers, 4, {floats}, out) != {floats};
}}
"""


def run_graph_c(folder: Path, bundle: Bundle, graph: GraphC, feeds: dict[str, np.ndarray], cc: str = "gcc") -> dict:
    """Build graphs/<key>.c natively with a harness and run it on `feeds`, the way the driver
    does: every output next.K written over its input K. Returns the outputs by name."""
    spec = bundle.graphs[graph.key]
    sizes = {t.name: int(np.prod(t.shape)) for t in (*spec.inputs, *spec.outputs)}
    offsets, at = {}, 0
    in_place = {o: o[5:] for o in graph.outputs if o.startswith("next.") and o[5:] in graph.inputs}
    for name in graph.inputs + [o for o in graph.outputs if o not in in_place]:
        offsets[name], at = at, at + sizes[name]
    for o, i in in_place.items():
        offsets[o] = offsets[i]
    n_in = sum(sizes[n] for n in graph.inputs)
    build = folder / f".verify_{graph.key}"
    build.mkdir(exist_ok=True)
    (build / "harness.c").write_text(HARNESS.format(
        key=graph.key, scratch=graph.scratch, floats=at, n_in=n_in, n_io=len(offsets),
        offsets=", ".join(str(offsets[n]) for n in graph.inputs + graph.outputs)))
    exe = build / "harness"
    proc = subprocess.run([cc, "-std=c99", "-O2", "-ffp-contract=off", "-w", "-o", str(exe), str(build / "harness.c"),
                           str(folder / graph.file), "-lm"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise EdgepropError(f"{cc} could not build graph {graph.key}: {proc.stderr[-2000:]}")
    np.concatenate([np.asarray(feeds[n], np.float32).reshape(-1) for n in graph.inputs]).tofile(build / "in.bin")
    subprocess.run([str(exe), str(build / "in.bin"), str(build / "out.bin")], check=True)
    result = np.fromfile(build / "out.bin", np.float32)
    shapes = {t.name: t.shape for t in spec.outputs}
    return {o: result[offsets[o]:offsets[o] + sizes[o]].reshape(shapes[o]) for o in graph.outputs}
