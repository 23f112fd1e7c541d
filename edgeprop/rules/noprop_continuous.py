"""NoProp-CT and NoProp-FM on the device: what each step is fed, and ODE/diffusion inference.

One unit, the network û_θ(z_t, x, t) (with CT's head and learned schedule), trained on one
t ~ U[0, 1] per example. Inference runs its inference graph N times, each a whole step from
t_k = k/N to t_{k+1}, starting from z_0 ~ N(0, I): the schedule maths stays in the graph.
CT's step adds τ·√c·noise, the device feeding τ·noise (τ the inference temperature, as in
NoProp-DT); FM's Euler step is deterministic given z_0.
"""
from __future__ import annotations

import numpy as np

from ..errors import EdgepropError
from ..schedule import MEAN, SAMPLE, check_temperature
from .base import Rule, RunUnit, normalise, padded
from .noprop_dt import nearest_class


class NopropContinuous(Rule):
    flow = False
    eval_options = ("inference_steps",)

    def __init__(self, bundle, data, seed, run_unit=None, state_of=None):
        super().__init__(bundle, data, seed, run_unit, state_of)
        self.embedding = bundle.embedding.astype(np.float32)
        self.steps = int(bundle.manifest["inference"]["steps"])

    def feeds(self, index: int, epoch: int, batch: int) -> dict[str, np.ndarray]:
        idx, mask = self.batch(epoch, batch)
        y = self.y[idx]
        B, d = len(idx), self.embedding.shape[1]
        rng = np.random.default_rng([self.seed, epoch, batch, index])
        t = rng.random((B, 1), dtype=np.float32)
        x = normalise(self.bundle, self.x[idx])
        if self.flow:  # z_t = t u_y + (1 − t) z_0 + σ ε, target u_y − z_0
            u = self.embedding[y]
            z0 = rng.standard_normal((B, d), dtype=np.float32)
            eps = rng.standard_normal((B, d), dtype=np.float32)
            z = t * u + (1 - t) * z0 + np.float32(self.bundle.model["sigma"]) * eps
            return {"x": x, "z": z.astype(np.float32), "time": t, "target": u - z0, "mask": mask}
        # CT: the step graph forms z_t and z_1 from this noise with its learned schedule.
        return {"x": x, "y": self.onehot[y], "time": t, "eps": rng.standard_normal((B, d), dtype=np.float32),
                "eps1": rng.standard_normal((B, d), dtype=np.float32), "mask": mask}

    def evaluate(self, x, y, run_unit: RunUnit, seed: int = 0, runs: int = 1, inference_steps: int | None = None,
                 temperature: float | None = None):
        steps = self.steps if inference_steps is None else int(inference_steps)
        if steps < 1:
            raise EdgepropError("--inference-steps must be at least 1")
        taus = [None]
        if not self.flow:  # CT's diffusion step adds τ·√c·noise; FM's Euler step adds none
            tau = self.bundle.temperature if temperature is None else check_temperature(temperature)
            taus = list(dict.fromkeys([tau, SAMPLE, MEAN]))
        result = {}
        for tau_k in taus:
            accs = [float(np.mean(self.predict(x, run_unit, seed + r, steps, tau_k) == y)) for r in range(runs)]
            result[tau_k] = accs
        report = {"accuracy": float(np.mean(result[taus[0]])), "accuracy_runs": result[taus[0]],
                  "inference_steps": steps}
        if not self.flow:
            report.update(temperature=taus[0], accuracy_sampled=float(np.mean(result[SAMPLE])),
                          accuracy_mean=float(np.mean(result[MEAN])))
            if self.bundle.temperature_note and temperature is None:
                report["temperature_note"] = self.bundle.temperature_note
        return report

    def predict(self, x: np.ndarray, run_unit: RunUnit, seed: int, steps: int, temperature: float | None = None):
        """Classes of raw samples `x`; labels are never an input. CT: each step's added noise
        is scaled by the inference temperature τ (1: the paper's sampling, 0: the mean path)."""
        unit, B, d = self.bundle.units[0], self.bundle.batch_size, self.embedding.shape[1]
        tau = np.float32(SAMPLE if temperature is None else temperature)
        rng = np.random.default_rng([seed, 0xC0F1])
        grid = np.linspace(0, 1, steps + 1, dtype=np.float32)
        preds = []
        for start in range(0, len(x), B):
            xb, n = padded(self.bundle, x[start:start + B])
            z = rng.standard_normal((B, d), dtype=np.float32)
            for t, t_next in zip(grid[:-1], grid[1:]):
                feeds = {"x": xb, "z": z, "time": np.full((B, 1), t), "time_next": np.full((B, 1), t_next)}
                if not self.flow:
                    feeds["noise"] = tau * rng.standard_normal((B, d), dtype=np.float32)
                out = run_unit(unit, feeds)
                z = out["z_next"]
            # CT: the head on z_1 (from the last step); FM: the class embedding nearest z_1.
            preds.append((nearest_class(z, self.embedding) if self.flow else np.argmax(out["logits"], 1))[:n])
        return np.concatenate(preds)


class NopropCT(NopropContinuous):
    flow = False
    eval_options = ("inference_steps", "temperature")


class NopropFM(NopropContinuous):
    flow = True


RULES = {"noprop-ct": NopropCT, "noprop-fm": NopropFM}
