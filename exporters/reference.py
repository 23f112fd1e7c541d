"""The torch reference trainer: the same rule, run eagerly with autograd and torch.optim.

It draws every batch and every noise sample from the bundle's device-side rule, exactly as
the device runtime does, so the two can be compared step for step. Nothing here is traced:
a disagreement with the runtime points at the exporter or the engine.
"""
from __future__ import annotations

import numpy as np
import torch

from edgeprop.bundle import STATS, Bundle
from edgeprop.datasets import Dataset
from edgeprop.errors import EdgepropError
from edgeprop.rules import Plan, for_bundle
from edgeprop.trainer import TrainConfig, base_learning_rates, learning_rate

from . import rules
from .optim import Optimizer


def torch_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EdgepropError("--reference-device cuda: no CUDA GPU is visible to torch here")
    return torch.device(name)


class TorchReference:
    def __init__(self, bundle: Bundle, data: Dataset, config: TrainConfig, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.bundle, self.device, self.dtype = bundle, torch_device(device), dtype
        state, _ = bundle.initial_state()
        self.desktop = rules.from_bundle(bundle)
        self.rule = for_bundle(bundle, data, config.seed, self._run_unit, self._state_of)
        self.plan = Plan(len(bundle.units), self.rule.n_batches, config.epochs, config.order)
        # A rule that updates the weights itself (zeroth-order) runs its own update here too,
        # on torch forward passes (see _TorchForward): no torch optimizer, no slots.
        self.own_update = self.rule.updates_itself
        opt = bundle.optimizer
        self.spec = None if self.own_update else \
            Optimizer(opt["name"], opt["weight_decay"], tuple(opt["betas"]), opt["eps"], opt["momentum"])
        self.config = config
        self.lr = base_learning_rates(bundle, config)
        self.modules, self.optimizers = [], []
        # BatchNorm's running statistics (None: the unit has none): state the steps update.
        self.stats = [state[u.name].get(STATS) for u in bundle.units]
        for unit in bundle.units:
            self.modules.append(self.desktop.module(unit).to(self.device, dtype))
            self._load(len(self.modules) - 1, state[unit.name]["param"])
            self.optimizers.append(None if self.own_update else
                                   self.spec.torch_optimizer(self.modules[-1].parameters(), self.lr[unit.name]))
        self.done = 0
        self.steps = [0] * len(bundle.units)

    def _state_of(self, name: str) -> dict:
        """A unit's current weights, for a rule whose feeds read them (a learned W_embed)."""
        module = self.modules[next(i for i, u in enumerate(self.bundle.units) if u.name == name)]
        return {"param": np.concatenate([p.detach().cpu().numpy().reshape(-1) for p in module.parameters()])}

    def _load(self, index: int, flat: np.ndarray) -> None:
        named = {k: torch.from_numpy(v.copy()) for k, v in self.bundle.units[index].unflatten(flat).items()}
        self.modules[index].load_state_dict(named, strict=False)  # strict=False: fixed buffers (an embedding) stay

    def _tensors(self, arrays: dict) -> dict:
        return {k: torch.from_numpy(np.asarray(v)).to(self.device, self.dtype if v.dtype.kind == "f" else None)
                for k, v in arrays.items()}

    def _run_unit(self, unit, feeds: dict) -> dict:
        index = self.bundle.units.index(unit)
        stats = [] if self.stats[index] is None else list(self._tensors({STATS: self.stats[index]}).values())
        with torch.no_grad():
            out = self.modules[index](*self._tensors(feeds).values(), *stats)
        out = out if isinstance(out, tuple) else (out,)
        return {k: v.cpu().float().numpy() for k, v in zip(self.desktop.infer_outputs(unit), out)}

    def step(self, i: int) -> float:
        index, epoch, batch = self.plan.item(i)
        unit = self.bundle.units[index]
        lr = learning_rate(self.lr[unit.name], self.config.lr_schedule, self.steps[index] + 1,
                           self.plan.epochs * self.plan.n_batches)
        if self.own_update:
            state, _ = self.unit_state(index)
            loss = self.rule.update(index, epoch, batch, state, lr, self.steps[index] + 1, _TorchForward(self, index))
            self._load(index, state["param"])
            self.steps[index] += 1
            return loss
        feeds = self.rule.feeds(index, epoch, batch)
        feeds = self._tensors({**feeds, STATS: self.stats[index]} if self.stats[index] is not None else feeds)
        module, opt = self.modules[index], self.optimizers[index]
        opt.zero_grad(set_to_none=True)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, extras = self.desktop.loss(unit, module, feeds)
        loss.backward()
        opt.step()
        if "next.stats" in extras:
            self.stats[index] = extras["next.stats"].detach().cpu().numpy().astype(np.float32)
        self.rule.observe(index, epoch, batch, {k: v.cpu().float().numpy() for k, v in extras.items()})
        self.steps[index] += 1
        return float(loss.detach())

    def run(self, limit: int) -> None:
        while self.done < min(limit, self.plan.total):
            self.step(self.done)
            self.done += 1

    def unit_state(self, index: int) -> tuple[dict[str, np.ndarray], int]:
        """One unit's flat parameter and optimizer-slot buffers, as the bundle lays them out,
        and its update count."""
        module, opt = self.modules[index], self.optimizers[index]
        params = list(module.parameters())
        state = {"param": np.concatenate([p.detach().cpu().numpy().reshape(-1) for p in params])}
        for slot in self.spec.slots if self.spec else ():
            state[f"opt.{slot}"] = np.concatenate([self.spec.slots_of(opt, p)[slot].reshape(-1) for p in params])
        if self.stats[index] is not None:
            state[STATS] = self.stats[index].copy()
        return state, self.steps[index]

    def chain_logits(self, x: np.ndarray, seed: int, temperature: float) -> np.ndarray:
        """NoProp-DT's inference chain in torch (models.Chain) on raw samples `x`, from the
        same z_0 and noise as the device's predict() (edgeprop.prng, batch by batch, padded
        to the graphs' batch): the head's logits (N, classes)."""
        from edgeprop import prng
        from edgeprop.rules.base import padded

        from .models import Chain
        b = self.bundle
        index = {u.name: i for i, u in enumerate(b.units)}
        blocks = [self.modules[index[u.name]] for u in b.blocks]
        stats = [None if self.stats[index[u.name]] is None else self._tensors({STATS: self.stats[index[u.name]]})[STATS]
                 for u in b.blocks]
        chain = Chain(blocks, self.modules[index[b.head.name]], [b.schedule.coefficients(u.t) for u in b.blocks],
                      temperature, stats)
        B, d, out = b.batch_size, b.embedding.shape[1], []
        for start in range(0, len(x), B):
            xb, n = padded(b, x[start:start + B])
            draw = [prng.normal(prng.key(seed, prng.INFERENCE, start // B, t), (B, d)) for t in range(len(blocks) + 1)]
            feeds = self._tensors({"x": xb, "z": draw[0], "noise": np.stack(draw[1:])})
            with torch.no_grad():
                out.append(chain(feeds["x"], feeds["z"], feeds["noise"])[:n].cpu().float().numpy())
        return np.concatenate(out)

    def params(self) -> dict[str, dict[str, np.ndarray]]:
        return {unit.name: {"param": self.unit_state(i)[0]["param"]} for i, unit in enumerate(self.bundle.units)}


class _TorchForward:
    """A unit's torch module behind an engine graph's `run(feeds)`, for a rule that updates
    the weights itself: each run loads the `param` it is fed, then runs the forward pass."""

    def __init__(self, reference: TorchReference, index: int):
        self.reference, self.index = reference, index

    def run(self, feeds: dict) -> dict:
        self.reference._load(self.index, feeds["param"])
        unit = self.reference.bundle.units[self.index]
        return self.reference._run_unit(unit, {k: v for k, v in feeds.items() if k != "param"})
