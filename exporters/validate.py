"""`edgeprop validate`: does the device runtime compute what torch computes?

Three runs from the bundle's initial weights and the same random stream:

  lock-step     before every step the runtime is given the reference's exact state, so
                each compiled step is compared with torch's eager step on identical inputs.
                An exporter or engine bug shows here at once; this must be within `tol`.
  free-running  the runtime trains on its own for `steps` steps per unit; its final weights
                are compared with the reference's.
  sensitivity   torch against itself, started from weights nudged by as much as one
                lock-step differed: how much this training amplifies the rounding noise
                one engine step adds. AdamW normalises near-zero gradients into full-size
                steps, so noise of 1e-7 can grow to 1e-3 within 20 steps (digits, batch 64).
                A free-running gap is accepted up to max(tol, 10 x sensitivity).
"""
from __future__ import annotations

import numpy as np
import torch

from edgeprop import bundle as bundles
from edgeprop import datasets
from edgeprop.runtimes import get_engine
from edgeprop.trainer import TrainConfig, Trainer

from .reference import TorchReference

SENSITIVITY_FACTOR = 10.0


def _largest(bundle, a: dict, b: dict) -> tuple[float, str]:
    """The largest |a - b| over the buffers of b's units, and where it is, e.g.
    "block3/param image.0.weight[3, 17]". NaN or inf counts as an infinite gap."""
    units = {u.name: u for u in bundle.units}
    best, where = -1.0, ""
    for unit, buffers in b.items():
        for key, value in buffers.items():
            gap = np.abs(a[unit][key] - value)
            gap = np.where(np.isfinite(gap), gap, np.inf)
            i = int(np.argmax(gap))
            if gap[i] > best:
                best, where = float(gap[i]), f"{unit}/{key} {units[unit].locate(i)}"
    return best, where


def validate(bundle_path, data: str = "digits", steps: int = 50, device: str = "cpu", tol: float = 1e-4,
             seed: int = 0, engine: str = "onnxruntime", provider: str = "cpu", progress: bool = True) -> dict:
    bundle = bundles.load(bundle_path)
    train = datasets.load(data, "train")
    datasets.check(train, bundle.input_shape, bundle.num_classes)
    n_batches = -(-len(train) // bundle.batch_size)
    config = TrainConfig(epochs=-(-steps // n_batches), order="interleaved", seed=seed)
    limit = steps * len(bundle.units)
    eng = get_engine(engine, **({"provider": provider} if provider != "cpu" else {}))

    # Lock-step: the runtime starts every step from the reference's state.
    reference = TorchReference(bundle, train, config, device)
    locked = Trainer(bundle, eng, train, config)
    lock_gap, lock_worst = 0.0, ""
    for i in range(limit):
        index = locked.plan.item(i)[0]
        unit = bundle.units[index].name
        locked.set_unit_state(unit, *reference.unit_state(index))
        locked.step(i)
        ref_loss = reference.step(i)
        after, _ = reference.unit_state(index)
        gap, worst = _largest(bundle, {unit: locked.unit_state(unit)}, {unit: after})
        gap_loss = abs(locked.losses[unit] - ref_loss)
        if not (gap <= lock_gap):
            lock_gap, lock_worst = gap, f"{worst} at step {i}"
        if gap_loss > lock_gap:
            lock_gap, lock_worst = gap_loss, f"{unit}/loss at step {i}"
    reference.done = limit

    free = Trainer(bundle, eng, train, config)
    free.run(limit=limit, progress=progress, checkpoints=False)  # never touch the user's checkpoint
    free_gap, free_worst = _largest(bundle, free.state, reference.params())

    twin = TorchReference(bundle, train, config, device)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in (p for module in twin.modules for p in module.parameters()):
            p.add_(torch.from_numpy(rng.uniform(-lock_gap, lock_gap, tuple(p.shape)).astype(np.float32)).to(p.device))
    twin.run(limit)
    sensitivity, _ = _largest(bundle, twin.params(), reference.params())

    allowed = max(tol, SENSITIVITY_FACTOR * sensitivity)
    ok = bool(lock_gap <= tol and free_gap <= allowed)
    return {"ok": ok, "steps": steps, "device": str(reference.device), "engine": engine, "provider": provider,
            "tol": tol,
            "lockstep": {"max_abs_diff": lock_gap, "worst": lock_worst},
            "free_running": {"max_abs_diff": free_gap, "worst": free_worst, "allowed": allowed},
            "torch_sensitivity": sensitivity}
