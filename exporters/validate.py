"""`edgeprop validate`: does the device runtime compute what torch computes?

Three runs from the bundle's initial weights and the same random stream:

  lock-step     before every step the runtime is given the reference's exact state, so
                each compiled step is compared with torch's eager step on identical inputs.
                An exporter or engine bug shows here at once. With SGD its largest difference
                must be within `tol`. With AdamW a weight whose true gradient is ~0 (float
                cancellation noise, as in a convolution's) moves by a full ±lr in whichever
                direction the noise's sign says, differently in each engine: so AdamW's
                lock-step is judged on the gradient, before the optimizer normalises it
                (the first moment m' = β1 m + (1 − β1) g from the same m: its difference is
                (1 − β1) × the gradient's), the second moment, the loss and BatchNorm's
                statistics, each within `tol`, and on the weights' RMS difference per step
                within `tol`; the largest weight difference is reported.
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
  inference     NoProp-DT: the device's inference chain (edgeprop.rules.noprop_dt.predict,
                the runtime's inference graphs) against the torch chain (models.Chain), both
                on the reference's trained weights, the same z_0 and noise, at the bundle's
                inference temperature τ and at τ = 1: the head's logits must agree within
                INFERENCE_TOL (relative to their size).
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
INFERENCE_TOL = 1e-3  # the chain's logits, relative to max(1, their largest magnitude)
INFERENCE_SAMPLES = 256  # training samples the inference chains are compared on


def _largest(bundle, a: dict, b: dict, skip: tuple[str, ...] = ()) -> tuple[float, str]:
    """The largest |a - b| over the buffers of b's units (BatchNorm's running statistics:
    relative where above 1), and where it is, e.g. "block3/param image.0.weight[3, 17]".
    NaN or inf counts as an infinite gap."""
    units = {u.name: u for u in bundle.units}
    best, where = -1.0, ""
    for unit, buffers in b.items():
        for key, value in buffers.items():
            if key in skip:
                continue
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
    grad_gap, grad_worst = 0.0, ""  # everything but the weights: AdamW's slots (the gradient), stats, loss
    for i in range(limit):
        index = locked.plan.item(i)[0]
        unit = bundle.units[index].name
        locked.set_unit_state(unit, *reference.unit_state(index))
        locked.step(i)
        ref_loss = reference.step(i)
        after, _ = reference.unit_state(index)
        mine = {unit: locked.unit_state(unit)}
        gap, worst = _largest(bundle, mine, {unit: after})
        squares.append(_rms(mine, {unit: after}) ** 2)
        gap_loss = abs(locked.losses[unit] - ref_loss)
        if not (gap <= lock_gap):
            lock_gap, lock_worst = gap, f"{worst} at step {i}"
        if gap_loss > lock_gap:
            lock_gap, lock_worst = gap_loss, f"{unit}/loss at step {i}"
        gap, worst = _largest(bundle, mine, {unit: after}, skip=("param",))
        for g, w in ((gap, worst), (gap_loss, f"{unit}/loss")):
            if not (g <= grad_gap):
                grad_gap, grad_worst = g, f"{w} at step {i}"
    reference.done = limit
    rounding = float(np.sqrt(np.mean(squares)))
    adamw = bundle.optimizer.get("name") == "adamw"
    lock_ok = bool(grad_gap <= tol and rounding <= tol) if adamw else bool(lock_gap <= tol)

    free = Trainer(bundle, eng, train, config)
    free.run(limit=limit, progress=progress, checkpoints=False)  # never touch the user's checkpoint
    free_gap, free_worst = _largest(bundle, free.state, reference.params())
    free_rms = _rms(free.state, reference.params())

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
    inference = _inference(bundle, eng, reference, train, seed) if bundle.rule == "noprop-dt" else None
    ok = bool(lock_ok and free_rms <= allowed and (inference is None or inference["ok"]))
    return {"ok": ok, "steps": steps, "device": str(reference.device), "engine": engine, "provider": provider,
            "tol": tol,
            "lockstep": {"max_abs_diff": lock_gap, "worst": lock_worst, "ok": lock_ok,
                         "judged": "adamw: gradient side and weights' RMS" if adamw else "largest difference",
                         "max_abs_diff_gradient": grad_gap, "worst_gradient": grad_worst, "rms": rounding},
            "free_running": {"max_abs_diff": free_gap, "worst": free_worst, "rms": free_rms, "allowed_rms": allowed},
            "lockstep_rms": rounding, "torch_sensitivity_rms": sensitivity,
            **({"inference": inference} if inference else {})}


def _inference(bundle, eng, reference: TorchReference, train, seed: int) -> dict:
    """NoProp-DT's inference chain, device (the runtime's inference graphs, numpy) vs torch
    (models.Chain), on the reference's weights after training, at the bundle's τ and τ = 1."""
    from edgeprop.rules.noprop_dt import predict
    from edgeprop.trainer import infer_state, load_graphs
    graphs = load_graphs(bundle, eng, {u.infer_graph for u in bundle.units})
    state = {u.name: infer_state(reference.unit_state(i)[0]) for i, u in enumerate(bundle.units)}

    def run_unit(unit, feeds):
        return graphs[unit.infer_graph].run({**state[unit.name], **feeds})

    x = train.x[:INFERENCE_SAMPLES]
    chains, ok = {}, True
    for tau in dict.fromkeys([bundle.temperature, 1.0]):
        mine = predict(bundle, reference.rule.embedding, x, run_unit, seed, tau).logits
        theirs = reference.chain_logits(x, seed, tau)
        gap = float(np.max(np.abs(mine - theirs))) if np.all(np.isfinite(mine)) else float("inf")
        allowed = INFERENCE_TOL * max(1.0, float(np.max(np.abs(theirs))))
        agree = float(np.mean(np.argmax(mine, 1) == np.argmax(theirs, 1)))
        chains[f"{tau:g}"] = {"max_abs_diff": gap, "allowed": allowed, "agreement": agree}
        ok = ok and gap <= allowed
    return {"ok": bool(ok), "samples": len(x), "temperature": bundle.temperature, "chains": chains}
