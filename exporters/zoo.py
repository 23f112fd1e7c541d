"""Reference image classifiers, layer for layer as torchvision builds them (desktop side).

torchvision cannot be installed beside the pinned torch, yet the memory planner must be
checked on the networks people actually deploy. Each constructor here makes the same
modules, in the same order, with the same shapes and parameter counts as the torchvision
model named in its docstring (tests/test_zoo.py checks the counts against torchvision's
published ones), randomly initialised, with `num_classes` outputs:

    model = zoo.create("resnet18", num_classes=10)
    torch.onnx.export(model.eval(), torch.randn(1, 3, 224, 224), "resnet18.onnx")

Only inference matters here, so training-only details that vanish in eval mode (dropout,
stochastic depth) are kept as the same modules but never change an exported graph.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of `divisor`, never more than 10% down
    (torchvision.models._utils._make_divisible)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * v else rounded


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + optional activation, 'same' padding
    (torchvision.ops.misc.Conv2dNormActivation)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 activation: type[nn.Module] | None = nn.ReLU, norm=nn.BatchNorm2d):
        layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), norm(cout)]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Channel attention: global average, two 1x1 convs, a gate that scales the input
    (torchvision.ops.misc.SqueezeExcitation)."""

    def __init__(self, channels: int, squeeze: int, activation=nn.ReLU, gate=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = activation(), gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class StochasticDepth(nn.Module):
    """Drops whole samples of a residual branch in training, identity in eval
    (torchvision.ops.StochasticDepth, mode "row")."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty([x.shape[0]] + [1] * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


def _init_cnn(model: nn.Module) -> None:
    """torchvision's initialisation for its CNNs: He for convs, unit BatchNorm, small linears."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------- MobileNetV2

class InvertedResidualV2(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res_connect = stride == 1 and cin == cout
        layers = [ConvNormAct(cin, hidden, 1, activation=nn.ReLU6)] if expand != 1 else []
        layers += [ConvNormAct(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision/models/mobilenetv2.py: MobileNetV2(width_mult); 3,504,872 parameters at 1.0."""

    SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1)]  # expansion t, channels c, repeats n, first stride s

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        cin = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvNormAct(3, cin, 3, 2, activation=nn.ReLU6)]
        for t, c, n, s in self.SETTING:
            cout = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidualV2(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvNormAct(cin, self.last_channel, 1, activation=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        _init_cnn(self)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# ---------------------------------------------------------------- MobileNetV3-small

class InvertedResidualV3(nn.Module):
    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, se: bool, activation, stride: int):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvNormAct(cin, expanded, 1, activation=activation, norm=norm))
        layers.append(ConvNormAct(expanded, expanded, kernel, stride, groups=expanded, activation=activation,
                                  norm=norm))
        if se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4), gate=nn.Hardsigmoid))
        layers.append(ConvNormAct(expanded, cout, 1, activation=None, norm=norm))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x) if self.use_res_connect else self.block(x)


class MobileNetV3Small(nn.Module):
    """torchvision/models/mobilenetv3.py: mobilenet_v3_small; 2,542,856 parameters."""

    RE, HS = nn.ReLU, nn.Hardswish
    SETTING = [(16, 3, 16, 16, True, RE, 2), (16, 3, 72, 24, False, RE, 2), (24, 3, 88, 24, False, RE, 1),
               (24, 5, 96, 40, True, HS, 2), (40, 5, 240, 40, True, HS, 1), (40, 5, 240, 40, True, HS, 1),
               (40, 5, 120, 48, True, HS, 1), (48, 5, 144, 48, True, HS, 1), (48, 5, 288, 96, True, HS, 2),
               (96, 5, 576, 96, True, HS, 1), (96, 5, 576, 96, True, HS, 1)]
    # input, kernel, expanded, output, squeeze-excitation, activation, stride

    def __init__(self, num_classes: int = 1000, last_channel: int = 1024, dropout: float = 0.2):
        super().__init__()
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        layers: list[nn.Module] = [ConvNormAct(3, 16, 3, 2, activation=nn.Hardswish, norm=norm)]
        layers += [InvertedResidualV3(*s) for s in self.SETTING]
        last = 6 * self.SETTING[-1][3]
        layers.append(ConvNormAct(self.SETTING[-1][3], last, 1, activation=nn.Hardswish, norm=norm))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last, last_channel), nn.Hardswish(inplace=True),
                                        nn.Dropout(dropout, inplace=True), nn.Linear(last_channel, num_classes))
        _init_cnn(self)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ---------------------------------------------------------------- ResNet-18

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision/models/resnet.py: resnet18 (BasicBlock, [2, 2, 2, 2]); 11,689,512 parameters."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, cin = (64, 128, 256, 512), 64
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w)))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        _init_cnn(self)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------- SqueezeNet 1.1

class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet11(nn.Module):
    """torchvision/models/squeezenet.py: squeezenet1_1; 1,235,496 parameters."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        pool = partial(nn.MaxPool2d, 3, 2, ceil_mode=True)
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2), nn.ReLU(inplace=True), pool(),
            Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool(),
            Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool(),
            Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256))
        final = nn.Conv2d(512, num_classes, 1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), final, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))
        for m in self.modules():  # torchvision: the final conv small and normal, the others He-uniform
            if isinstance(m, nn.Conv2d):
                if m is final:
                    nn.init.normal_(m.weight, 0.0, 0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


# ---------------------------------------------------------------- EfficientNet-B0

class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, drop: float):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        hidden = make_divisible(cin * expand)
        layers: list[nn.Module] = []
        if hidden != cin:
            layers.append(ConvNormAct(cin, hidden, 1, activation=nn.SiLU))
        layers += [ConvNormAct(hidden, hidden, kernel, stride, groups=hidden, activation=nn.SiLU),
                   SqueezeExcitation(hidden, max(1, cin // 4), activation=partial(nn.SiLU, inplace=True)),
                   ConvNormAct(hidden, cout, 1, activation=None)]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(drop)

    def forward(self, x):
        out = self.block(x)
        return self.stochastic_depth(out) + x if self.use_res_connect else out


class EfficientNetB0(nn.Module):
    """torchvision/models/efficientnet.py: efficientnet_b0 (width and depth 1.0); 5,288,548 parameters."""

    SETTING = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
               (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]
    # expansion, kernel, first stride, input, output, repeats

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, stochastic_depth: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [ConvNormAct(3, self.SETTING[0][3], 3, 2, activation=nn.SiLU)]
        total, k = sum(s[5] for s in self.SETTING), 0
        for expand, kernel, stride, cin, cout, n in self.SETTING:
            stage = []
            for i in range(n):
                stage.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand,
                                    stochastic_depth * k / total))
                k += 1
            layers.append(nn.Sequential(*stage))
        last = 4 * self.SETTING[-1][4]
        layers.append(ConvNormAct(self.SETTING[-1][4], last, 1, activation=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout, inplace=True), nn.Linear(last, num_classes))
        _init_cnn(self)
        for m in self.modules():  # torchvision: linears uniform in ±1/sqrt(outputs)
            if isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -1 / math.sqrt(m.out_features), 1 / math.sqrt(m.out_features))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ---------------------------------------------------------------- ShuffleNetV2 x1.0

