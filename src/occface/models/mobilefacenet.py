"""MobileFaceNet (Chen et al., 2018) as the widely shared PyTorch MobileNetV2-style variant lays it
out, behind the same interface as :class:`~occface.models.backbone.Backbone`.

Parameter names match that variant's state dicts (``conv1``, ``dw_conv``, ``features.0`` to
``features.14``, ``conv2``, ``gdconv``, ``conv3``, ``bn``), so its released weights load unchanged.

Shapes at 112x112 input::

    conv1 (3x3/2, ReLU6)         [B, 3, 112, 112] -> [B, 64, 56, 56]
    dw_conv (3x3 dw + 1x1)       -> [B, 64, 56, 56]
    features.0-4   (t=2, s=2)    -> [B, 64, 28, 28]
    features.5     (t=4, s=2)    -> [B, 128, 14, 14]
    features.6-11  (t=2)         -> [B, 128, 14, 14]   <- feature_level="block3"
    features.12    (t=4, s=2)    -> [B, 128, 7, 7]
    features.13-14 (t=2)         -> [B, 128, 7, 7]
    conv2 (1x1, ReLU6)           -> [B, 512, 7, 7]     <- feature_level="block4"
    gdconv (7x7 dw) -> conv3 (1x1) -> bn -> [B, 128]   (embedding, L2-normalised; its norm returned)
"""
from __future__ import annotations

import torch
from torch import nn

from .backbone import FEATURE_LEVELS, BackboneOutput, kaiming_fan_out_init

# (expansion, output channels, units, stride of the first unit) per stage.
STAGES = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))
BLOCK3_INDEX = 11  # last unit of the third stage: 14x14x128
EMBEDDING_SIZE = 128


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU6; children named 0, 1, 2."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU6(inplace=True))


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv -> BN -> ReLU -> 1x1 pointwise conv -> BN -> ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.depthwise(x)))
        return torch.relu(self.bn2(self.pointwise(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2 unit: 1x1 expand (ReLU6) -> 3x3 depthwise (ReLU6) -> 1x1 linear projection,
    with an identity shortcut when the shape is kept. Layers in ``conv`` (0: expand, 1: depthwise,
    2: projection conv, 3: its BatchNorm)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.residual = stride == 1 and in_ch == out_ch
        self.conv = nn.Sequential(ConvBNReLU6(in_ch, hidden, 1), ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
                                  nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class GlobalDepthwise(nn.Module):
    """7x7 depthwise conv over the whole map (a learnt, per-channel spatial pooling) -> BN."""

    def __init__(self, channels: int, size: int = 7) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, size, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.depthwise(x))


class MobileFaceNet(nn.Module):
    """MobileFaceNet with a spatial feature map beside the embedding (see the module docstring).

    Args:
        feature_level: ``"block3"`` (128 ch, 14x14) or ``"block4"`` (512 ch, 7x7).
        input_size: 112 only (the global depthwise layer is 7x7).
    """

    arch = "mobilefacenet"
    width = 1.0

    def __init__(self, feature_level: str = "block4", input_size: int = 112) -> None:
        super().__init__()
        if feature_level not in FEATURE_LEVELS:
            raise ValueError(f"unknown feature_level {feature_level!r}; expected one of {FEATURE_LEVELS}")
        if input_size != 112:
            raise ValueError(f"MobileFaceNet takes 112x112 faces, got input_size={input_size!r}")
        self.feature_level, self.input_size = feature_level, input_size
        self.conv1 = ConvBNReLU6(3, 64, 3, 2)
        self.dw_conv = DepthwiseSeparable(64)
        units, in_ch = [], 64
        for expansion, out_ch, count, stride in STAGES:
            for unit in range(count):
                units.append(InvertedResidual(in_ch, out_ch, stride if unit == 0 else 1, expansion))
                in_ch = out_ch
        self.features = nn.Sequential(*units)
        self.conv2 = ConvBNReLU6(in_ch, 512, 1)
        self.gdconv = GlobalDepthwise(512, input_size // 16)
        self.conv3 = nn.Conv2d(512, EMBEDDING_SIZE, 1)
        self.bn = nn.BatchNorm2d(EMBEDDING_SIZE)
        self.feature_channels = 128 if feature_level == "block3" else 512
        self.feature_size = input_size // (8 if feature_level == "block3" else 16)
        self.embedding_size = EMBEDDING_SIZE
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out) convs with zero bias; BatchNorms at weight 1, bias 0."""
        kaiming_fan_out_init(self)

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        """x: [B, 3, 112, 112], already normalised in the weights' input convention."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, self.input_size, self.input_size):
            raise ValueError(f"expected images of shape [B, 3, {self.input_size}, {self.input_size}], got {list(x.shape)}")
        x = self.dw_conv(self.conv1(x))
        feature_map = x
        for index, unit in enumerate(self.features):
            x = unit(x)
            if index == BLOCK3_INDEX:
                feature_map = x
        x = self.conv2(x)
        if self.feature_level == "block4":
            feature_map = x
        embedding = self.bn(self.conv3(self.gdconv(x))).flatten(1)
        norm = torch.norm(embedding, 2, 1, True)
        return BackboneOutput(embedding / norm.clamp_min(1e-12), norm, feature_map)
