"""NoProp-DT, desktop side: T denoising blocks and a linear head (models.py holds the networks)."""
from __future__ import annotations

import numpy as np
import torch

from edgeprop.errors import EdgepropError
from edgeprop.schedule import MEAN, NoiseSchedule, check_temperature

from ..models import LEARNED, build_unit, cross_entropy, denoise_loss, initial_stats, input_norm, label_embedding
from . import Spec, UnitSpec

DEFAULT_WIDTH = {"mlp": 128, "cnn": 256}
DEFAULT_DROPOUT = {"mlp": 0.0, "cnn": 0.2}  # the paper's image path: dropout 0.2 after each conv stage
OPTIONS = {"dropout", "batchnorm", "temperature"}
DEFAULT_BATCH = 128  # the paper's (all its runs); other rules export at 64


def model_input_shape(model: str, sample_shape: tuple[int, ...]) -> list[int]:
    """The model's input: flat for the MLP; (channels, height, width) for the CNN, taking
    (H, W) images as one channel and flat square samples (8x8 digits) as square images."""
    if model == "mlp":
        return [int(np.prod(sample_shape))]
    if len(sample_shape) == 3:
        return [int(s) for s in sample_shape]
    if len(sample_shape) == 2:
        return [1, int(sample_shape[0]), int(sample_shape[1])]
    side = int(round(np.sqrt(sample_shape[0]))) if len(sample_shape) == 1 else 0
    if side * side != int(np.prod(sample_shape)):
        raise EdgepropError(f"--model cnn needs images; samples have shape {list(sample_shape)}")
    return [1, side, side]


class NopropDT:
    def __init__(self, model: dict, embedding: np.ndarray, alpha_bar: tuple[float, float]):
        self.model, self.embedding, self.alpha_bar = model, embedding, alpha_bar  # alpha_bar: (ᾱ_0, ᾱ_T)
        self.learned = bool(model.get("learned_embedding"))

    def module(self, unit):
        return build_unit(self.model, unit.role, self.embedding, self.alpha_bar)

    def _examples(self, unit, batch):
        g = torch.Generator().manual_seed(0)
        classes, dim = self.embedding.shape
        mask = torch.ones(batch)
        if unit.role == "head":  # learned W_embed: the step draws z_T itself from ε and the labels
            return {("eps" if self.learned else "z"): torch.randn(batch, dim, generator=g),
                    "target": torch.eye(classes)[torch.arange(batch) % classes], "mask": mask}
        keep = 1.0 - self.model.get("dropout", 0.0)
        drops = {f"drop{k + 1}": torch.full((batch, *shape), 1.0 / keep)
                 for k, shape in enumerate(self.model.get("dropout_shapes", []))}
        # BatchNorm's running statistics as they start (the unit's own module: building one per trace is slow)
        stats = {"stats": torch.from_numpy(initial_stats(unit.module))} if self.model.get("batchnorm") else {}
        embedding = {"embedding": torch.as_tensor(self.embedding)} if self.learned else {}
        return {"x": torch.randn(batch, *self.model["input_shape"], generator=g),
                "z": torch.randn(batch, dim, generator=g), **embedding, **stats,
                "target": torch.randn(batch, dim, generator=g), "mask": mask, "loss_scale": torch.tensor(1.0), **drops}

    def step_inputs(self, unit, batch):
        return self._examples(unit, batch)

    def infer_inputs(self, unit, batch):
        if unit.role == "head":
            return {"z": torch.randn(batch, self.embedding.shape[1], generator=torch.Generator().manual_seed(0))}
        names = ("x", "z", "embedding", "stats")
        return {k: v for k, v in self._examples(unit, batch).items() if k in names}

    def infer_outputs(self, unit):
        return ["logits"] if unit.role == "head" else ["u_hat"]

    def loss(self, unit, module, feeds):
        mask = feeds["mask"]
        if unit.role == "head" and self.learned:  # CE on z_T ~ q(z_T | y) and KL: they train the head and W
            logits, kl = module(feeds["eps"], feeds["target"])
            return cross_entropy(logits, feeds["target"], mask) + (kl * mask).sum() / mask.sum().clamp(min=1.0), {}
        if unit.role == "head":
            return cross_entropy(module(feeds["z"]), feeds["target"], mask), {}
        drops = [feeds[k] for k in sorted(feeds) if k.startswith("drop")]
        inputs = [feeds["x"], feeds["z"], *([feeds["embedding"]] if self.learned else [])]
        if "stats" not in feeds:
            u_hat, extras = module(*inputs, *drops), {}
        else:  # BatchNorm: its running statistics go in and come out updated, as unit state
            u_hat, stats = module(*inputs, feeds["stats"], *drops, mask=mask)
            extras = {"next.stats": stats}
        return denoise_loss(u_hat, feeds["target"], mask, feeds["loss_scale"]), extras