def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    # Sizes read from the tensor, as torchvision does: a legacy export gets Shape -> Div -> Reshape.
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2).contiguous()
    return x.view(batch, -1, height, width)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, half = stride, cout // 2

        def depthwise(c):
            return [nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), nn.BatchNorm2d(c)]

        def pointwise(a, b):
            return [nn.Conv2d(a, b, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]

        self.branch1 = nn.Sequential(*depthwise(cin), *pointwise(cin, half)) if stride > 1 else nn.Sequential()
        self.branch2 = nn.Sequential(*pointwise(cin if stride > 1 else half, half), *depthwise(half),
                                     *pointwise(half, half))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """torchvision/models/shufflenetv2.py: shufflenet_v2_x1_0; 2,278,604 parameters."""

    def __init__(self, num_classes: int = 1000, repeats=(4, 8, 4), channels=(24, 116, 232, 464, 1024)):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, channels[0], 3, 2, 1, bias=False), nn.BatchNorm2d(channels[0]),
                                   nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = channels[0]
        for i, (n, cout) in enumerate(zip(repeats, channels[1:4])):
            setattr(self, f"stage{i + 2}",
                    nn.Sequential(ShuffleUnit(cin, cout, 2), *[ShuffleUnit(cout, cout, 1) for _ in range(n - 1)]))
            cin = cout
        self.conv5 = nn.Sequential(nn.Conv2d(cin, channels[4], 1, bias=False), nn.BatchNorm2d(channels[4]),
                                   nn.ReLU(inplace=True))
        self.fc = nn.Linear(channels[4], num_classes)

    def forward(self, x):
        x = self.stage4(self.stage3(self.stage2(self.maxpool(self.conv1(x)))))
        return self.fc(self.conv5(x).mean([2, 3]))


