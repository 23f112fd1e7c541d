"""The torch reference trainer: the same rule, run eagerly with autograd and torch.optim.

It draws every batch and every noise sample from the bundle's device-side rule, exactly as
the device runtime does, so the two can be compared step for step. Nothing here is traced:
a disagreement with the runtime points at the exporter or the engine.
"""
from __future__ import annotations

import numpy as np
import torch

from edgeprop.bundle import Bundle
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
        self.rule = for_bundle(bundle, data, config.seed, self._run_unit)
        self.plan = Plan(len(bundle.units), self.rule.n_batches, config.epochs, config.order)
        opt = bundle.optimizer
        self.spec = spec = Optimizer(opt["name"], opt["weight_decay"], tuple(opt["betas"]), opt["eps"], opt["momentum"])
        self.config = config
        self.lr = base_learning_rates(bundle, config)
        self.modules, self.optimizers = [], []
        for unit in bundle.units:
            module = self.desktop.module(unit).to(self.device, dtype)
            named = {k: torch.from_numpy(v.copy()) for k, v in unit.unflatten(state[unit.name]["param"]).items()}
            module.load_state_dict(named, strict=False)  # strict=False: fixed buffers (an embedding) stay
            self.modules.append(module)
            self.optimizers.append(spec.torch_optimizer(module.parameters(), self.lr[unit.name]))
        self.done = 0
        self.steps = [0] * len(bundle.units)

    def _tensors(self, arrays: dict) -> dict:
        return {k: torch.from_numpy(np.asarray(v)).to(self.device, self.dtype if v.dtype.kind == "f" else None)
                for k, v in arrays.items()}

    def _run_unit(self, unit, feeds: dict) -> dict:
        index = self.bundle.units.index(unit)
        with torch.no_grad():
            out = self.modules[index](*self._tensors(feeds).values())
        out = out if isinstance(out, tuple) else (out,)
        return {k: v.cpu().float().numpy() for k, v in zip(self.desktop.infer_outputs(unit), out)}

    def step(self, i: int) -> float:
        index, epoch, batch = self.plan.item(i)
        unit = self.bundle.units[index]
        feeds = self._tensors(self.rule.feeds(index, epoch, batch))
        module, opt = self.modules[index], self.optimizers[index]
        opt.zero_grad(set_to_none=True)
        for group in opt.param_groups:
            group["lr"] = learning_rate(self.lr[self.bundle.units[index].name], self.config.lr_schedule,
                                        self.steps[index] + 1, self.plan.epochs * self.plan.n_batches)
        loss, extras = self.desktop.loss(unit, module, feeds)
        loss.backward()
        opt.step()
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
        for slot in self.spec.slots:
            state[f"opt.{slot}"] = np.concatenate([self.spec.slots_of(opt, p)[slot].reshape(-1) for p in params])
        return state, self.steps[index]

    def params(self) -> dict[str, dict[str, np.ndarray]]:
        return {unit.name: {"param": self.unit_state(i)[0]["param"]} for i, unit in enumerate(self.bundle.units)}
