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


class MLPBlock(nn.Module):
    """One NoProp-DT block for flat inputs."""

    def __init__(self, in_features: int, embedding: np.ndarray, width: int = 128):
        super().__init__()
        num_classes, embed_dim = embedding.shape
        self.image = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.label = nn.Sequential(nn.Linear(embed_dim, width), nn.ReLU())
        self.joint = nn.Sequential(nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, num_classes))
        # Fixed, not trained: baked into the graphs as a constant.
        self.register_buffer("embedding", torch.as_tensor(embedding, dtype=torch.float32))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # (B, F), (B, d) -> (B, d)
        logits = self.joint(torch.cat([self.image(x), self.label(z)], dim=-1))
        return torch.softmax(logits, dim=-1) @ self.embedding


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


class CNNBlock(nn.Module):
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

    def __init__(self, image_shape: list[int], embedding: np.ndarray, width: int = 256, batchnorm: bool = False):
        super().__init__()
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
        self.register_buffer("embedding", torch.as_tensor(embedding, dtype=torch.float32))

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
        """(B, C, H, W), (B, d), [BatchNorm's running statistics,] dropout masks -> (B, d).
        With BatchNorm, a sample `mask` means training: batch statistics over the real
        samples, and the output is (û, updated statistics)."""
        if not self.batchnorm:
            return self._forward(x, z, rest)
        with running_stats(rest[0], mask) as run:
            u_hat = self._forward(x, z, rest[1:])
        return u_hat if mask is None else (u_hat, run.updated())

    def _forward(self, x, z, masks):
        h, drops = x, iter(masks)
        for i, layer in enumerate(self.image):
            h = layer(h)
            if masks and i in self.DROP_AFTER:
                h = h * next(drops)
        label = self.label(z)
        logits = self.joint(torch.cat([h, label + self.label_skip(label)], dim=-1))
        return torch.softmax(logits, dim=-1) @ self.embedding


MODELS = ("mlp", "cnn")


class Head(nn.Module):
    """p̂(y | z_T): a linear classifier on the clean-end latent."""

    def __init__(self, embedding: np.ndarray):
        super().__init__()
        num_classes, embed_dim = embedding.shape
        self.linear = nn.Linear(embed_dim, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, classes)
        return self.linear(z)


def build_unit(model: dict, role: str, embedding: np.ndarray) -> nn.Module:
    """The torch module of one unit, from the manifest's model description."""
    if role == "head":
        return Head(embedding)
    if model["kind"] == "cnn":
        return CNNBlock(model["input_shape"], embedding, int(model["width"]), bool(model.get("batchnorm")))
    if model["kind"] != "mlp":
        raise ValueError(f"unknown model kind {model['kind']!r}")
    return MLPBlock(int(np.prod(model["input_shape"])), embedding, int(model["width"]))


def label_embedding(kind: str, num_classes: int, dim: int | None, seed: int) -> np.ndarray:
    """Fixed W_embed (classes × d): one-hot (d = classes) or orthonormal rows (d ≥ classes)."""
    if kind == "one-hot":
        return np.eye(num_classes, dtype=np.float32)
    if kind == "orthogonal":
        dim = dim or num_classes
        if dim < num_classes:
            raise ValueError(f"an orthogonal embedding needs --embed-dim ≥ {num_classes} classes, got {dim}")
        q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, num_classes)))
        return q.T.astype(np.float32)
    raise ValueError(f"unknown embedding {kind!r} (one-hot or orthogonal)")


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
        for block, (a, b, c), eps, stats in zip(self.blocks, self.coefficients, noise, self.stats):
            u_hat = block(x, z) if stats is None else block(x, z, stats)
            z = a * u_hat + b * z + (tau * c ** 0.5) * eps
        return self.head(z)
