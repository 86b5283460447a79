"""Input conventions: the colour order and normalisation a backbone's weights were trained with.

Everything in occface hands a model ``[B, 3, S, S]`` RGB images scaled to [0, 1]; the model applies
its own convention (:class:`InputNormalization`, the first step of ``OccFaceModel.forward``), which
is saved with it. Datasets, commands and callers never normalise by hand, so a model trained on BGR
weights cannot be fed RGB by mistake.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

COLOR_SPACES = ("RGB", "BGR")


def check_color_space(color_space: str) -> str:
    """Return the canonical colour-space name ("RGB" or "BGR") or raise a clear error."""
    value = str(color_space).upper()
    if value not in COLOR_SPACES:
        raise ValueError(f"color_space must be 'RGB' or 'BGR', got {color_space!r}")
    return value


@dataclass(frozen=True)
class InputConvention:
    """``color_space``: the channel order the weights expect; ``mean`` and ``std``: per input
    channel, in that order, on the [0, 1] scale: the network sees ``(x - mean) / std``."""

    color_space: str = "RGB"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        object.__setattr__(self, "color_space", check_color_space(self.color_space))
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"input {name} needs one value per channel, got {value}")
            object.__setattr__(self, name, value)
        if min(self.std) <= 0:
            raise ValueError(f"input std must be positive, got {self.std}")


# AdaFace's released weights: BGR, (x - 0.5) / 0.5. Also occface's default for training from scratch.
ADAFACE_INPUT = InputConvention("BGR", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# MobileFaceNet (and most torchvision-era weights): RGB with the ImageNet mean and std.
IMAGENET_INPUT = InputConvention("RGB", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class InputNormalization(nn.Module):
    """images [B, 3, S, S] RGB in [0, 1] -> [B, 3, S, S] in ``convention`` (channel order, then
    ``(x - mean) / std``). No parameters and nothing in the state dict: the convention travels in
    the model's config."""

    def __init__(self, convention: InputConvention) -> None:
        super().__init__()
        self.convention = convention
        self.bgr = convention.color_space == "BGR"
        self.register_buffer("mean", torch.tensor(convention.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(convention.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.bgr:
            images = images.flip(1)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def extra_repr(self) -> str:
        c = self.convention
        return f"color_space={c.color_space}, mean={c.mean}, std={c.std}"
