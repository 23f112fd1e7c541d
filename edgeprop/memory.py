"""The memory planner: will training fit, worked out before anything runs.

Works from the manifest alone (no onnx, no torch), so a device can check itself. At export
every graph was analysed (exporters/liveness.py) and its live bytes stored as c + s·B, so
any batch size B can be planned. While a unit (a NoProp block or the head) steps, memory
holds:

  state    the unit's weights and optimizer slots
  others   every other unit's weights and optimizer slots, unless --stream keeps them in
           memory-mapped files (then only the stepping unit's state is in RAM)
  step     the step graph's live tensors at their peak (liveness over the ONNX graph):
           activations, the gradient, the updated weights and slots
  engine   what the engine holds for that peak. onnxruntime keeps an arena per loaded graph
           that grows in doubling regions from 1 MiB and is never given back, so every step
           graph's arena stays resident (see EngineMemory.arena); a static engine (TFLM,
           generated C) plans one arena
  batch    the step graph's batch inputs: samples, noisy labels, targets, mask
  scratch  what the device rule itself allocates for a step (manifest unit "scratch"):
           zeroth-order's one chunk of regenerated perturbation; 0 for graph-step rules

  working set = state + others + engines' arenas + batch + scratch   (what --budget bounds)
  total       = runtime (interpreter, numpy, engine, loaded graphs) + data set + working set

End-to-end back-prop of the same network is planned from the same facts: it must keep every
block's forward activations (the step graph's live bytes when the loss is computed) and
every gradient at once, plus all weights and optimizer state.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from .bundle import FUSED, Bundle
from .errors import EdgepropError
from .sizes import format_size as fmt

FLOAT = 4  # bytes of a float32


@dataclass(frozen=True)
class EngineMemory:
    """What an engine adds on top of the graphs' own liveness."""
    name: str
    runtime: int | None    # process bytes before any graph: interpreter, numpy, engine (None: unknown)
    per_node: int          # bytes each loaded graph node costs (the session's graph, kernels)
    first_region: int      # arena's first region, doubled at each growth; 0: exact static arena
    retains_arenas: bool   # every loaded graph keeps its own arena (else one shared arena)
    note: str
    # An engine that trains by itself (ort-training) loads each unit's own sessions after the
    # trainer's baseline, so they count in the working set, not the runtime: per unit
    # per_node·nodes + copies·weights + the forward activations its training session keeps.
    copies: int = 0        # copies of each unit's weights held by its sessions (0: the engine holds none)
    first_session: int = 0  # bytes the engine's first session brings (its environment, thread pool)
    # An engine whose exact arena the export measures (tflm): the step graphs' memory fact that
    # holds it as [c, s], and what the plan then says about it.
    exact_arena: str = ""
    exact_note: str = ""
    # The session build, per optimisation level (see session_build): copies of the constant
    # conv weights a level keeps beside the weights (onnxruntime's NCHWc reorder and packing),
    # copies of the constant matrices of Gemm/MatMul kept packed for the CPU's kernels, and
    # the share of the weights constant folding makes that the build holds twice at once.
    conv_copies: tuple = ()   # ((level, copies), ...)
    packed_copies: tuple = ()  # ((op type, copies), ...)
    fold_transient: float = 0.0
    fused_copies: float = 0.0  # copies kept of folded conv weights a BatchNormalization was fused into
    arena_touched: float = 1.0  # share of the arena's regions the runs touch
    # A static arena's engine whose delegate keeps its own workspace (LiteRT's XNNPACK): the
    # share of the live peak it holds again, and the bytes each delegated graph adds.
    delegate_workspace: float = 0.0
    delegate_per_graph: int = 0
    session_per_node: int = 0  # bytes a session keeps per node: kernels, their plans, the graph
    # The runtime measured on other CPU architectures: ((arch, bytes, where it comes from), ...);
    # `runtime` and `note` are the build machine's (x86-64), used for an arch not listed.
    arch_runtimes: tuple = ()

    def on(self, arch: str | None) -> EngineMemory:
        """This model with the runtime figure of CPU architecture `arch` (a device profile's),
        and a note saying where the figure comes from."""
        if not arch:
            return self
        for name, runtime, note in self.arch_runtimes:
            if name == arch:
                return replace(self, runtime=runtime, note=note)
        if self.runtime is None or "x86" in arch:
            return self
        return replace(self, note=f"{self.note}; no {arch} figure measured, x86-64's used")

    @property
    def holds_units(self) -> bool:
        return self.copies > 0

    def session_build(self, facts: dict, level: str = "") -> dict:
        """Bytes a session of a model holds once built ("loaded") and at its build's peak
        ("peak"), above the process before it, at the optimisation `level`. `facts`: the
        model's "weights" (after constant folding), its "largest" weight tensor, the bytes
        constant folding made ("folded"), those of its constant conv weights ("conv") and of
        its constant matrices per op type ("matrices": {"Gemm": bytes, "MatMul": bytes}), the folded conv weights a
        BatchNormalization is fused into ("fused"), its "nodes". The build reads each weight into a
        buffer of its own and so briefly holds the largest twice; a folded weight is
        computed, then copied into an initializer."""
        loaded = facts["weights"] + self.session_per_node * facts["nodes"] + int(
            dict(self.conv_copies).get(level, 0) * facts["conv"]
            + sum(copies * facts["matrices"].get(op, 0) for op, copies in self.packed_copies)
            + self.fused_copies * facts["fused"])
        return {"loaded": loaded, "peak": loaded + max(facts["largest"], int(self.fold_transient * facts["folded"]))}

    def arena(self, peak: int) -> int:
        """Resident bytes of the arena that serves a graph whose live tensors peak at `peak`.

        onnxruntime's first run allocates tensor by tensor, adding regions of 1, 2, 4, ...
        MiB until they hold the peak; later runs reuse a memory pattern, one block of the
        peak's size, which must fit inside one region: when none is large enough a new one is
        added (exporters/ort_pattern.py replays both for a whole model). The runs touch
        `arena_touched` of those regions (measured on bench/planner.py's
        models: 0.72-0.92 of them for most conv nets)."""
        if not self.first_region or peak <= 0:  # a static arena, and a delegate's workspace beside it
            return max(peak, 0) + int(self.delegate_workspace * max(peak, 0)) + self.delegate_per_graph
        total, region, largest = 0, self.first_region, 0
        while total < peak:
            total, largest, region = total + region, region, region * 2
        whole = total if largest >= peak else total + peak
        return int(self.arena_touched * whole)


