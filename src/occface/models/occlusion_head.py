"""OcclusionHead: a per-location visibility map predicted from backbone features."""
from __future__ import annotations

import torch
from torch import nn


class OcclusionHead(nn.Module):
    """Conv3x3 -> BatchNorm -> ReLU -> Conv1x1 -> Sigmoid.

    Input ``[B, in_channels, H, W]`` feature maps; output ``[B, 1, H, W]`` in [0, 1] where
    1 means the location is visible and 0 that it is occluded. H and W are preserved.
    """

    def __init__(self, in_channels: int, hidden_channels: int = 128) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.conv1 = nn.Conv2d(in_channels, hidden_channels, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(hidden_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden_channels, 1, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_in, ReLU gain) weights and zero biases for both convs; BN at 1/0."""
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        self.bn.reset_parameters()

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        if feature_map.dim() != 4 or feature_map.shape[1] != self.in_channels:
            raise ValueError(
                f"OcclusionHead expects [B, {self.in_channels}, H, W] features, got {list(feature_map.shape)}"
            )
        hidden = self.relu(self.bn(self.conv1(feature_map)))
        return torch.sigmoid(self.conv2(hidden))
