"""NoProp-DT on the device: what each step is fed, and how a trained chain predicts.

T blocks each learn to denoise z_{t-1} ~ q(z_{t-1}|y) towards the clean label embedding u_y;
the head learns p(y | z_T) on z_T ~ q(z_T|y), never on a block's output (docs/noprop.md).
A learned W_embed is one of the head's parameters: every block step and every chain reads
the head's current one (docs/noprop.md, "Learned embeddings").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import prng
from ..schedule import MEAN, SAMPLE, check_temperature
from .base import Rule, RunUnit, normalise, padded


class NopropDT(Rule):
    # Each unit reads the batch, the labels and its own noise: independent within a batch (a
    # learned W_embed is read from the head, which steps last, so every block sees it unchanged).
    batch_feeds = ("x", "mask")

    def __init__(self, bundle, data, seed, run_unit=None, state_of=None):
        super().__init__(bundle, data, seed, run_unit, state_of)
        self.learned = learns_embedding(bundle)
        if self.learned and state_of is None:
            raise ValueError("a learned W_embed is read from the head's state: pass state_of")

    @property
    def embedding(self) -> np.ndarray:
        """W_embed now: the bundle's fixed one, or the head's current learned one."""
        if self.learned:
            return current_embedding(self.bundle, self.state_of(self.bundle.head.name))
        return self.bundle.embedding.astype(np.float32)

    def feeds(self, index: int, epoch: int, batch: int) -> dict[str, np.ndarray]:
        unit = self.bundle.units[index]
        idx, mask = self.batch(epoch, batch)
        y = self.y[idx]
        embedding = self.embedding
        u = embedding[y]
        eps = prng.normal(prng.key(self.seed, prng.NOISE, epoch, batch, index), u.shape)
        sched = self.bundle.schedule
        if unit.role == "block":
            # Block t denoises z_{t-1} ~ q(z_{t-1} | y) towards u_y.
            ab = sched.alpha_bar[unit.t - 1]
            z = (np.sqrt(ab) * u + np.sqrt(1 - ab) * eps).astype(np.float32)
            return {"x": normalise(self.bundle, self.x[idx]), "z": z, "target": u, "mask": mask,
                    "loss_scale": np.array(sched.weights[unit.t - 1], np.float32),
                    **({"embedding": embedding} if self.learned else {}),
                    **self._dropout(epoch, batch, index, len(idx))}
        if self.learned:  # the head's step draws z_T ~ q(z_T | y) from its own W: it is fed ε
            return {"eps": eps, "target": self.onehot[y], "mask": mask}
        # The head learns p(y | z_T) on z_T ~ q(z_T | y): never on a block's output.
        ab = sched.alpha_bar[-1]
        z = (np.sqrt(ab) * u + np.sqrt(1 - ab) * eps).astype(np.float32)
        return {"z": z, "target": self.onehot[y], "mask": mask}

    def _dropout(self, epoch: int, batch: int, index: int, size: int) -> dict[str, np.ndarray]:
        """The block's dropout masks for this step (CNN blocks): 0, or 1/(1-p) for kept units."""
        p = float(self.bundle.model.get("dropout", 0.0))
        masks = {}
        for k, shape in enumerate(self.bundle.model.get("dropout_shapes", [])):
            draw = prng.uniform(prng.key(self.seed, prng.DROPOUT, epoch, batch, index, k), (size, *shape))
            masks[f"drop{k + 1}"] = ((draw >= p) / np.float32(1 - p)).astype(np.float32)
        return masks

    eval_options = ("temperature",)

    def evaluate(self, x, y, run_unit: RunUnit, seed: int = 0, runs: int = 1, temperature: float | None = None) -> dict:
        """Accuracy of the chain at inference temperature τ (the bundle's unless given; 0, the
        mean chain, by default) averaged over `runs`, and beside it the paper's sampled chain
        (τ = 1) and, when τ is not 0, the mean chain; each block's û_t accuracy in every chain;
        block 1's mean probability of the true class (the sampled chain's expected accuracy
        with ideal blocks, research/noprop.md §5)."""
        tau = self.bundle.temperature if temperature is None else check_temperature(temperature)
        chains = {tau_k: {} for tau_k in dict.fromkeys([tau, SAMPLE, MEAN])}  # each τ once
        first_probs = []
        embedding = self.embedding  # the state does not change while evaluating
        for tau_k, result in chains.items():
            accs, block_accs = [], []
            for r in range(runs):
                out = predict(self.bundle, embedding, x, run_unit, seed + r, tau_k)
                accs.append(float(np.mean(out.classes == y)))
                block_accs.append(np.mean(out.block_classes == y[None, :], axis=1))
                if tau_k == tau:  # z_0 and so block 1's û do not depend on τ
                    first_probs.append(float(np.mean(class_probabilities(out.first_u_hat, embedding)[
                        np.arange(len(y)), y])))
            result.update(accuracy=float(np.mean(accs)), runs=accs,
                          per_unit=[round(float(a), 4) for a in np.mean(block_accs, axis=0)])
        main = chains[tau]
        report = {"accuracy": main["accuracy"], "accuracy_runs": main["runs"], "temperature": tau,
                  "per_unit_accuracy": main["per_unit"], "per_unit_note": f"each block's û_t alone, τ {tau:g} chain"}
        for name, tau_k in (("sampled", SAMPLE), ("mean", MEAN)):
            report[f"accuracy_{name}"] = chains[tau_k]["accuracy"]
            report[f"per_unit_accuracy_{name}"] = chains[tau_k]["per_unit"]
        report["block1_true_class_probability"] = float(np.mean(first_probs))
        if self.bundle.temperature_note and temperature is None:
            report["temperature_note"] = self.bundle.temperature_note
        return report