def _at(affine, batch: int) -> int:
    return int(affine[0] + affine[1] * batch)


def _peak(points, batch: int) -> int:
    return max(_at(p, batch) for p in points)


@dataclass
class UnitPlan:
    name: str
    graph: str      # its step graph
    params: int     # bytes of its weights
    state: int      # weights + optimizer slots
    step: int       # step graph liveness peak (includes the gradient, = params bytes)
    engine: int     # the engine's arena for that peak
    batch: int
    scratch: int = 0      # bytes the device rule allocates beside the graph (zeroth-order's chunk)
    held: int = 0         # weights and slots in RAM while it steps: its own, or every unit's (filled in by plan())
    working_set: int = 0  # everything held while this unit steps (filled in by plan())


@dataclass
class MemoryPlan:
    rule: str
    batch: int
    stream: bool
    engine: str
    units: list[UnitPlan]
    runtime: int | None   # interpreter + engine + loaded graphs; None when unknown
    data: int             # the data set held in RAM (0 if not given)
    flash: int            # bytes kept in storage (flash on a microcontroller): weights + graph files
    backprop: dict = field(default_factory=dict)
    engine_note: str = ""  # what the engine figures rest on: its memory model, or TFLM's measured arenas
    fused: bool = False    # every unit steps at once in the fused step graph (train --fused-step)

    @property
    def working_set(self) -> int:
        return max(u.working_set for u in self.units)

    @property
    def total(self) -> int:
        return (self.runtime or 0) + self.data + self.working_set

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(working_set=self.working_set, total=self.total)
        return d


def graph_facts(bundle: Bundle, key: str) -> dict:
    facts = bundle.manifest["graphs"][key].get("memory")
    if not facts:
        raise EdgepropError(f"{bundle.root}: graph '{key}' has no memory facts (exported by an older edgeprop); "
                            f"export the bundle again to plan its memory")
    return facts


