"""Reading face images and visibility masks, and turning them into model input.

Images are handled as ``uint8`` arrays ``[H, W, 3]`` in RGB order until the last step,
:func:`to_tensor`, which gives ``float32 [3, H, W]`` RGB in [0, 1]. Colour order and normalisation
belong to the model (its input convention), never to the data.
Masks are ``float32`` arrays ``[H, W]`` in [0, 1], 1 = visible, read from 8-bit grayscale PNGs
(255 = visible).
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


@contextmanager
def _reading(name: str, what: str) -> Iterator[None]:
    """Turn a missing or undecodable file into a DataError naming it."""
    try:
        yield
    except FileNotFoundError as error:
        raise DataError(f"{name}: {what} file not found") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{name}: unreadable or corrupt {what} ({error})") from error


def _open(source: str | Path | bytes, what: str) -> Image.Image:
    """Decode a file, turned upright by its EXIF orientation, with 16-bit and float grey levels
    scaled to 8 bits (Pillow's own conversion would clip them to white)."""
    encoded = isinstance(source, (bytes, bytearray))
    with _reading("<bytes>" if encoded else str(source), what):
        image = Image.open(io.BytesIO(source) if encoded else source)
        image.load()
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        elif image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        image = Image.fromarray(np.clip(values.round(), 0, 255).astype(np.uint8), "L")
    return image


def read_image(source: str | Path | bytes) -> np.ndarray:
    """Decode an image file (or encoded bytes) to ``uint8 [H, W, 3]`` RGB: grayscale is repeated
    over the channels, an alpha channel dropped, 16-bit levels scaled to 8 bits, EXIF orientation
    applied."""
    return np.array(_open(source, "image").convert("RGB"))


def read_mask(source: str | Path | bytes) -> np.ndarray:
    """Decode a visibility mask to ``float32 [H, W]`` in [0, 1] (1 = visible) from its grey level
    (a colour mask is converted to luminance; an alpha channel is ignored; 16-bit levels scaled)."""
    image = _open(source, "mask")
    if image.mode == "LA":
        image = image.getchannel("L")
    return np.array(image.convert("L"), dtype=np.float32) / 255.0


def image_size(path: str | Path, what: str = "image") -> tuple[int, int]:
    """(width, height) from the file header, checking that the file is a decodable image."""
    with _reading(str(path), what), Image.open(path) as image:
        size = image.size
        image.verify()
    return size


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``uint8 [H, W, 3]`` RGB -> ``float32 [3, H, W]`` RGB in [0, 1], what every occface model
    takes (the model applies its own input convention)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {list(image.shape)}")
    image = np.ascontiguousarray(image)
    if not image.flags.writeable:
        image = image.copy()
    return torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)


def to_image(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`to_tensor`: ``[3, H, W]`` RGB in [0, 1] -> ``uint8 [H, W, 3]``."""
    return np.ascontiguousarray((tensor.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def tile_grid(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    """Equal-sized uint8 tiles [h, w, 3] laid out ``columns`` to a row (the last row padded black)."""
    tiles = list(tiles) + [np.zeros_like(tiles[0])] * (-len(tiles) % columns)
    return np.concatenate([np.concatenate(tiles[i : i + columns], axis=1) for i in range(0, len(tiles), columns)], axis=0)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
