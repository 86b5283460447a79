"""The one function that brings ground-truth visibility masks to the occlusion map's size.

Both the occlusion loss and the evaluation use :func:`downsample_mask`, so a predicted map is
always compared with the same target.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MASK_MODES = ("area", "bilinear")


def downsample_mask(mask: torch.Tensor, size: int | tuple[int, int], mode: str = "area") -> torch.Tensor:
    """Resize visibility masks ``[B, 1, H, W]`` (or ``[1, H, W]`` / ``[H, W]``) to ``size``.

    ``mode="area"`` (default) averages the pixels each output cell covers, so a cell's value is
    the fraction of it that is visible (exact when H and W are multiples of ``size``, e.g. 112 -> 7
    averages 16x16 blocks). ``mode="bilinear"`` is the spec's bilinear interpolation with
    anti-aliasing, a smooth tent-weighted average over a slightly wider footprint.
    Values are clamped to [0, 1]; the result is float32 with the input's leading dimensions.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mask downsampling mode must be one of {MASK_MODES}, got {mode!r}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    if mask.dim() not in (2, 3, 4) or (mask.dim() >= 3 and mask.shape[-3] != 1):
        raise ValueError(f"masks must be [B, 1, H, W], [1, H, W] or [H, W], got {list(mask.shape)}")
    leading = mask.shape[:-2]
    x = mask.float().reshape(-1, 1, *mask.shape[-2:])
    if tuple(x.shape[-2:]) != size:
        if mode == "area":
            x = F.adaptive_avg_pool2d(x, size)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0).reshape(*leading, *size)