def exact_arenas(bundle: Bundle, fact: str) -> dict[str, list] | None:
    """An engine's exact arena for each unit's step graph as [c, s] (bytes = c + s·B), as the
    export measured it (memory fact `fact`, e.g. TFLite Micro's "tflm_arena"): exact at the
    bundle's batch size, the slope measured at one more. None if any step graph lacks it.

    Measured where the .tflite is written rather than when planning: the figure belongs to
    the file (whose sha256 the manifest holds), and the planner must work from the manifest
    alone on a machine without tflite-micro (its wheels are x86-64 Linux only)."""
    arenas = {u.step_graph: graph_facts(bundle, u.step_graph).get(fact) for u in bundle.units}
    return None if None in arenas.values() else arenas


def plan(bundle: Bundle, batch: int | None = None, stream: bool = False, *, engine: EngineMemory,
         data_bytes: int = 0, vector_width: int | None = None, fused: bool = False) -> MemoryPlan:
    """Plan one training run of `bundle` at `batch` (default: the bundle's) on `engine` (its
    memory model: edgeprop.runtimes.memory_model(name)). `vector_width`: onnxruntime runs
    convolutions in its NCHWc layout with blocks of that many floats (its LAYOUT/ALL levels
    on x86; the export stored each conv graph's peak for widths 8 and 16). `fused`: the run
    steps every unit at once with the bundle's fused step graph (train --fused-step)."""
    batch = bundle.batch_size if batch is None else int(batch)
    if batch < 1:
        raise EdgepropError(f"batch size must be at least 1, got {batch}")
    if fused:
        return fused_plan(bundle, batch, stream, engine, data_bytes, vector_width)
    eng = engine
    if stream and eng.holds_units:
        raise EdgepropError(f"engine {eng.name} holds every unit's state itself: --stream does not apply")
    exact = exact_arenas(bundle, eng.exact_arena) if eng.exact_arena else None
    units = []
    scratch = {u["name"]: int(u.get("scratch", 0)) for u in bundle.manifest["units"]}
    for u in bundle.units:
        facts = graph_facts(bundle, u.step_graph)
        state = sum(FLOAT * t.shape[0] for t in u.state)
        blocked = facts.get("nchwc_peak", {}).get(str(vector_width)) if engine.name == "onnxruntime" else None
        step = _peak(blocked or facts["peak"], batch)
        if eng.holds_units:  # the unit's own sessions: graphs, copies of its weights, kept activations
            arena = eng.per_node * facts["nodes"] + eng.copies * FLOAT * u.n_params + _at(facts["saved"], batch)
        else:
            arena = _at(exact[u.step_graph], batch) if exact else eng.arena(step)
        units.append(UnitPlan(u.name, u.step_graph, FLOAT * u.n_params, state, step, arena,
                              _at(facts["inputs"], batch) - state, scratch[u.name]))
    graphs = {u.name if eng.holds_units else u.graph: u.engine for u in units}  # sessions per unit, or per graph
    held = (sum(graphs.values()) if eng.retains_arenas else max(graphs.values())) + eng.first_session
    resident = sum(u.state for u in units)
    for u in units:
        u.held = u.state if stream else resident
        u.working_set = u.held + held + u.batch + u.scratch
        if exact:
            # TFLM's arena holds the graph's inputs and outputs too: on a microcontroller the
            # stepping unit's state and batch live there, not beside it (the host engine's
            # trainer keeps numpy copies; the plan is the device's).
            u.working_set -= u.state + u.batch
    runtime = None
    if eng.runtime is not None:
        steps = [graph_facts(bundle, k) for k in {u.step_graph for u in bundle.units}]
        # Each loaded step graph's session holds its nodes and its constants: a frozen
        # backbone's weights (`--trainable bias`: ResNet-18's 44.7 MB) are constants.
        runtime = eng.runtime + (0 if eng.holds_units else sum(eng.per_node * f["nodes"] + f.get("constants", 0)
                                                              for f in steps))
    files = sum(bundle.graph_path(k).stat().st_size for k in bundle.graphs)
    # In storage: every unit's weights and the graphs. Optimizer slots need no storage on a
    # microcontroller training block by block: they start at zero and end with their block.
    weights = sum(u.params for u in units)
    p = MemoryPlan(bundle.rule, batch, stream, eng.name, units, runtime, data_bytes, weights + files)
    p.backprop = backprop_plan(bundle, batch, eng)
    p.engine_note = eng.note
    if exact:
        p.engine_note = eng.exact_note
        if batch != bundle.batch_size:
            p.engine_note += f"; exact at batch {bundle.batch_size}, scaled to {batch} by its growth per sample"
    return p


FUSED_UNIT = "fused"  # the plan's one unit of a --fused-step run


