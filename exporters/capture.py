"""Any traceable torch.nn.Module as an aten-level graph that edgeprop can cut into units.

The model's forward is traced with make_fx into plain aten ops (the level the step graphs are
exported at), every node tagged with the module that produced it. Before tracing, the layers
whose behaviour differs in training are replaced by twins whose randomness and state are
explicit inputs, as the NoProp CNN's already are:

  BatchNorm   whose affine parameters train: batch statistics over the real samples (a
              sample mask input), running statistics as state in and out ("stats");
              frozen: its running statistics are constants (eval-mode BatchNorm)
  Dropout     a product with a mask input (drawn by the device, fed to the step graph);
              identity in the inference graph

Everything else runs as in eval mode (a functional dropout or stochastic depth is then off).
Frozen parameters are constants of the graph: no gradient, no optimizer slot.

The forward is traced twice: once as a step sees it (batch statistics, masks) and once as
inference sees it. Only ops in SUPPORTED are accepted: their forward and gradient lower to
onnxruntime and LiteRT builtin ops (tests/test_real_models.py); any other op is refused
naming it and the module that produced it.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import operator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx

from edgeprop.errors import EdgepropError

from .conv_grad import FORWARD_DECOMPOSITIONS

aten = torch.ops.aten

# Forward ops a recorded graph may hold: each lowers, gradient included, to onnxruntime and
# LiteRT builtins as far as the models of tests/test_real_models.py and bench/real_models.py
# exercise them (an op they never reach is listed because it is an elementary op those use).
SUPPORTED = {f"aten.{op}" for op in """
    _to_copy.default _unsafe_view.default add.Tensor addmm.default alias.default amax.default
    avg_pool2d.default bmm.default cat.default clamp.default clamp_max.default clamp_min.default clone.default
    convolution.default copy.default detach.default div.Tensor erf.default exp.default expand.default
    flatten.using_ints full.default ge.Scalar gt.Scalar hardtanh.default le.Scalar leaky_relu.default
    lift_fresh_copy.default log.default lt.Scalar max_pool2d_with_indices.default maximum.default mean.default
    mean.dim minimum.default mm.default mul.Tensor neg.default ones.default permute.default pow.Tensor_Scalar
    relu.default reshape.default rsqrt.default scalar_tensor.default select.int sigmoid.default slice.Tensor
    sqrt.default squeeze.dim squeeze.dims sub.Tensor sum.default
    sum.dim_IntList t.default tanh.default transpose.int unsqueeze.default var.correction view.default
    where.self zeros.default
""".split()} | {"getitem"}


def op_name(target) -> str:
    return "getitem" if target is operator.getitem else str(target)


class InputShapeError(EdgepropError):
    """The model's forward pass fails on inputs of the shape it was given."""


class _Context:
    """What the traced forward reads beside its parameters: the sample mask (training),
    each tracked BatchNorm's running statistics and each dropout site's mask, by module path."""

    def __init__(self, stats: dict, masks: dict, sample_mask):
        self.stats, self.masks, self.sample_mask, self.new = stats, masks, sample_mask, {}


_CONTEXT: list[_Context] = []


@contextlib.contextmanager
def inputs(stats: dict, masks: dict, sample_mask=None):
    _CONTEXT.append(_Context(stats, masks, sample_mask))
    try:
        yield _CONTEXT[-1]
    finally:
        _CONTEXT.pop()


