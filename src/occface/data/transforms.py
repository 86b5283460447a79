"""Paired transforms on (image uint8 [H, W, 3] RGB, mask float32 [H, W]) with an explicit RNG.

Geometric transforms move the image and its mask together; photometric ones touch the image
only. The AdaFace augmentations each fire with their own probability.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

Pair = tuple[np.ndarray, np.ndarray]


class Compose:
    def __init__(self, transforms: Sequence) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
        for transform in self.transforms:
            image, mask = transform(image, mask, rng)
        return image, mask


class RandomHorizontalFlip:
    """Mirror image and mask together with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
        if rng.random() < self.p:
            return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])
        return image, mask


class RandomCropPaste:
    """With probability ``p`` keep a random box (area fraction in ``scale``, aspect in ``ratio``)
    where it is and black out the rest, as AdaFace's crop augmentation does. The blacked-out part
    carries no face evidence, so the mask is set to 0 (occluded) there."""

    def __init__(self, p: float = 0.2, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.p, self.scale, self.ratio = p, scale, ratio

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
        if rng.random() >= self.p:
            return image, mask
        height, width = mask.shape
        for _ in range(10):
            area = height * width * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            box_w, box_h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < box_w <= width and 0 < box_h <= height:
                top, left = rng.integers(0, height - box_h + 1), rng.integers(0, width - box_w + 1)
                keep = np.zeros((height, width), bool)
                keep[top : top + box_h, left : left + box_w] = True
                return image * keep[:, :, None].astype(np.uint8), mask * keep
        return image, mask


class LowResolution:
    """With probability ``p`` shrink the image by a random side ratio with a random filter and
    scale it back (image only: visibility does not change)."""

    FILTERS = (Image.NEAREST, Image.BILINEAR, Image.BICUBIC, Image.BOX, Image.LANCZOS)

    def __init__(self, p: float = 0.2, side_ratio: tuple[float, float] = (0.2, 1.0)) -> None:
        self.p, self.side_ratio = p, side_ratio

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
        if rng.random() >= self.p:
            return image, mask
        height, width = image.shape[:2]
        ratio = rng.uniform(*self.side_ratio)
        small = (max(1, round(width * ratio)), max(1, round(height * ratio)))
        down = self.FILTERS[rng.integers(len(self.FILTERS))]
        up = self.FILTERS[rng.integers(len(self.FILTERS))]
        return np.asarray(Image.fromarray(image).resize(small, down).resize((width, height), up)), mask


class ColorJitter:
    """With probability ``p`` jitter brightness, contrast and saturation by random factors in
    ``[1 - x, 1 + x]``, in random order (image only)."""

    def __init__(self, p: float = 0.2, brightness: float = 0.5, contrast: float = 0.5, saturation: float = 0.5) -> None:
        self.p, self.brightness, self.contrast, self.saturation = p, brightness, contrast, saturation

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
        if rng.random() >= self.p:
            return image, mask
        x = image.astype(np.float32)
        for step in rng.permutation(3):
            if step == 0 and self.brightness:
                x = x * rng.uniform(1 - self.brightness, 1 + self.brightness)
            elif step == 1 and self.contrast:
                gray_mean = (x @ np.array([0.299, 0.587, 0.114], np.float32)).mean()
                x = (x - gray_mean) * rng.uniform(1 - self.contrast, 1 + self.contrast) + gray_mean
            elif step == 2 and self.saturation:
                gray = (x @ np.array([0.299, 0.587, 0.114], np.float32))[:, :, None]
                x = (x - gray) * rng.uniform(1 - self.saturation, 1 + self.saturation) + gray
            x = np.clip(x, 0, 255)
        return x.round().astype(np.uint8), mask


def adaface_augmentation(flip: float = 0.5, crop: float = 0.2, low_res: float = 0.2, photometric: float = 0.2) -> Compose:
    """AdaFace's training augmentation with its default probabilities, applied to image and mask."""
    return Compose([RandomHorizontalFlip(flip), RandomCropPaste(crop), LowResolution(low_res), ColorJitter(photometric)])