def fused_plan(bundle: Bundle, batch: int, stream: bool, eng: EngineMemory, data_bytes: int,
               vector_width: int | None) -> MemoryPlan:
    """A --fused-step run: one graph steps every unit of a batch, so the plan has one "unit"
    holding every unit's state, the fused graph's live tensors at their peak (each unit's
    updated state stays live to the end of the call, so the peak is at least any unit's own
    step peak) and every unit's batch inputs; the fused graph is the only step graph loaded."""
    if bundle.fused is None:
        raise EdgepropError(f"{bundle.root}: this bundle has no fused step graph; export it with --fused-step")
    if stream:
        raise EdgepropError("--fused-step holds every unit's state in memory at once: --stream does not apply")
    if eng.holds_units or eng.exact_arena:
        raise EdgepropError(f"engine {eng.name} cannot run the fused step graph (onnxruntime or native)")
    facts = bundle.manifest[FUSED]["memory"]
    state = sum(FLOAT * t.shape[0] for u in bundle.units for t in u.state)
    blocked = facts.get("nchwc_peak", {}).get(str(vector_width)) if eng.name == "onnxruntime" else None
    step = _peak(blocked or facts["peak"], batch)
    scratch = sum(int(u.get("scratch", 0)) for u in bundle.manifest["units"])
    unit = UnitPlan(FUSED_UNIT, FUSED, FLOAT * sum(u.n_params for u in bundle.units), state, step,
                    eng.arena(step), _at(facts["inputs"], batch) - state, scratch, held=state)
    unit.working_set = state + unit.engine + eng.first_session + unit.batch + scratch
    runtime = None if eng.runtime is None else eng.runtime + eng.per_node * facts["nodes"] + facts.get("constants", 0)
    files = sum(bundle.graph_path(k).stat().st_size for k in bundle.graphs) + \
        bundle.path(bundle.fused.graph.file).stat().st_size
    p = MemoryPlan(bundle.rule, batch, False, eng.name, [unit], runtime, data_bytes, unit.params + files)
    p.backprop, p.engine_note, p.fused = backprop_plan(bundle, batch, eng), eng.note, True
    return p


def backprop_plan(bundle: Bundle, batch: int, eng: EngineMemory) -> dict:
    """The same network trained end to end with back-prop, at the same batch size.

    Back-prop must keep every block's forward activations until its backward pass runs,
    and every gradient until the optimizer steps: the sum over units of what a step graph
    holds when its loss is computed, plus all gradients, plus one unit's backward and
    update at a time. Weights and optimizer slots of every unit stay in RAM."""
    saved = grads = transient = batch_bytes = state = 0
    for u in bundle.units:
        facts = graph_facts(bundle, u.step_graph)
        unit_saved = _at(facts["saved"], batch)
        unit_state = sum(FLOAT * t.shape[0] for t in u.state)
        saved += unit_saved
        grads += FLOAT * u.n_params
        state += unit_state
        transient = max(transient, _peak(facts["peak"], batch) - unit_saved)
        batch_bytes = max(batch_bytes, _at(facts["inputs"], batch) - unit_state)
    peak = saved + grads + transient
    return {"state": state, "activations": saved, "gradients": grads, "step": peak, "engine": eng.arena(peak),
            "batch": batch_bytes, "working_set": state + eng.arena(peak) + batch_bytes}


@dataclass
class Verdict:
    fits: bool
    budget: int           # bytes available to what the budget bounds
    need: int             # bytes planned against it
    what: str             # what the budget bounds: "working set" or "total"
    problems: list[str]   # why not, each with its figures

    @property
    def headroom(self) -> int:
        return self.budget - self.need


def check(p: MemoryPlan, budget: int | None = None, device=None) -> Verdict:
    """Does the plan fit `budget` (bytes for the working set) or the device profile (its
    whole training process, and for a microcontroller also its flash)?"""
    problems = []
    if device is not None:
        if device.kind == "mcu":
            # Bare metal: weights and data live in flash; only the working set is in SRAM.
            avail, need, what = device.budget, p.working_set, "working set (SRAM)"
            if p.flash + p.data > device.flash + device.psram:
                problems.append(f"weights, graphs and data need {fmt(p.flash + p.data)} of flash, "
                                f"{device.name} has {fmt(device.flash + device.psram)}")
        else:
            avail, need, what = device.budget, p.total, "training process"
            if p.runtime is None:
                problems.append(f"the runtime's own memory is unknown for engine '{p.engine}'")
        if p.engine not in device.engines:
            problems.append(f"{device.name} runs {', '.join(device.engines)}, not {p.engine}")
    elif budget is not None:
        avail, need, what = budget, p.working_set, "working set"
    else:
        raise EdgepropError("give a --budget or a --device to check against")
    if need > avail:
        problems.insert(0, f"the {what} needs {fmt(need)}, {fmt(avail)} is available: {fmt(need - avail)} short")
    return Verdict(not problems, avail, need, what, problems)


