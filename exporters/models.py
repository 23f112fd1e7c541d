"""NoProp-DT's networks in torch (desktop side): T independent blocks and a classifier head.

A block sees the input x and a noisy label embedding z_{t-1} and predicts the clean
embedding as a convex combination of class embeddings, û = softmax(logits) · W_embed
(research/noprop.md §4.4). Every block has its own input encoder: no shared trunk (§4.7).
"""
from __future__ import annotations

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


class CNNBlock(nn.Module):
    """One NoProp-DT block for images (C, H, W): the paper's block without its BatchNorm
    (research/noprop.md, "Block architecture"; the CT/FM block has none either).

    image  conv32 3x3, ReLU, maxpool 2, drop, conv64 3x3, ReLU, drop, conv128 3x3, ReLU,
           maxpool 2, drop, FC256
    label  FC256, ReLU, then [FC256, ReLU, FC256] with a skip connection
    joint  FC256, ReLU, FC128, ReLU, FC(classes) on the concatenation, then softmax · W_embed

    The paper's convolutions are unpadded (28x28 -> 4x4x128 = 2048 features, 0.92M
    parameters per block); images under 14 pixels (8x8 digits) would shrink to nothing, so
    they get padding 1 instead.

    Dropout is a product with mask inputs (0 or 1/(1-p), one per dropout site): the device
    draws them from a seeded generator and feeds the step graph, so a graph stays a pure
    function and the torch reference takes the very same masks. Without masks (inference,
    or dropout 0) the block runs as in eval mode.
    """

    DROP_AFTER = (2, 4, 7)  # image-path layers followed by dropout: after pool 1, conv64's ReLU, pool 2

    def __init__(self, image_shape: list[int], embedding: np.ndarray, width: int = 256):
        super().__init__()
        num_classes, embed_dim = embedding.shape
        channels, h, w = image_shape
        pad = 0 if min(h, w) >= 14 else 1
        self.image = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=pad), nn.ReLU(),
            nn.Conv2d(64, 128, 3, padding=pad), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        with torch.no_grad():
            features = self.image(torch.zeros(1, channels, h, w)).shape[1]
        self.image.append(nn.Linear(features, width))
        self.label = nn.Sequential(nn.Linear(embed_dim, width), nn.ReLU())
        self.label_skip = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        self.joint = nn.Sequential(nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, width // 2), nn.ReLU(),
                                   nn.Linear(width // 2, num_classes))
        self.register_buffer("embedding", torch.as_tensor(embedding, dtype=torch.float32))

    def dropout_shapes(self, image_shape: list[int]) -> list[list[int]]:
        """Each dropout mask's shape for one sample."""
        shapes, h = [], torch.zeros(1, *image_shape)
        with torch.no_grad():
            for i, layer in enumerate(self.image):
                h = layer(h)
                if i in self.DROP_AFTER:
                    shapes.append(list(h.shape[1:]))
        return shapes

    def forward(self, x: torch.Tensor, z: torch.Tensor, *masks: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W), (B, d), dropout masks -> (B, d)
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
        return CNNBlock(model["input_shape"], embedding, int(model["width"]))
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
    """Block t's loss: w_t · mean over real samples of ||û − u_y||², summed over d (§4.3)."""
    per_sample = ((u_hat - target) ** 2).sum(dim=-1)
    return scale * (per_sample * mask).sum() / mask.sum().clamp(min=1.0)


def cross_entropy(logits, onehot, mask):
    """Cross-entropy from elementary ops: F.cross_entropy's exported backward loses the mean (DESIGN.md)."""
    shift = logits.amax(dim=-1, keepdim=True).detach()
    log_z = torch.log(torch.exp(logits - shift).sum(dim=-1)) + shift.squeeze(-1)
    per_sample = log_z - (onehot * logits).sum(dim=-1)
    return (per_sample * mask).sum() / mask.sum().clamp(min=1.0)


class Chain(nn.Module):
    """The whole NoProp-DT network as one model, for end-to-end back-prop comparisons: the
    inference chain z_t = a_t û_t(x, z_{t-1}) + b_t z_{t-1} + √c_t ε_t, then the head."""

    def __init__(self, blocks: list[nn.Module], head: nn.Module, coefficients: list[tuple[float, float, float]]):
        super().__init__()
        self.blocks, self.head, self.coefficients = nn.ModuleList(blocks), head, coefficients

    def forward(self, x: torch.Tensor, z: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:  # noise (T, B, d)
        for block, (a, b, c), eps in zip(self.blocks, self.coefficients, noise):
            z = a * block(x, z) + b * z + c ** 0.5 * eps
        return self.head(z)
