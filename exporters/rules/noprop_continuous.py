"""NoProp-CT and NoProp-FM, desktop side: one network for all times t ∈ [0, 1] (t=0 noise, t=1
clean; docs/noprop.md).

noprop-ct  û_θ(z_t, x, t) = softmax(logits)·W_embed denoises z_t ~ q(z_t|y) = N(√ᾱ_t u_y, (1−ᾱ_t) I)
           under the learned schedule ᾱ_t = sigmoid(−γ(t)) (App. B); jointly with a linear head
           on z_1 ~ q(z_1|y) (Eq. 9 / Alg. 2):
               L = CE(head(z_1), y) + KL(q(z_0|y) ‖ N(0, I)) + η/2 · SNR'(t) · ‖û − u_y‖²
noprop-fm  v_θ(z_t, x, t) = logits·W_embed regresses the flow u_y − z_0 at
           z_t = t u_y + (1−t) z_0 + σ ε (Eq. 10–13 / Alg. 3). W_embed is fixed, so no anchor loss.

Everything the paper trains jointly is one unit ("network"): θ, and for CT the head and the
schedule ψ. The gradient never crosses time: each example's loss sees one t.

Graph inputs. CT's z_t depends on the learned schedule, so its step graph draws z_t and z_1
itself from device noise (eps, eps1); FM's path is fixed, so the device feeds z_t and the
target. The inference graph is one whole step from t to t_next: CT the diffusion step with
the DT-style posterior coefficients from ᾱ(t), ᾱ(t_next) and the head on the result; FM one
Euler step. The device loop is N graph runs and holds no schedule maths.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeprop.errors import EdgepropError
from edgeprop.schedule import MEAN, check_temperature

from ..models import LEARNED, CNNBlock, cross_entropy, label_embedding
from . import Spec, UnitSpec
from .noprop_dt import DEFAULT_WIDTH, model_input_shape

INFERENCE_STEPS = 40   # the paper integrates with 1000; a device can afford fewer (docs/rules.md)
GAMMA_CLEAN = -3.0     # initial γ(1): ᾱ_1 = 0.953 (the paper gives none; see docs/rules.md)
GAMMA_NOISE = 7.0      # initial γ(0): ᾱ_0 = 0.0009
FM_SIGMA = 0.0         # the paper leaves σ open; 0 is the plain rectified flow

OPTIONS = {"inference_steps", "temperature"}  # temperature: noprop-ct only


def _sigmoid(x):
    # Not torch.sigmoid: onnxruntime's Sigmoid approximates, up to 1.7% relative error in the
    # tails (measured), i.e. where ᾱ is small, and the coefficients a, b, c carry that on.
    return 1 / (1 + torch.exp(-x))


def _softplus_inverse(y: float) -> float:
    return math.log(math.expm1(y))


class LearnedSchedule(nn.Module):
    """γ(t) = γ0 + (γ1 − γ0)(1 − γ̄(t)), γ̄(t) = (γ̃(t) − γ̃(0)) / (γ̃(1) − γ̃(0)) (App. B, after VDM).

    γ̃ is a two-layer network with positive weights (softplus of free parameters) and a
    monotone activation, so γ̃ and γ̄ increase; γ1 − γ0 = softplus(·) > 0, so γ decreases
    with t for every parameter value: ᾱ increases and SNR' > 0 by construction (docs/noprop.md, pitfall 1).
    γ(0) = γ1 is the noise end, γ(1) = γ0 the clean end. dγ/dt is written out, so the
    step graph needs no second derivative.

    Times are (B, 1) columns, and nothing differentiated is indexed or split: onnx's shape
    inference (which the memory planner runs) mis-ranks an unsqueezed (B,) vector, and
    leaves the shapes of exported index and split gradients unknown."""

    def __init__(self, hidden: int = 16, gamma_clean: float = GAMMA_CLEAN, gamma_noise: float = GAMMA_NOISE):
        super().__init__()
        self.gamma0 = nn.Parameter(torch.tensor(gamma_clean))
        self.gap = nn.Parameter(torch.tensor(_softplus_inverse(gamma_noise - gamma_clean)))  # γ1 − γ0
        self.w1 = nn.Parameter(torch.randn(hidden))
        self.b1 = nn.Parameter(torch.randn(hidden))
        self.w2 = nn.Parameter(torch.full((hidden,), -2.0))
        self.linear = nn.Parameter(torch.tensor(0.0))  # a linear skip keeps γ̃' > 0 everywhere

    def ends(self):  # γ(0), γ(1): the endpoints need no γ̃
        return self.gamma0 + F.softplus(self.gap), self.gamma0

    def forward(self, t):  # (B, 1) -> γ(t), dγ/dt (B, 1)
        w1, w2, a = F.softplus(self.w1), F.softplus(self.w2), F.softplus(self.linear)

        def tilde(t):  # γ̃(t), γ̃'(t)
            h = _sigmoid(t * w1 + self.b1)
            return a * t + (h * w2).sum(-1, keepdim=True), a + (h * (1 - h) * w1 * w2).sum(-1, keepdim=True)

        (g, dg), (g0, _), (g1, _) = tilde(t), tilde(torch.zeros_like(t[:1])), tilde(torch.ones_like(t[:1]))
        gap = F.softplus(self.gap)
        return self.gamma0 + gap * (1 - (g - g0) / (g1 - g0)), -gap * dg / (g1 - g0)


class TimeEmbedding(nn.Module):
    """Sinusoidal position embedding of t ∈ [0, 1] on DDPM's 1000-step scale."""

    def __init__(self, dim: int = 64):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", 1000.0 * torch.exp(-math.log(10000.0) * torch.arange(half) / half))

    def forward(self, t):  # (B, 1) -> (B, dim)
        angles = t * self.freqs
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class Network(nn.Module):
    """û_θ(z_t, x, t): image path, noisy-label path and time path, joined (docs/noprop.md "Block architecture", no BN).

    forward(x, z, t, t_next[, noise]) is one inference step (the inference graph). A leading
    method name, module("denoise", x, z, t), reaches the other parts: torch.func's
    functional_call, which the step graph is traced through, only ever calls forward."""

    def __init__(self, model: dict, embedding: np.ndarray, flow: bool):
        super().__init__()
        classes, dim = embedding.shape
        width, self.flow = int(model["width"]), flow
        if model["kind"] == "cnn":  # the paper's conv image path, ending FC → ReLU for CT/FM
            self.image = nn.Sequential(*CNNBlock(model["input_shape"], embedding, width).image, nn.ReLU())
        else:
            features = int(np.prod(model["input_shape"]))
            self.image = nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.label = nn.Sequential(nn.Linear(dim, width), nn.ReLU())
        self.time = nn.Sequential(TimeEmbedding(), nn.Linear(64, width), nn.ReLU())
        self.joint = nn.Sequential(nn.Linear(3 * width, width), nn.ReLU(), nn.Linear(width, width // 2), nn.ReLU(),
                                   nn.Linear(width // 2, classes))
        if not flow:
            self.schedule = LearnedSchedule()
            self.head = nn.Linear(dim, classes)
        self.register_buffer("embedding", torch.as_tensor(embedding, dtype=torch.float32))  # fixed

    def forward(self, *args):
        if isinstance(args[0], str):
            return getattr(self, args[0])(*args[1:])
        return self.step(*args)

    def denoise(self, x, z, t):  # CT: û = softmax(logits)·W;  FM: v = logits·W
        logits = self.joint(torch.cat([self.image(x), self.label(z), self.time(t)], dim=-1))
        return (logits if self.flow else torch.softmax(logits, dim=-1)) @ self.embedding

    def alpha_bar(self, t):  # (B, 1) -> ᾱ_t, 1 − ᾱ_t, SNR'(t) (B, 1)
        gamma, dgamma = self.schedule(t)
        return _sigmoid(-gamma), _sigmoid(gamma), -dgamma * torch.exp(-gamma)

    def ends(self):  # ᾱ and 1 − ᾱ at t = 0 and t = 1
        noisy, clean = self.schedule.ends()
        return _sigmoid(-noisy), _sigmoid(noisy), _sigmoid(-clean), _sigmoid(clean)

    def step(self, x, z, t, t_next, noise=None):
        """One inference step from t to t_next (both (B, 1), t_next > t)."""
        if self.flow:  # Euler: z + (t_next − t) v
            return z + (t_next - t) * self.denoise(x, z, t)
        u_hat = self.denoise(x, z, t)
        ab_s, one_minus_s, _ = self.alpha_bar(t)        # ᾱ_{t-1} of the DT coefficients
        ab_t, one_minus_t, _ = self.alpha_bar(t_next)   # ᾱ_t
        alpha = ab_s / ab_t
        a = torch.sqrt(ab_t) * (1 - alpha) / one_minus_s
        b = torch.sqrt(alpha) * one_minus_t / one_minus_s
        c = one_minus_t * (1 - alpha) / one_minus_s
        z_next = a * u_hat + b * z + torch.sqrt(c) * noise
        return z_next, self.head(z_next), u_hat


class NopropContinuous:
    def __init__(self, model: dict, embedding: np.ndarray, flow: bool):
        self.model, self.embedding, self.flow = model, embedding, flow

    def module(self, unit):
        return Network(self.model, self.embedding, self.flow)

    def _examples(self, batch):  # example inputs of (the inference graph, the step graph)
        g = torch.Generator().manual_seed(0)
        classes, dim = self.embedding.shape
        r = {"x": torch.randn(batch, *self.model["input_shape"], generator=g),
             "z": torch.randn(batch, dim, generator=g), "time": torch.rand(batch, 1, generator=g),
             "noise": torch.randn(batch, dim, generator=g)}
        r["time_next"] = (r["time"] + 0.1).clamp(max=1.0)
        y = torch.eye(classes)[torch.arange(batch) % classes]
        if self.flow:
            return r, {"x": r["x"], "z": r["z"], "time": r["time"], "target": torch.randn(batch, dim, generator=g),
                       "mask": torch.ones(batch)}
        return r, {"x": r["x"], "y": y, "time": r["time"], "eps": r["z"], "eps1": r["noise"], "mask": torch.ones(batch)}

    def step_inputs(self, unit, batch):
        return self._examples(batch)[1]

    def infer_inputs(self, unit, batch):
        r = self._examples(batch)[0]
        return {k: r[k] for k in ("x", "z", "time", "time_next", *(() if self.flow else ("noise",)))}

    def infer_outputs(self, unit):
        return ["z_next"] if self.flow else ["z_next", "logits", "u_hat"]

    def loss(self, unit, module, feeds):
        mask = feeds["mask"]

        def mean(per_sample):  # over the real samples of the batch
            return (per_sample * mask).sum() / mask.sum().clamp(min=1.0)

        if self.flow:  # ‖v_θ(z_t, x, t) − (u_y − z_0)‖², summed over d (docs/noprop.md, pitfall 3)
            v = module("denoise", feeds["x"], feeds["z"], feeds["time"])
            return mean(((v - feeds["target"]) ** 2).sum(-1)), {}
        y, t = feeds["y"], feeds["time"]
        u = y @ torch.as_tensor(self.embedding)
        ab, one_minus, snr_prime = module("alpha_bar", t)
        z_t = torch.sqrt(ab) * u + torch.sqrt(one_minus) * feeds["eps"]  # reparameterised: ψ learns through it
        u_hat = module("denoise", feeds["x"], z_t, t)
        l2 = 0.5 * self.model["eta"] * snr_prime[:, 0] * ((u_hat - u) ** 2).sum(-1)
        ab_0, one_minus_0, ab_1, one_minus_1 = module("ends")
        # The head reads z_1 ~ q(z_1|y), never the network's output (docs/noprop.md, pitfall 5).
        z_1 = torch.sqrt(ab_1) * u + torch.sqrt(one_minus_1) * feeds["eps1"]
        ce = cross_entropy(module("head", z_1), y, mask)
        d = u.shape[-1]
        kl = 0.5 * (ab_0 * ((u ** 2).sum(-1) - d) - d * torch.log(one_minus_0))  # KL(q(z_0|y) ‖ N(0, I))
        return ce + mean(kl) + mean(l2), {}


def create(o, train) -> Spec:
    flow = o.rule == "noprop-fm"
    if not isinstance(o.model, str) or o.model not in DEFAULT_WIDTH:
        raise EdgepropError(f"--rule {o.rule}: --model must be one of {', '.join(DEFAULT_WIDTH)}")
    width = DEFAULT_WIDTH[o.model] if o.width is None else o.width
    steps = int(o.extra.get("inference_steps", INFERENCE_STEPS))
    if width < 2 or steps < 1:
        raise EdgepropError("--width must be at least 2 and --inference-steps at least 1")
    classes = int(train.y.max()) + 1
    try:
        if o.embedding in LEARNED:
            raise EdgepropError(f"--embedding {o.embedding}: learned embeddings train with NoProp-DT's head; "
                                f"--rule {o.rule} takes one-hot or orthogonal")
        emb = label_embedding(o.embedding, classes, o.embed_dim, o.seed)
    except ValueError as e:
        raise EdgepropError(str(e)) from None
    model = {"kind": o.model, "input_shape": model_input_shape(o.model, train.x.shape[1:]), "num_classes": classes,
             "embed_dim": int(emb.shape[1]), "embedding": o.embedding, "width": width}
    model.update({"sigma": FM_SIGMA} if flow else {"eta": float(o.eta)})
    rule = NopropContinuous(model, emb, flow)
    torch.manual_seed(o.seed)
    unit = UnitSpec("network", "network", "network", rule.module(None), o.lr)
    inference = {"steps": steps}
    if flow and "temperature" in o.extra:
        raise EdgepropError("--rule noprop-fm takes no --temperature: its Euler steps add no noise to scale")
    if not flow:  # the scale of the noise each diffusion step adds at inference; 0 by default, as NoProp-DT
        inference["temperature"] = check_temperature(o.extra.get("temperature", MEAN))
    return Spec(rule, model, [unit], manifest={"inference": inference}, arrays={"embedding": emb})


def from_bundle(bundle) -> NopropContinuous:
    return NopropContinuous(bundle.model, bundle.embedding, bundle.rule == "noprop-fm")