def largest_batch(bundle: Bundle, fits, limit: int = 1 << 16) -> int | None:
    """The largest batch size B ≤ limit with fits(B) true (memory grows with B), or None."""
    if not fits(1):
        return None
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def fit(bundle: Bundle, budget: int | None = None, device=None, *, engine: EngineMemory,
        data_bytes: int = 0, vector_width: int | None = None, fused: bool = False) -> dict[str, int | None]:
    """The largest batch size that fits, for each way of holding the state."""
    out, ways = {}, [("all state in RAM (interleaved or block-sequential)", False, False),
                     ("--stream (one unit's state in RAM)", True, False)]
    if fused:
        ways = [("--fused-step (every unit at once)", False, True), *ways]
    for name, stream, together in [w for w in ways if not (w[1] and engine.holds_units)]:  # it cannot --stream
        out[name] = largest_batch(bundle, lambda b, s=stream, f=together: check(
            plan(bundle, b, s, engine=engine, data_bytes=data_bytes, vector_width=vector_width, fused=f), budget,
            device).fits)
    return out


def refusal(bundle: Bundle, budget: int | None = None, device=None, stream: bool = False,
            *, engine: EngineMemory, data_bytes: int = 0, vector_width: int | None = None,
            fused: bool = False) -> str | None:
    """None if the run fits; else what does not fit, by how much, and what would."""
    sized = {"engine": engine, "data_bytes": data_bytes, "vector_width": vector_width}
    verdict = check(plan(bundle, None, stream, **sized, fused=fused), budget, device)
    if verdict.fits:
        return None
    target = f"device {device.name} ({fmt(device.budget)} for training)" if device else f"a budget of {fmt(budget)}"
    hints = []
    if fused:  # one unit's step at a time holds one unit's activations
        alone = check(plan(bundle, None, stream, **sized), budget, device)
        if alone.fits:
            hints.append(f"drop --fused-step (then {fmt(alone.need)} of {fmt(alone.budget)})")
    elif not stream and not engine.holds_units:
        streamed = check(plan(bundle, None, True, **sized), budget, device)
        if streamed.fits:
            hints.append(f"add --stream (then {fmt(streamed.need)} of {fmt(streamed.budget)})")
    for how, batch in fit(bundle, budget, device, **sized, fused=fused).items():
        hints.append(f"{how}: export again with --batch-size {batch} or less" if batch else f"{how}: no batch size")
    return f"{bundle.root} does not fit {target}: " + "; ".join(verdict.problems) + ". What would fit: " + \
        "; ".join(hints)


def check_inference(report: dict, budget: int | None = None, device=None) -> dict:
    """Does a plain inference model's forward pass (= zeroth-order fine-tuning) fit, and
    would end-to-end back-prop? `report` comes from exporters.model_memory.onnx_report."""
    runtime = report["runtime"] or 0
    if device is not None:
        avail = device.budget
        need, bp = report["inference"] + (0 if device.kind == "mcu" else runtime), \
            report["backprop"]["working_set"] + (0 if device.kind == "mcu" else runtime)
        where = f"{device.name} ({fmt(avail)} for training)"
    elif budget is not None:
        avail, need, bp, where = budget, report["inference"], report["backprop"]["working_set"], f"budget {fmt(budget)}"
    else:
        raise EdgepropError("give a --budget or a --device to check against")
    fits = need <= avail
    message = (f"forward passes (zeroth-order fine-tuning) need {fmt(need)} of {where}; "
               + (f"headroom {fmt(avail - need)}" if fits else f"{fmt(need - avail)} short")
               + f"; end-to-end back-prop would need {fmt(bp)}" + (" (fits)" if bp <= avail else " (does not fit)"))
    return {"fits": fits, "need": need, "budget": avail, "backprop_need": bp, "backprop_fits": bp <= avail,
            "message": message}
