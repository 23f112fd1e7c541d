"""The torch reference trainer: the same rule, run eagerly with autograd and torch.optim.

It draws every batch and every noise sample from edgeprop.noprop.Feeder, exactly as the
device runtime does, so the two can be compared step for step. Nothing here is traced:
a disagreement with the runtime points at the exporter or the engine.
"""
from __future__ import annotations

import numpy as np
import torch

from edgeprop.bundle import Bundle
from edgeprop.datasets import Dataset
from edgeprop.errors import EdgepropError
from edgeprop.noprop import Feeder, Plan
from edgeprop.trainer import TrainConfig, base_learning_rates, learning_rate

from .models import build_unit, unit_loss
from .optim import Optimizer


def torch_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EdgepropError("--reference-device cuda: no CUDA GPU is visible to torch here")
    return torch.device(name)


class TorchReference:
    def __init__(self, bundle: Bundle, data: Dataset, config: TrainConfig, device: str = "cpu"):
        self.bundle, self.device = bundle, torch_device(device)
        state, embedding = bundle.initial_state()
        self.feeder = Feeder(bundle, embedding, data, config.seed)
        self.plan = Plan(len(bundle.units), self.feeder.n_batches, config.epochs, config.order)
        opt = bundle.optimizer
        self.spec = spec = Optimizer(opt["name"], opt["weight_decay"], tuple(opt["betas"]), opt["eps"], opt["momentum"])
        self.config = config
        self.lr = base_learning_rates(bundle, config)
        self.modules, self.optimizers = [], []
        for unit in bundle.units:
            module = build_unit(bundle.model, unit.role, embedding).to(self.device)
            named = {k: torch.from_numpy(v.copy()) for k, v in unit.unflatten(state[unit.name]["param"]).items()}
            module.load_state_dict(named, strict=False)  # strict=False: the embedding buffer is fixed
            self.modules.append(module)
            self.optimizers.append(spec.torch_optimizer(module.parameters(), self.lr[unit.name]))
        self.done = 0
        self.steps = [0] * len(bundle.units)

    def step(self, i: int) -> float:
        index, epoch, batch = self.plan.item(i)
        feeds = {k: torch.from_numpy(np.asarray(v)).to(self.device)
                 for k, v in self.feeder.feeds(index, epoch, batch).items()}
        module, opt = self.modules[index], self.optimizers[index]
        opt.zero_grad(set_to_none=True)
        for group in opt.param_groups:
            group["lr"] = learning_rate(self.lr[self.bundle.units[index].name], self.config.lr_schedule,
                                        self.steps[index] + 1, self.plan.epochs * self.plan.n_batches)
        loss = unit_loss(self.bundle.units[index].role, module, feeds)
        loss.backward()
        opt.step()
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