def create(o, train) -> Spec:
    if not isinstance(o.model, str) or o.model not in DEFAULT_WIDTH:
        raise EdgepropError(f"--rule noprop-dt: --model must be one of {', '.join(DEFAULT_WIDTH)}")
    blocks = 10 if o.blocks is None else o.blocks
    width = DEFAULT_WIDTH[o.model] if o.width is None else o.width
    if not isinstance(blocks, int) or blocks < 1 or width < 1:
        raise EdgepropError("--blocks and --width must be at least 1")
    classes = int(train.y.max()) + 1
    input_shape = model_input_shape(o.model, train.x.shape[1:])
    try:  # a prototype starts from images as the blocks see them: normalised as the bundle's input_norm
        images = None
        if o.embedding == "prototype":
            norm = input_norm(train.x)
            images = (train.x.astype(np.float32) - norm["mean"]) / norm["std"]
        emb = label_embedding(o.embedding, classes, o.embed_dim, o.seed, images, train.y)
    except ValueError as e:
        raise EdgepropError(str(e)) from None
    sched = NoiseSchedule.cosine(blocks, eta=o.eta).check()
    alpha_bar = (float(sched.alpha_bar[0]), float(sched.alpha_bar[-1]))
    dropout = o.extra.get("dropout", DEFAULT_DROPOUT[o.model])
    if not 0.0 <= dropout < 1.0 or (dropout and o.model != "cnn"):
        raise EdgepropError(f"--dropout {dropout}: the CNN block takes a dropout rate in [0, 1); the MLP has none")
    batchnorm = bool(o.extra.get("batchnorm", False))
    if batchnorm and o.model != "cnn":
        raise EdgepropError("--batchnorm: the CNN block has the paper's BatchNorm layers; the MLP block has none")
    model = {"kind": o.model, "input_shape": input_shape, "num_classes": classes, "embed_dim": int(emb.shape[1]),
             "embedding": o.embedding, "width": width, "blocks": blocks, **({"batchnorm": True} if batchnorm else {}),
             **({"learned_embedding": True} if o.embedding in LEARNED else {})}
    torch.manual_seed(o.seed)
    units = [UnitSpec(f"block{t}", "block", "block", build_unit(model, "block", emb), o.lr, t)
             for t in range(1, blocks + 1)]
    if dropout:  # the device draws masks of these shapes for every block step
        model.update(dropout=dropout, dropout_shapes=units[0].module.dropout_shapes(input_shape))
    rule = NopropDT(model, emb, alpha_bar)
    units.append(UnitSpec("head", "head", "head", build_unit(model, "head", emb, alpha_bar), o.head_lr))
    # The inference temperature eval uses unless told otherwise: 0, the mean chain (research/noprop.md §5).
    tau = check_temperature(o.extra.get("temperature", MEAN))
    return Spec(rule, model, units, manifest={"noise": sched.to_json(), "inference": {"temperature": tau}},
                arrays={"embedding": emb})


def from_bundle(bundle) -> NopropDT:
    ab = bundle.schedule.alpha_bar
    return NopropDT(bundle.model, bundle.embedding, (float(ab[0]), float(ab[-1])))
