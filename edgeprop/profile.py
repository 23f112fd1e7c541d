"""`edgeprop profile`: the memory plan of a bundle, checked against a budget or a device,
with measured figures beside the planned ones when asked to run real steps."""
from __future__ import annotations

import tempfile

from . import rss
from .memory import MemoryPlan, Verdict
from .sizes import format_size as fmt
from .trainer import TrainConfig, Trainer


def measure(bundle, engine, data, config: TrainConfig, steps_per_unit: int = 3) -> dict:
    """Run `steps_per_unit` real steps of every unit (interleaved, no checkpoints) and
    report what the OS saw: the process once the graphs were loaded (runtime and data), and
    per unit the peak resident bytes above that while it stepped (its working set)."""
    with tempfile.TemporaryDirectory(prefix="edgeprop-stream-") as folder:
        trainer = Trainer(bundle, engine, data, config, stream_folder=folder)
        per_unit = {u.name: 0 for u in bundle.units}
        for i in range(steps_per_unit * len(bundle.units)):
            unit = bundle.units[trainer.plan.item(i)[0]].name
            rss.reset_peak()
            trainer.step(i)
            per_unit[unit] = max(per_unit[unit], trainer.working_set())
        trainer.state = None  # unmap streamed files before the folder goes
    return {"runtime_and_data": trainer.baseline, "units": per_unit, "working_set": max(per_unit.values()),
            "steps_per_unit": steps_per_unit, "peak_resettable": rss.reset_peak()}


def report(p: MemoryPlan, verdict: Verdict | None, measured: dict | None, title: str) -> str:
    lines = [title, f"plan: {p.rule}, batch {p.batch}, engine {p.engine}, "
                    + ("--stream: one unit's state in RAM" if p.stream else "every unit's state in RAM")
                    + (", --fused-step: every unit steps at once in one graph" if p.fused else "")]
    header = f"{'unit':8s} {'weights':>10s} {'w+optim':>10s} {'step peak':>10s} {'arena':>10s} {'batch':>10s} " \
             f"{'working set':>12s}"
    if measured:
        header += f" {'measured':>10s} {'m/p':>6s}"
    if verdict:
        header += f" {'headroom':>10s}"
        outside = verdict.need - p.working_set  # runtime and data, when a device bounds the total
    lines += [header, "-" * len(header)]
    for u in p.units:
        row = f"{u.name:8s} {fmt(u.params):>10s} {fmt(u.state):>10s} {fmt(u.step):>10s} {fmt(u.engine):>10s} " \
              f"{fmt(u.batch):>10s} {fmt(u.working_set):>12s}"
        if measured:
            m = measured["units"][u.name]
            row += f" {fmt(m):>10s} {m / u.working_set:6.2f}"
        if verdict:
            row += f" {fmt(verdict.budget - outside - u.working_set):>10s}"
        lines.append(row)
    lines.append("")
    lines.append(f"working set   {fmt(p.working_set):>10s}   (weights and optimizer state held, the engines' "
                 f"arenas, one batch)")
    if p.engine_note:
        lines.append(f"  {p.engine}: {p.engine_note}")
    if measured:
        ratio = measured["working_set"] / p.working_set
        lines.append(f"  measured    {fmt(measured['working_set']):>10s}   ratio {ratio:.2f}")
    runtime = "unknown" if p.runtime is None else fmt(p.runtime)
    lines.append(f"runtime       {runtime:>10s}   (interpreter, numpy, {p.engine} and its loaded graphs)")
    if p.data:
        lines.append(f"data set      {fmt(p.data):>10s}   (training samples held in RAM)")
    if measured:
        planned = (p.runtime or 0) + p.data
        lines.append(f"  measured runtime + data {fmt(measured['runtime_and_data'])} "
                     f"(planned {fmt(planned)}, ratio {measured['runtime_and_data'] / planned:.2f})")
    lines.append(f"total         {fmt(p.total):>10s}")
    if measured and measured.get("process_peak"):
        peak = measured["process_peak"]
        lines.append(f"  measured    {fmt(peak):>10s}   ratio {peak / p.total:.2f} (the whole process's peak: imports, "
                     f"data, sessions, steps)")
    lines.append(f"storage       {fmt(p.flash):>10s}   (weights and graphs, on disk or in flash)")
    bp = p.backprop
    lines.append(f"back-prop     {fmt(bp['working_set']):>10s}   end to end, same network and batch "
                 f"(activations {fmt(bp['activations'])}, gradients {fmt(bp['gradients'])}): "
                 f"this plan needs {p.working_set / bp['working_set']:.2f}x of it")
    if verdict:
        lines.append("")
        if verdict.fits:
            lines.append(f"verdict: FITS: the {verdict.what} needs {fmt(verdict.need)} of {fmt(verdict.budget)}, "
                         f"headroom {fmt(verdict.headroom)}")
        else:
            lines.append("verdict: DOES NOT FIT: " + "; ".join(verdict.problems))
    return "\n".join(lines)
