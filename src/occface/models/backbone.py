"""IR / IR-SE ResNet backbones laid out exactly as AdaFace lays them out.

Parameter names (``input_layer.*``, ``body.N.res_layer.*``, ``body.N.shortcut_layer.*``,
``output_layer.*``) and shapes match AdaFace's released checkpoints at ``width=1.0``, whichever
feature level is tapped: the body stays one ``nn.Sequential`` and the block-3 map is read at an
index computed from the unit counts.

Shapes at 112x112 input (``width=1.0``)::

    input_layer  [B, 3, 112, 112] -> [B, 64, 112, 112]
    stage 1      -> [B, 64, 56, 56]
    stage 2      -> [B, 128, 28, 28]
    stage 3      -> [B, 256, 14, 14]   <- feature_level="block3"
    stage 4      -> [B, 512, 7, 7]     <- feature_level="block4"
    output_layer -> [B, 512]           (embedding, then L2-normalised; its norm is returned too)

A 224x224 input doubles every H and W; the output layer's Linear grows to match.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

# Units per stage, keyed by arch name. "ir_101" is AdaFace's name for its 100-layer network.
STAGE_UNITS: dict[str, tuple[int, int, int, int]] = {
    "ir_18": (2, 2, 2, 2),
    "ir_34": (3, 4, 6, 3),
    "ir_50": (3, 4, 14, 3),
    "ir_101": (3, 13, 30, 3),
    "ir_se_50": (3, 4, 14, 3),
}
STAGE_CHANNELS = (64, 128, 256, 512)
FEATURE_LEVELS = ("block3", "block4")
INPUT_SIZES = (112, 224)
EMBEDDING_SIZE = 512


class BackboneOutput(NamedTuple):
    """What :class:`Backbone` returns.

    embedding:   [B, E] L2-normalised identity embedding (E = 512).
    norm:        [B, 1] L2 norm of the embedding before normalisation (AdaFace's quality proxy).
    feature_map: [B, C, H, W] spatial features for QAConv and the occlusion head.
    """

    embedding: torch.Tensor
    norm: torch.Tensor
    feature_map: torch.Tensor


class SqueezeExcite(nn.Module):
    """Channel gating: x * sigmoid(fc2(relu(fc1(avgpool(x))))), with 1x1 convs named fc1/fc2."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * gate


class IRUnit(nn.Module):
    """One improved-residual unit: BN-Conv3x3-BN-PReLU-Conv3x3(stride)-BN [+ SE], plus a shortcut.

    The shortcut is a strided 1x1 max-pool (identity subsampling) when the channel count is kept,
    and a strided Conv1x1-BN projection when it changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, use_se: bool) -> None:
        super().__init__()
        if in_channels == out_channels:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        if use_se:
            self.res_layer.add_module("se_block", SqueezeExcite(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class Backbone(nn.Module):
    """AdaFace-compatible IR backbone that also exposes a spatial feature map.

    Args:
        arch: one of ``ir_18``, ``ir_34``, ``ir_50``, ``ir_101``, ``ir_se_50``.
        feature_level: ``"block4"`` (512 ch, 7x7 at 112) or ``"block3"`` (256 ch, 14x14 at 112).
        input_size: 112 or 224 (square).
        width: multiplier on every channel count; AdaFace checkpoints need 1.0. Small values give
            CPU-sized models for demos and tests. The embedding stays 512-d.

    The backbone takes images already in its weights' input convention (AdaFace: BGR,
    ``(x - 0.5) / 0.5``); ``OccFaceModel`` applies the convention stored with it
    (:mod:`occface.models.convention`).
    """

    def __init__(
        self,
        arch: str = "ir_50",
        feature_level: str = "block4",
        input_size: int = 112,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if arch not in STAGE_UNITS:
            raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(STAGE_UNITS)}")
        if feature_level not in FEATURE_LEVELS:
            raise ValueError(f"unknown feature_level {feature_level!r}; expected one of {FEATURE_LEVELS}")
        if input_size not in INPUT_SIZES:
            raise ValueError(f"input_size must be one of {INPUT_SIZES}, got {input_size!r}")
        if not width > 0:
            raise ValueError(f"width must be positive, got {width!r}")
        self.arch = arch
        self.feature_level = feature_level
        self.input_size = input_size
        self.width = float(width)

        channels = [max(1, round(c * width)) for c in STAGE_CHANNELS]
        units = STAGE_UNITS[arch]
        use_se = arch.startswith("ir_se")

        self.input_layer = nn.Sequential(
            nn.Conv2d(3, channels[0], 3, 1, 1, bias=False), nn.BatchNorm2d(channels[0]), nn.PReLU(channels[0])
        )
        body: list[nn.Module] = []
        in_ch = channels[0]
        for out_ch, n_units in zip(channels, units):
            for unit in range(n_units):
                body.append(IRUnit(in_ch, out_ch, stride=2 if unit == 0 else 1, use_se=use_se))
                in_ch = out_ch
        self.body = nn.Sequential(*body)

        final_hw = input_size // 16
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(channels[3]),
            nn.Dropout(0.4),
            nn.Flatten(),
            nn.Linear(channels[3] * final_hw * final_hw, EMBEDDING_SIZE),
            nn.BatchNorm1d(EMBEDDING_SIZE, affine=False),
        )

        # Index of the body unit whose output is the tapped feature map.
        self.feature_index = sum(units[:3]) - 1 if feature_level == "block3" else len(body) - 1
        stage = 2 if feature_level == "block3" else 3
        self.feature_channels = channels[stage]
        self.feature_size = input_size // (2 ** (stage + 1))  # 112: block3 -> 14, block4 -> 7
        self.embedding_size = EMBEDDING_SIZE
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """AdaFace's initialisation: Kaiming-normal (fan_out, ReLU) convs and linears with zero
        bias, BatchNorm2d at weight 1 / bias 0; PReLU and BatchNorm1d keep PyTorch's defaults."""
        kaiming_fan_out_init(self)

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        """x: [B, 3, S, S] images in the weights' input convention, S = input_size."""
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != self.input_size or x.shape[3] != self.input_size:
            raise ValueError(
                f"expected images of shape [B, 3, {self.input_size}, {self.input_size}], got {list(x.shape)}"
            )
        x = self.input_layer(x)
        feature_map = x
        for index, unit in enumerate(self.body):
            x = unit(x)
            if index == self.feature_index:
                feature_map = x
        embedding = self.output_layer(x)
        norm = torch.norm(embedding, 2, 1, True)
        return BackboneOutput(embedding / norm.clamp_min(1e-12), norm, feature_map)


def kaiming_fan_out_init(network: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU gain) weights and zero biases for every Conv2d and Linear;
    weight 1 and bias 0 for every BatchNorm2d."""
    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