# ---------------------------------------------------------------- Vision Transformer

class MLP(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                         nn.Dropout(dropout))


class EncoderBlock(nn.Module):
    def __init__(self, heads: int, dim: int, mlp_dim: int, dropout: float, attention_dropout: float):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.ln_1 = norm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=attention_dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = norm(dim)
        self.mlp = MLP(dim, mlp_dim, dropout)

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + self.dropout(y)
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq_length: int, depth: int, heads: int, dim: int, mlp_dim: int, dropout: float,
                 attention_dropout: float):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(*[EncoderBlock(heads, dim, mlp_dim, dropout, attention_dropout)
                                      for _ in range(depth)])
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformer(nn.Module):
    """torchvision/models/vision_transformer.py: VisionTransformer (class token, no
    representation layer). vit_b_16 is patch 16, dim 768, depth 12, heads 12, MLP 3072:
    86,567,656 parameters at 224 px."""

    def __init__(self, image_size: int = 224, patch: int = 16, dim: int = 768, depth: int = 12, heads: int = 12,
                 mlp_dim: int | None = None, num_classes: int = 1000, dropout: float = 0.0,
                 attention_dropout: float = 0.0):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.image_size, self.patch_size, self.hidden_dim = image_size, patch, dim
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        seq = (image_size // patch) ** 2 + 1
        self.encoder = Encoder(seq, depth, heads, dim, mlp_dim or 4 * dim, dropout, attention_dropout)
        self.heads = nn.Sequential(nn.Linear(dim, num_classes))
        fan_in = 3 * patch * patch  # torchvision: truncated normal patch embedding, zero head
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        nn.init.zeros_(self.heads[0].weight)
        nn.init.zeros_(self.heads[0].bias)

    def forward(self, x):
        n, _, h, w = x.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {h}x{w}")
        x = self.conv_proj(x)  # (n, dim, h/p, w/p)
        x = x.reshape(n, self.hidden_dim, (h // self.patch_size) * (w // self.patch_size)).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


def vit_b_16(num_classes: int = 1000, image_size: int = 224) -> VisionTransformer:
    """torchvision's vit_b_16: 86,567,656 parameters at 224 px and 1000 classes."""
    return VisionTransformer(image_size, 16, 768, 12, 12, 3072, num_classes)


def vit_small(num_classes: int = 1000, image_size: int = 224) -> VisionTransformer:
    """A small ViT of the same design for quick runs: patch 16, dim 192, depth 6, heads 3 (ViT-Ti's width)."""
    return VisionTransformer(image_size, 16, 192, 6, 3, 768, num_classes)


MODELS = {
    "mobilenet_v2": MobileNetV2,
    "mobilenet_v3_small": MobileNetV3Small,
    "resnet18": ResNet18,
    "squeezenet1_1": SqueezeNet11,
    "efficientnet_b0": EfficientNetB0,
    "shufflenet_v2_x1_0": ShuffleNetV2,
    "vit_b_16": vit_b_16,
    "vit_small": vit_small,
}
# Parameters at 1000 classes, as torchvision's weights' metadata gives them ("num_params").
TORCHVISION_PARAMS = {"mobilenet_v2": 3_504_872, "mobilenet_v3_small": 2_542_856, "resnet18": 11_689_512,
                      "squeezenet1_1": 1_235_496, "efficientnet_b0": 5_288_548, "shufflenet_v2_x1_0": 2_278_604,
                      "vit_b_16": 86_567_656}
NEEDS_IMAGE_SIZE = {"vit_b_16", "vit_small"}  # position embeddings fix the image size


def create(name: str, num_classes: int = 1000, image_size: int = 224, **options) -> nn.Module:
    """A model by name (see MODELS), randomly initialised, in eval mode."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}': choose one of {', '.join(MODELS)}")
    if name in NEEDS_IMAGE_SIZE:
        options["image_size"] = image_size
    return MODELS[name](num_classes=num_classes, **options).eval()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
