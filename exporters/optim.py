"""Optimizers twice over: as pure tensor functions traced into step graphs, and as the
torch.optim classes the eager reference uses. Parity tests hold the two together."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Optimizer:
    name: str = "adamw"          # "adamw" or "sgd" (with momentum); lr is a graph input
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9

    def __post_init__(self):
        if self.name not in ("adamw", "sgd"):
            raise ValueError(f"unknown optimizer {self.name!r} (adamw or sgd)")

    @property
    def slots(self) -> tuple[str, ...]:
        """Per-parameter state tensors, stored as opt.<slot>.<param>."""
        return ("m", "v") if self.name == "adamw" else ("buf",)

    def to_json(self) -> dict:
        return {**asdict(self), "betas": list(self.betas), "slots": list(self.slots)}

    def update(self, p, g, state: dict, lr, step):
        """One step for one tensor: (p', state'). `lr` and `step` (1-based) are graph inputs."""
        if self.name == "adamw":  # torch.optim.AdamW's arithmetic, decoupled decay first
            b1, b2 = self.betas
            p = p * (1 - lr * self.weight_decay)
            m = b1 * state["m"] + (1 - b1) * g
            v = b2 * state["v"] + (1 - b2) * g * g
            bias1 = 1 - torch.pow(torch.tensor(b1), step)
            bias2 = 1 - torch.pow(torch.tensor(b2), step)
            p = p - (lr / bias1) * m / (torch.sqrt(v) / torch.sqrt(bias2) + self.eps)
            return p, {"m": m, "v": v}
        g = g + self.weight_decay * p  # torch.optim.SGD: L2 decay, then heavy-ball momentum
        buf = self.momentum * state["buf"] + g
        return p - lr * buf, {"buf": buf}

    def slots_of(self, torch_opt: torch.optim.Optimizer, param: torch.Tensor) -> dict:
        """This optimizer's state slots for `param`, read out of the torch.optim object."""
        state = torch_opt.state.get(param, {})
        names = {"m": "exp_avg", "v": "exp_avg_sq", "buf": "momentum_buffer"}
        return {s: state[names[s]].detach().cpu().numpy() if names[s] in state
                else torch.zeros_like(param).cpu().numpy() for s in self.slots}

    def torch_optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        if self.name == "adamw":
            return torch.optim.AdamW(params, lr=lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)
