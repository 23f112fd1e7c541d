"""`edgeprop validate`: does the device runtime compute what torch computes?

Three runs from the bundle's initial weights and the same random stream:

  lock-step     before every step the runtime is given the reference's exact state, so
                each compiled step is compared with torch's eager step on identical inputs.
                An exporter or engine bug shows here at once; its largest difference must be
                within `tol`.
  free-running  the runtime trains on its own for `steps` steps per unit; its final weights
                are compared with the reference's. AdamW turns a near-zero gradient's last
                bits into a full ±lr step, so a few weights drift by ~lr·steps whatever the
                engine does: the largest gap is reported, and the root-mean-square gap over
                all weights is judged. A state bug (a slot not carried, a step count or lr
                off by 1%) moves every weight: RMS 4e-4 and more, against 3e-6 for a correct
                bundle (2 blocks, digits, batch 64, 20 steps).
  sensitivity   torch against itself, with noise as large as the engine's rounding (the
                lock-step's RMS difference) added after every step: how much this training
                amplifies that rounding. The free-running RMS gap is accepted up to
                max(tol, 10 x the twin's RMS gap).
"""
from __future__ import annotations

import numpy as np
import torch

from edgeprop import bundle as bundles
from edgeprop import datasets
from edgeprop.bundle import STATS
from edgeprop.runtimes import get_engine
from edgeprop.trainer import TrainConfig, Trainer

from .reference import TorchReference

SENSITIVITY_FACTOR = 10.0


def _largest(bundle, a: dict, b: dict) -> tuple[float, str]:
    """The largest |a - b| over the buffers of b's units (BatchNorm's running statistics:
    relative where above 1), and where it is, e.g. "block3/param image.0.weight[3, 17]".
    NaN or inf counts as an infinite gap."""
    units = {u.name: u for u in bundle.units}
    best, where = -1.0, ""
    for unit, buffers in b.items():
        for key, value in buffers.items():
            gap = np.abs(a[unit][key] - value)
            if key == STATS:  # running variances grow large: relative above 1, as float32 rounds
                gap = gap / np.maximum(1.0, np.abs(value))
            gap = np.where(np.isfinite(gap), gap, np.inf)
            i = int(np.argmax(gap))
            if gap[i] > best:
                best, where = float(gap[i]), f"{unit}/{key} {units[unit].locate(i) if key != STATS else [i]}"
    return best, where


def _rms(a: dict, b: dict) -> float:
    """Root-mean-square of a - b over every parameter of b's units."""
    d = np.concatenate([(a[unit]["param"] - buffers["param"]).reshape(-1) for unit, buffers in b.items()])
    return float(np.sqrt(np.mean(np.square(d, dtype=np.float64))))


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
    lock_gap, lock_worst, squares = 0.0, "", []
    for i in range(limit):
        index = locked.plan.item(i)[0]
        unit = bundle.units[index].name
        locked.set_unit_state(unit, *reference.unit_state(index))
        locked.step(i)
        ref_loss = reference.step(i)
        after, _ = reference.unit_state(index)
        gap, worst = _largest(bundle, {unit: locked.unit_state(unit)}, {unit: after})
        squares.append(_rms({unit: locked.unit_state(unit)}, {unit: after}) ** 2)
        gap_loss = abs(locked.losses[unit] - ref_loss)
        if not (gap <= lock_gap):
            lock_gap, lock_worst = gap, f"{worst} at step {i}"
        if gap_loss > lock_gap:
            lock_gap, lock_worst = gap_loss, f"{unit}/loss at step {i}"
    reference.done = limit

    free = Trainer(bundle, eng, train, config)
    free.run(limit=limit, progress=progress, checkpoints=False)  # never touch the user's checkpoint
    free_gap, free_worst = _largest(bundle, free.state, reference.params())
    free_rms = _rms(free.state, reference.params())

    rounding = float(np.sqrt(np.mean(squares)))
    twin = TorchReference(bundle, train, config, device)
    rng = np.random.default_rng(seed)
    for i in range(limit):
        twin.step(i)
        with torch.no_grad():
            for p in twin.modules[twin.plan.item(i)[0]].parameters():
                noise = rng.uniform(-np.sqrt(3) * rounding, np.sqrt(3) * rounding, tuple(p.shape))  # RMS = rounding
                p.add_(torch.from_numpy(noise.astype(np.float32)).to(p.device))
    sensitivity = _rms(twin.params(), reference.params())

    allowed = max(tol, SENSITIVITY_FACTOR * sensitivity)
    ok = bool(lock_gap <= tol and free_rms <= allowed)
    return {"ok": ok, "steps": steps, "device": str(reference.device), "engine": engine, "provider": provider,
            "tol": tol,
            "lockstep": {"max_abs_diff": lock_gap, "worst": lock_worst},
            "free_running": {"max_abs_diff": free_gap, "worst": free_worst, "rms": free_rms, "allowed_rms": allowed},
            "lockstep_rms": rounding, "torch_sensitivity_rms": sensitivity}
