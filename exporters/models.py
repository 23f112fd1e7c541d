"""NoProp-DT's networks in torch (desktop side): T independent blocks and a classifier head.

A block sees the input x and a noisy label embedding z_{t-1} and predicts the clean
embedding as a convex combination of class embeddings, û = softmax(logits) · W_embed
(docs/noprop.md, pitfall 4). Every block has its own input encoder: no shared trunk (pitfall 7).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn


class Embedding(nn.Module):
    """W_embed as a block reads it. Fixed (one-hot, orthogonal): a buffer, baked into the
    graphs as a constant. Learned (the head trains it): `learned=True`, and the block takes
    the current W as its input after z, so its graphs read whatever the head holds now."""

    def __init__(self, embedding: np.ndarray, learned: bool = False):
        super().__init__()
        self.learned = learned
        self.register_buffer("embedding", torch.as_tensor(embedding, dtype=torch.float32))

    def split(self, rest: tuple) -> tuple[torch.Tensor, tuple]:
        """(W, the remaining inputs) from a block's inputs after z."""
        return (rest[0], rest[1:]) if self.learned else (self.embedding, rest)


class MLPBlock(Embedding):
    """One NoProp-DT block for flat inputs."""

    def __init__(self, in_features: int, embedding: np.ndarray, width: int = 128, learned: bool = False):
        super().__init__(embedding, learned)
        num_classes, embed_dim = embedding.shape
        self.image = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.label = nn.Sequential(nn.Linear(embed_dim, width), nn.ReLU())
        self.joint = nn.Sequential(nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor, z: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        """(B, F), (B, d)[, W (classes, d) when learned] -> (B, d)"""
        embedding, _ = self.split(rest)
        logits = self.joint(torch.cat([self.image(x), self.label(z)], dim=-1))
        return torch.softmax(logits, dim=-1) @ embedding


class RunningStats:
    """A unit's BatchNorm running statistics for one forward pass: one flat buffer (a graph
    input, "stats"), read layer by layer in order; in training the updated statistics are
    collected (the step graph's output "next.stats"). Training is recognised by a sample
    mask: batch statistics then skip the padding of a last, partial batch."""

    def __init__(self, stats: torch.Tensor, mask: torch.Tensor | None):
        self.stats, self.mask, self.offset, self.new = stats, mask, 0, []

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = self.stats[self.offset:self.offset + n], self.stats[self.offset + n:self.offset + 2 * n]
        self.offset += 2 * n
        return mean, var

    def updated(self) -> torch.Tensor:
        if self.offset != len(self.stats):
            raise RuntimeError(f"BatchNorm layers read {self.offset} running statistics of {len(self.stats)}")
        return torch.cat(self.new)


_RUNNING: list[RunningStats] = []  # the forward pass in progress (a stack: one per block call)


@contextlib.contextmanager
def running_stats(stats: torch.Tensor, mask: torch.Tensor | None = None):
    _RUNNING.append(RunningStats(stats, mask))
    try:
        yield _RUNNING[-1]
    finally:
        _RUNNING.pop()


class MaskedBatchNorm(nn.Module):
    """BatchNorm1d (torch's defaults: momentum 0.1, eps 1e-5, unbiased running variance)
    whose running statistics are state, not buffers: they arrive and leave through
    running_stats(), so a step graph takes them as an input and returns them updated, like
    optimizer slots. Padded samples (mask 0) count in neither the batch statistics nor the
    running ones. With every mask 1 it is exactly torch's BatchNorm1d (tested)."""

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.features, self.momentum, self.eps = features, momentum, eps
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, features)
        if not _RUNNING:
            raise RuntimeError("MaskedBatchNorm runs inside running_stats(...): its statistics are state")
        run = _RUNNING[-1]
        running_mean, running_var = run.take(self.features)
        if run.mask is None:  # inference: the running statistics
            mean, var = running_mean, running_var
        else:
            m = run.mask[:, None]
            count = m.sum()
            mean = (h * m).sum(0) / count
            var = ((h - mean) ** 2 * m).sum(0) / count
            unbiased = var * count / (count - 1).clamp(min=1.0)  # one real sample: no spread to learn from
            run.new += [(1 - self.momentum) * running_mean + self.momentum * mean.detach(),
                        (1 - self.momentum) * running_var + self.momentum * unbiased.detach()]
        return (h - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


def initial_stats(module: nn.Module) -> np.ndarray:
    """Running statistics before training (mean 0, variance 1), laid out as the layers read them."""
    parts = [np.concatenate([np.zeros(bn.features), np.ones(bn.features)])
             for bn in module.modules() if isinstance(bn, MaskedBatchNorm)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


class CNNBlock(Embedding):
    """One NoProp-DT block for images (C, H, W): the paper's block (docs/noprop.md,
    "Block architecture"), its BatchNorm layers (BN) with `batchnorm`:

    image  conv32 3x3, ReLU, maxpool 2, drop, conv64 3x3, ReLU, drop, conv128 3x3, ReLU,
           maxpool 2, drop, FC256, BN
    label  FC256, BN, ReLU, then [FC256, BN, ReLU, FC256, BN] with a skip connection
    joint  FC256, BN, ReLU, FC128, BN, ReLU, FC(classes) on the concatenation, then softmax · W_embed

    BatchNorm's running statistics are a third kind of unit state (beside the weights and
    the optimizer slots): a flat input "stats" that a step returns updated as "next.stats".

    The paper's convolutions are unpadded (28x28 -> 4x4x128 = 2048 features, 0.92M
    parameters per block); images under 14 pixels (8x8 digits) would shrink to nothing, so
    they get padding 1 instead.

    Dropout is a product with mask inputs (0 or 1/(1-p), one per dropout site): the device
    draws them from a seeded generator and feeds the step graph, so a graph stays a pure
    function and the torch reference takes the very same masks. Without masks (inference,
    or dropout 0) the block runs as in eval mode.
    """

    DROP_AFTER = (2, 4, 7)  # image-path layers followed by dropout: after pool 1, conv64's ReLU, pool 2

    def __init__(self, image_shape: list[int], embedding: np.ndarray, width: int = 256, batchnorm: bool = False,
                 learned: bool = False):
        super().__init__(embedding, learned)
        num_classes, embed_dim = embedding.shape
        channels, h, w = image_shape
        self.batchnorm = batchnorm

        def linear_bn(n_in, n_out):
            """A linear layer with the paper's BatchNorm after it. Its bias would be redundant
            (BatchNorm subtracts the mean): its true gradient is 0, and AdamW would turn the
            float noise of that 0 into full ±lr steps, differently on every engine."""
            if not batchnorm:
                return [nn.Linear(n_in, n_out)]
            return [nn.Linear(n_in, n_out, bias=False), MaskedBatchNorm(n_out)]
        pad = 0 if min(h, w) >= 14 else 1
        self.image = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=pad), nn.ReLU(),
            nn.Conv2d(64, 128, 3, padding=pad), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        with torch.no_grad():
            features = self.image(torch.zeros(1, channels, h, w)).shape[1]
        self.image.extend(linear_bn(features, width))
        self.label = nn.Sequential(*linear_bn(embed_dim, width), nn.ReLU())
        self.label_skip = nn.Sequential(*linear_bn(width, width), nn.ReLU(), *linear_bn(width, width))
        self.joint = nn.Sequential(*linear_bn(2 * width, width), nn.ReLU(), *linear_bn(width, width // 2), nn.ReLU(),
                                   nn.Linear(width // 2, num_classes))

    def dropout_shapes(self, image_shape: list[int]) -> list[list[int]]:
        """Each dropout mask's shape for one sample."""
        shapes, h = [], torch.zeros(1, *image_shape)
        with torch.no_grad():
            for i, layer in enumerate(self.image[:max(self.DROP_AFTER) + 1]):
                h = layer(h)
                if i in self.DROP_AFTER:
                    shapes.append(list(h.shape[1:]))
        return shapes

    def forward(self, x: torch.Tensor, z: torch.Tensor, *rest: torch.Tensor, mask=None):
        """(B, C, H, W), (B, d), [W when learned,] [BatchNorm's running statistics,] dropout
        masks -> (B, d). With BatchNorm, a sample `mask` means training: batch statistics over
        the real samples, and the output is (û, updated statistics)."""
        embedding, rest = self.split(rest)
        if not self.batchnorm:
            return self._forward(x, z, embedding, rest)
        with running_stats(rest[0], mask) as run:
            u_hat = self._forward(x, z, embedding, rest[1:])
        return u_hat if mask is None else (u_hat, run.updated())

    def _forward(self, x, z, embedding, masks):
        h, drops = x, iter(masks)
        for i, layer in enumerate(self.image):
            h = layer(h)
            if masks and i in self.DROP_AFTER:
                h = h * next(drops)
        label = self.label(z)
        logits = self.joint(torch.cat([h, label + self.label_skip(label)], dim=-1))
        return torch.softmax(logits, dim=-1) @ embedding


MODELS = ("mlp", "cnn")


class Head(nn.Module):
    """p̂(y | z_T): a linear classifier on the clean-end latent."""

    def __init__(self, embedding: np.ndarray):
        super().__init__()
        num_classes, embed_dim = embedding.shape
        self.linear = nn.Linear(embed_dim, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, classes)
        return self.linear(z)


class LearnedHead(Head):
    """The head when W_embed is learned (the paper's Alg. 1): W is one of its parameters, and
    its step trains both on the two terms of the NoProp-DT objective that touch W but no block,
    CE(head(z_T)) with z_T ~ q(z_T | y) drawn from the current W, and KL(q(z_0 | y) || N(0, I)).
    The CE term keeps the class embeddings apart (they would collapse otherwise). Inference is
    the plain head: logits of z."""

    def __init__(self, embedding: np.ndarray, alpha_bar_first: float, alpha_bar_last: float):
        super().__init__(embedding)
        self.embedding = nn.Parameter(torch.as_tensor(embedding, dtype=torch.float32).clone())
        self.alpha_bar_first, self.alpha_bar_last = float(alpha_bar_first), float(alpha_bar_last)

    def forward(self, z: torch.Tensor, target: torch.Tensor | None = None):
        """z (B, d) -> logits; in a step, z is the noise ε and `target` the one-hot labels:
        -> (logits of z_T = √ᾱ_T u_y + √(1-ᾱ_T) ε, KL term per sample)."""
        if target is None:
            return self.linear(z)
        u = target @ self.embedding
        ab, d = self.alpha_bar_last, u.shape[1]
        z_last = ab ** 0.5 * u + (1 - ab) ** 0.5 * z
        a0 = self.alpha_bar_first  # KL(N(√ᾱ_0 u, (1-ᾱ_0) I) || N(0, I)), Eq. 8
        kl = 0.5 * (a0 * (u ** 2).sum(dim=-1) - d * a0 - d * float(np.log1p(-a0)))
        return self.linear(z_last), kl


def build_unit(model: dict, role: str, embedding: np.ndarray, alpha_bar: tuple[float, float] | None = None
               ) -> nn.Module:
    """The torch module of one unit, from the manifest's model description. `alpha_bar`:
    the schedule's (ᾱ_0, ᾱ_T), which a head that learns W_embed needs."""
    learned = bool(model.get("learned_embedding"))
    if role == "head":
        return LearnedHead(embedding, *alpha_bar) if learned else Head(embedding)
    if model["kind"] == "cnn":
        return CNNBlock(model["input_shape"], embedding, int(model["width"]), bool(model.get("batchnorm")), learned)
    if model["kind"] != "mlp":
        raise ValueError(f"unknown model kind {model['kind']!r}")
    return MLPBlock(int(np.prod(model["input_shape"])), embedding, int(model["width"]), learned)


EMBEDDINGS = ("one-hot", "orthogonal", "learned", "prototype")
LEARNED = ("learned", "prototype")  # trained with the head (NoProp-DT)
LEARNED_DIM = 20  # the paper's learned embedding


def label_embedding(kind: str, num_classes: int, dim: int | None, seed: int, images: np.ndarray | None = None,
                    labels: np.ndarray | None = None) -> np.ndarray:
    """W_embed (classes × d) as it starts: one-hot (d = classes, fixed), orthonormal rows
    (d ≥ classes, fixed), learned (d = 20 unless given; orthonormal rows, or random where
    d < classes, as the paper), or prototype (d = the input size: per class, the normalised
    training image with the smallest median distance to the others of its class)."""
    if kind == "one-hot":
        return np.eye(num_classes, dtype=np.float32)
    if kind in ("orthogonal", "learned"):
        dim = dim or (LEARNED_DIM if kind == "learned" else num_classes)
        rng = np.random.default_rng(seed)
        if dim < num_classes:
            if kind == "orthogonal":
                raise ValueError(f"an orthogonal embedding needs --embed-dim ≥ {num_classes} classes, got {dim}")
            return (rng.standard_normal((num_classes, dim)) / np.sqrt(dim)).astype(np.float32)
        q, _ = np.linalg.qr(rng.standard_normal((dim, num_classes)))
        return q.T.astype(np.float32)
    if kind == "prototype":
        if dim is not None:
            raise ValueError("a prototype embedding is image-sized: --embed-dim does not apply")
        return prototypes(images, labels, num_classes, seed)
    raise ValueError(f"unknown embedding {kind!r} ({', '.join(EMBEDDINGS)})")


def input_norm(x: np.ndarray) -> dict:
    """The bundle's input normalisation: the training data's mean and std (the device applies it)."""
    return {"mean": float(x.mean(dtype=np.float64)), "std": float(x.std(dtype=np.float64)) or 1.0}


PROTOTYPE_CANDIDATES = 1000  # per class: the median distances cost O(n²)


def prototypes(images: np.ndarray, labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """Per class, the image (flattened, normalised) whose median distance to the other
    images of its class is smallest, among up to PROTOTYPE_CANDIDATES of them."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) == 0:
            raise ValueError(f"a prototype embedding needs images of every class; class {c} has none")
        if len(members) > PROTOTYPE_CANDIDATES:
            members = rng.choice(members, PROTOTYPE_CANDIDATES, replace=False)
        x = images[members].reshape(len(members), -1).astype(np.float64)
        sq = (x ** 2).sum(1)
        dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0))
        rows.append(x[np.argmin(np.median(dist, axis=1))])
    return np.stack(rows).astype(np.float32)


def denoise_loss(u_hat, target, mask, scale):
    """Block t's loss: w_t · mean over real samples of ||û − u_y||², summed over d (docs/noprop.md, pitfall 3)."""
    per_sample = ((u_hat - target) ** 2).sum(dim=-1)
    return scale * (per_sample * mask).sum() / mask.sum().clamp(min=1.0)


def cross_entropy(logits, onehot, mask):
    """Cross-entropy from elementary ops: F.cross_entropy's exported backward loses the mean (docs/architecture.md)."""
    shift = logits.amax(dim=-1, keepdim=True).detach()
    log_z = torch.log(torch.exp(logits - shift).sum(dim=-1)) + shift.squeeze(-1)
    per_sample = log_z - (onehot * logits).sum(dim=-1)
    return (per_sample * mask).sum() / mask.sum().clamp(min=1.0)


class Chain(nn.Module):
    """The whole NoProp-DT network as one model: the inference chain
    z_t = a_t û_t(x, z_{t-1}) + b_t z_{t-1} + τ √c_t ε_t, then the head. τ is the inference
    temperature (0: the mean chain, edgeprop's default; 1: the paper's sampled chain). The
    torch twin of edgeprop.rules.noprop_dt.predict (parity-tested), and the model of
    end-to-end back-prop comparisons. `stats`: each block's BatchNorm running statistics
    (CNN blocks exported with --batchnorm), None for blocks without."""

    def __init__(self, blocks: list[nn.Module], head: nn.Module, coefficients: list[tuple[float, float, float]],
                 temperature: float = 0.0, stats: list[torch.Tensor | None] | None = None):
        super().__init__()
        self.blocks, self.head, self.coefficients = nn.ModuleList(blocks), head, coefficients
        self.temperature = temperature
        self.stats = stats or [None] * len(blocks)

    def forward(self, x: torch.Tensor, z: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:  # noise (T, B, d)
        tau = self.temperature
        # A learned W_embed is the head's: each block reads the current one
        learned = (self.head.embedding,) if isinstance(self.head, LearnedHead) else ()
        for block, (a, b, c), eps, stats in zip(self.blocks, self.coefficients, noise, self.stats):
            u_hat = block(x, z, *learned) if stats is None else block(x, z, *learned, stats)
            z = a * u_hat + b * z + (tau * c ** 0.5) * eps
        return self.head(z)