class TrackedBatchNorm(nn.Module):
    """BatchNorm (1-D or 2-D) whose running statistics are a graph input, [mean, var]: batch
    statistics over the real samples (mask 1) when a sample mask is given, and the updated
    running statistics collected (torch's momentum update, unbiased variance); the running
    ones otherwise. With every mask 1 it is torch's BatchNorm in train mode (tested)."""

    def __init__(self, bn: nn.BatchNorm1d | nn.BatchNorm2d, path: str, frozen: bool = False):
        super().__init__()
        self.path, self.features, self.eps, self.momentum = path, bn.num_features, bn.eps, bn.momentum
        self.weight, self.bias, self.frozen = bn.weight, bn.bias, frozen
        if frozen:  # eval-mode BatchNorm: its running statistics are constants
            self.register_buffer("running_mean", bn.running_mean)
            self.register_buffer("running_var", bn.running_var)

    def forward(self, h):
        ctx = _CONTEXT[-1]
        n = self.features
        if self.frozen:
            running_mean, running_var = self.running_mean, self.running_var
        else:
            running = ctx.stats[self.path]
            running_mean, running_var = running[:n], running[n:]
        axes = [0] + list(range(2, h.dim()))
        shape = [1, n] + [1] * (h.dim() - 2)
        if ctx.sample_mask is None or self.frozen:
            mean, var = running_mean, running_var
        else:
            m = ctx.sample_mask.reshape([-1] + [1] * (h.dim() - 1))
            count = m.sum() * (h[0, 0].numel())
            mean = (h * m).sum(axes) / count
            var = ((h - mean.reshape(shape)) ** 2 * m).sum(axes) / count
            unbiased = var * count / (count - 1).clamp(min=1.0)
            ctx.new[self.path] = torch.cat([(1 - self.momentum) * running_mean + self.momentum * mean.detach(),
                                            (1 - self.momentum) * running_var + self.momentum * unbiased.detach()])
        out = (h - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + self.eps)
        if self.weight is not None:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out


class MaskedDropout(nn.Module):
    """Dropout as a product with a mask input (0 or 1/(1-p)), one per sample and element."""

    def __init__(self, p: float, path: str):
        super().__init__()
        self.p, self.path = float(p), path

    def forward(self, h):
        masks = _CONTEXT[-1].masks
        return h * masks[self.path] if self.path in masks else h


@dataclass
class Prepared:
    """The user's model made traceable: a private copy with BatchNorm and Dropout replaced."""
    module: nn.Module
    trainable: list[str]         # parameter names that train, in the model's order
    frozen: list[str]            # parameters and buffers that are constants
    stats: dict[str, int] = field(default_factory=dict)      # tracked BatchNorm path -> features
    running: dict[str, torch.Tensor] = field(default_factory=dict)  # its running statistics now
    dropout: dict[str, float] = field(default_factory=dict)  # dropout path -> p


def _choose(model: nn.Module, trainable, order: list[str]) -> set[str]:
    """The parameter names `trainable` picks: "all", "bias", "bn" (BatchNorm affine),
    "last:K" (the last K layers with parameters, in execution order) or a list of globs."""
    names = [n for n, _ in model.named_parameters()]
    bn = {f"{path}.{p}" for path, m in model.named_modules()
          if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in ("weight", "bias")}
    if trainable in (None, "all"):
        return set(names)
    if trainable == "bias":
        return {n for n in names if n.rsplit(".", 1)[-1] == "bias"}
    if trainable == "bn":
        return set(names) & bn
    if isinstance(trainable, str) and trainable.startswith("last:"):
        k = trainable[len("last:"):]
        layers = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in order))
        if not k.isdigit() or not 1 <= int(k) <= len(layers):
            raise EdgepropError(f"--trainable {trainable}: K must be 1..{len(layers)} (the layers with parameters)")
        last = set(layers[-int(k):])
        return {n for n in names if n.rsplit(".", 1)[0] in last}
    globs = trainable.split(",") if isinstance(trainable, str) else list(trainable)
    picked = {n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)}
    unmatched = [g for g in globs if not any(fnmatch.fnmatchcase(n, g) for n in names)]
    if unmatched:
        raise EdgepropError(f"--trainable: {', '.join(map(repr, unmatched))} matches no parameter; choose all, bias, "
                            f"bn, last:K or globs of parameter names such as {names[-1]!r}")
    return picked