@dataclass
class ChainOutput:
    classes: np.ndarray        # (N,) argmax of the head on z_T
    block_classes: np.ndarray  # (T, N) the class nearest each block's û_t
    logits: np.ndarray         # (N, classes) the head's logits
    first_u_hat: np.ndarray    # (N, d) block 1's û (it sees z_0 only: E[u_y | x] when ideal)


def predict(bundle, embedding: np.ndarray, x: np.ndarray, run_unit: RunUnit, seed: int,
            temperature: float = MEAN) -> ChainOutput:
    """NoProp-DT inference on raw samples `x`; labels are never an input.

    z_0 ~ N(0, I);  z_t = a_t û_t(z_{t-1}, x) + b_t z_{t-1} + τ √c_t ε;  ŷ = argmax head(z_T).
    τ = 1 is the paper's stochastic chain, τ = 0 the mean chain. The noise comes from
    edgeprop.prng (firmware/driver.c draws the same), in the same float rounding as the C.
    """
    B, N, d = bundle.batch_size, len(x), embedding.shape[1]
    tau = check_temperature(temperature)
    learned = {"embedding": embedding} if learns_embedding(bundle) else {}  # blocks read W as an input
    preds, block_preds, logits_all, first = [], [], [], []
    for start in range(0, N, B):
        xb, n = padded(bundle, x[start:start + B])
        z = prng.normal(prng.key(seed, prng.INFERENCE, start // B, 0), (B, d))
        per_block = []
        for unit in bundle.blocks:
            u_hat = run_unit(unit, {"x": xb, "z": z, **learned})["u_hat"]
            if unit.t == 1:
                first.append(u_hat[:n])
            per_block.append(nearest_class(u_hat, embedding)[:n])
            a, b, c = bundle.schedule.coefficients(unit.t)
            eps = prng.normal(prng.key(seed, prng.INFERENCE, start // B, unit.t), (B, d))
            # a û + b z in float32, then + (τ √c) ε in double, rounded to float32 (as driver.c)
            z = (a * u_hat + b * z + (tau * np.sqrt(c)) * eps.astype(np.float64)).astype(np.float32)
        logits = run_unit(bundle.head, {"z": z})["logits"]
        preds.append(np.argmax(logits, axis=1)[:n])
        logits_all.append(logits[:n])
        block_preds.append(np.stack(per_block))
    return ChainOutput(np.concatenate(preds), np.concatenate(block_preds, axis=1), np.concatenate(logits_all),
                       np.concatenate(first))


def learns_embedding(bundle) -> bool:
    return bool(bundle.model.get("learned_embedding"))


def current_embedding(bundle, head_state: dict) -> np.ndarray:
    """The learned W_embed inside the head's flat parameters (a copy: the graphs take their own)."""
    return np.array(bundle.head.unflatten(head_state["param"])["embedding"], np.float32)


def class_probabilities(u_hat: np.ndarray, embedding: np.ndarray) -> np.ndarray:
    """p with û = p · W_embed, for a block's output û: exact for one-hot and orthonormal
    embeddings (W W^T = I), least squares otherwise."""
    return u_hat @ np.linalg.pinv(embedding)


def nearest_class(u_hat: np.ndarray, embedding: np.ndarray) -> np.ndarray:
    d2 = (u_hat ** 2).sum(1, keepdims=True) - 2 * u_hat @ embedding.T + (embedding ** 2).sum(1)
    return np.argmin(d2, axis=1)


RULES = {"noprop-dt": NopropDT}