def execution_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Parameter names in the order the forward pass first uses them."""
    order = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, path=path: order.extend(
        f"{path}.{n}" if path else n for n, _ in mod.named_parameters(recurse=False)))
        for path, m in model.named_modules()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def prepare(model: nn.Module, example: torch.Tensor, trainable="all", batch_statistics: bool = True) -> Prepared:
    """`batch_statistics=False`: every BatchNorm keeps its running statistics as constants
    (zeroth-order runs inference graphs only: no batch statistics to learn from)."""
    model = copy.deepcopy(model).eval()
    try:
        order = execution_order(model, example)
    except Exception as e:  # noqa: BLE001 - the user's forward: say what failed, in one line
        raise InputShapeError(f"the model cannot run on inputs of shape {list(example.shape[1:])}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    chosen = _choose(model, trainable, order)
    if not chosen:
        raise EdgepropError(f"--trainable {trainable}: selects no parameter of the model")
    p = Prepared(model, [], [])
    for path, m in list(model.named_modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
            # Batch statistics where the scale trains (all, bn, last:K); a frozen scale
            # (bias-only fine-tuning included) keeps the pretrained statistics.
            tracks = batch_statistics and (f"{path}.weight" in chosen if m.weight is not None
                                           else trainable in (None, "all"))
            if not tracks and m.running_mean is None:
                raise EdgepropError(f"{path}: a frozen BatchNorm needs running statistics (track_running_stats=True)")
            if tracks:
                if m.momentum is None or not m.track_running_stats:
                    raise EdgepropError(f"{path}: BatchNorm with momentum=None or without running statistics "
                                        "is not supported")
                p.stats[path] = m.num_features
                p.running[path] = torch.cat([m.running_mean, m.running_var]).detach().float()
            _replace(model, path, TrackedBatchNorm(m, path, frozen=not tracks))
        elif type(m) in (nn.Dropout, nn.Dropout1d, nn.Dropout2d) and m.p > 0:
            if type(m) is not nn.Dropout:
                raise EdgepropError(f"{path}: {type(m).__name__} is not supported (nn.Dropout is)")
            p.dropout[path] = float(m.p)
            _replace(model, path, MaskedDropout(m.p, path))
    for name, _ in model.named_parameters():
        (p.trainable if name in chosen else p.frozen).append(name)
    p.frozen += [n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] != "num_batches_tracked"]
    return p


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


@dataclass
class Captured:
    graph: torch.fx.GraphModule
    modules: dict[str, tuple[str, ...]]  # node name -> the module paths it runs inside, outermost first
    inputs: list[str]                    # placeholder roles: "param:NAME", "const:NAME", "x", "stats:PATH", ...
    outputs: list[str]                   # "out", then "stats:PATH" of every updated running statistic


# The batch size the forward is traced at (with fake tensors: nothing is computed). Shapes
# the graph bakes in are multiples of it only where they come from the batch (a prime
# larger than any layer's size), so a recorded graph runs at any batch size (graph_units).
SENTINEL_BATCH = 9973


def trace(p: Prepared, example: torch.Tensor, train: bool) -> Captured:
    """make_fx of the prepared model's forward on `example` (its batch size replaced by
    SENTINEL_BATCH), each node tagged with its module."""
    model = p.module
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    roles = [f"param:{n}" for n in p.trainable] + [f"const:{n}" for n in p.frozen] + ["x"]
    roles += [f"stats:{s}" for s in p.stats]
    batch = SENTINEL_BATCH
    masks = {}
    if train:
        shapes = _dropout_shapes(p, example)
        masks = {path: torch.ones(batch, *shapes[path][1:]) for path in p.dropout}
        roles += [f"drop:{d}" for d in p.dropout] + ["mask"]
    stack: list[str] = []
    tags: dict[str, tuple[str, ...]] = {}

    def enter(path):
        def hook(mod, args):
            _tag_new_nodes(tags, stack)
            stack.append(path)
        return hook

    def leave(mod, args, out):
        _tag_new_nodes(tags, stack)
        stack.pop()

    hooks = []
    for path, m in model.named_modules():
        if path:
            hooks += [m.register_forward_pre_hook(enter(path)), m.register_forward_hook(leave)]
    n_state = len(p.trainable) + len(p.frozen)

    def forward(*args):
        weights = dict(zip(p.trainable + p.frozen, args[:n_state]))
        x = args[n_state]
        rest = list(args[n_state + 1:])
        stats = dict(zip(p.stats, rest[:len(p.stats)]))
        rest = rest[len(p.stats):]
        drop = dict(zip(p.dropout, rest[:len(p.dropout)])) if train else {}
        sample_mask = rest[-1] if train else None
        with inputs(stats, drop, sample_mask) as ctx:
            out = torch.func.functional_call(model, weights, (x,))
            _tag_new_nodes(tags, stack)
        if not isinstance(out, torch.Tensor):
            raise EdgepropError(f"the model returns {type(out).__name__}; edgeprop trains models that return one "
                                "tensor of class scores")
        return (out, *[ctx.new[s] for s in p.stats if s in ctx.new])

    args = [named[n].detach() for n in p.trainable + p.frozen] + [torch.zeros(batch, *example.shape[1:])]
    args += [p.running[s] for s in p.stats]
    if train:
        args += list(masks.values()) + [torch.ones(batch)]
    try:
        # functionalize: in-place ops (out += x, ReLU(inplace=True)) become their pure forms
        gm = make_fx(torch.func.functionalize(forward), decomposition_table=FORWARD_DECOMPOSITIONS,
                     tracing_mode="fake")(*args)
    finally:
        for h in hooks:
            h.remove()
    gm.graph.eliminate_dead_code()  # e.g. the log-sum-exp an attention kernel returns unused
    outputs = ["out"] + ([f"stats:{s}" for s in p.stats] if train else [])
    return Captured(gm, tags, roles, outputs)


def _tag_new_nodes(tags: dict, stack: list[str]) -> None:
    """Give every node traced since the last call the module stack active now."""
    mode = get_proxy_mode()
    if mode is None:
        return
    for node in reversed(mode.tracer.graph.nodes):
        if node.name in tags:
            break
        tags[node.name] = tuple(stack)


def _dropout_shapes(p: Prepared, example: torch.Tensor) -> dict[str, list[int]]:
    """Each dropout site's input shape (batch included)."""
    shapes = {}
    hooks = [p.module.get_submodule(path).register_forward_pre_hook(
        lambda mod, args, path=path: shapes.__setitem__(path, list(args[0].shape))) for path in p.dropout]
    try:
        with torch.no_grad(), inputs(dict(p.running), {}):
            p.module(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def check_ops(c: Captured) -> None:
    """Refuse an op edgeprop cannot lower, naming it and the module that produced it."""
    for node in c.graph.graph.nodes:
        if node.op != "call_function":
            continue
        name = op_name(node.target)
        if name == "aten.avg_pool2d.default":
            _check_avg_pool(node, c.modules.get(node.name) or ("<top level>",))
        if name not in SUPPORTED:
            where = c.modules.get(node.name) or ()
            raise EdgepropError(f"{name} (from module {where[-1] if where else '<top level>'!r}) has no lowering in "
                                f"edgeprop; supported ops: {', '.join(sorted(SUPPORTED))}")


def _check_avg_pool(node, where) -> None:
    """Average pooling whose gradient edgeprop writes as forward ops (conv_grad.avg_pool2d_grad)."""
    args = list(node.args) + [None] * 7
    padding, ceil_mode = args[3] or [0], bool(args[4])
    count_include_pad = True if args[5] is None else bool(args[5])
    if ceil_mode or (any(padding) and not count_include_pad):
        raise EdgepropError(f"{where[-1]}: AvgPool2d with ceil_mode=True or count_include_pad=False is not supported "
                            "(its gradient has no lowering); use ceil_mode=False and count_include_pad=True")
