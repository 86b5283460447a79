"""Images into the service, within its limits, and pictures out of it (aligned faces, visibility overlays).

Uploads are checked in the order that costs least: their size in bytes, then the pixel count in the
image's header (before anything is decoded), then the decoding itself (a truncated JPEG, a file
that is no image), then the smallest side. Each failure is a :class:`ServiceError` naming the field.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..data.errors import DataError
from ..data.images import read_image
from .errors import ServiceError, too_large, unprocessable

MIN_SIDE = 16


@dataclass
class Limits:
    """What one request may ask: upload size (bytes), image pixels, faces reported per photo, and
    seconds from arrival to answer (waiting for a free worker included)."""

    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    max_faces: int = 20
    request_timeout: float = 30.0

    def as_dict(self) -> dict:
        """The limits with their units in the keys (bytes, pixels, faces, seconds)."""
        return {"max_upload_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels,
                "max_faces": self.max_faces, "request_timeout_s": self.request_timeout}


def decode_image(data: bytes, field: str, limits: Limits) -> np.ndarray:
    """RGB uint8 [H, W, 3] of an uploaded image, or a ServiceError naming ``field``."""
    if not data:
        raise unprocessable("empty_image", f"{field}: the upload is empty", field)
    if len(data) > limits.max_upload_bytes:
        raise too_large("upload_too_large", f"{field}: {len(data):,} bytes, above the limit of "
                                            f"{limits.max_upload_bytes:,}", field)
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except UnidentifiedImageError as error:
        raise unprocessable("not_an_image", f"{field}: not an image (no JPEG, PNG, WebP, BMP or TIFF header)",
                            field) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise unprocessable("not_an_image", f"{field}: not an image occface can read ({_reason(error)})", field) from error
    except Image.DecompressionBombError as error:
        raise too_large("too_many_pixels", f"{field}: {error}", field) from error
    if width * height > limits.max_pixels:
        raise too_large("too_many_pixels", f"{field}: {width}x{height} is {width * height:,} pixels, above the limit "
                                           f"of {limits.max_pixels:,}", field)
    try:
        image = read_image(data)
    except DataError as error:
        text = str(error).removeprefix("<bytes>: ")
        code = "truncated_image" if "truncated" in text else "not_an_image"
        raise unprocessable(code, f"{field}: {text}", field) from error
    except Image.DecompressionBombError as error:
        raise too_large("too_many_pixels", f"{field}: {error}", field) from error
    if min(image.shape[:2]) < MIN_SIDE:
        raise unprocessable("image_too_small", f"{field}: {image.shape[1]}x{image.shape[0]} pixels; a face needs at "
                                               f"least {MIN_SIDE}x{MIN_SIDE}", field)
    return image


def base64_bytes(text: str, field: str, limits: Limits) -> bytes:
    """The bytes of a base64 string (a ``data:image/...;base64,`` prefix is allowed), within the upload limit."""
    if not isinstance(text, str):
        raise unprocessable("not_base64", f"{field}: expected a base64 string", field)
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) > 4 * (limits.max_upload_bytes // 3 + 4):
        raise too_large("upload_too_large", f"{field}: {len(text):,} base64 characters, above the limit of "
                                            f"{limits.max_upload_bytes:,} bytes", field)
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as error:
        raise unprocessable("not_base64", f"{field}: not valid base64 ({error})", field) from error


def decode_base64(text: str, field: str, limits: Limits) -> np.ndarray:
    """:func:`decode_image` of a base64 string."""
    return decode_image(base64_bytes(text, field, limits), field, limits)


def png_base64(image: np.ndarray) -> str:
    """An RGB uint8 image as a base64 PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def visibility_overlay(face: np.ndarray, visibility: np.ndarray, scale: int = 2) -> np.ndarray:
    """The aligned face (RGB uint8 [S, S, 3]) scaled up, tinted red where the model sees it hidden
    and green where it sees it, from the visibility map [h, w] in [0, 1]."""
    size = face.shape[0] * scale
    big = np.asarray(Image.fromarray(face).resize((size, size), Image.BICUBIC), np.float32)
    heat = np.asarray(Image.fromarray((np.clip(visibility, 0, 1) * 255).astype(np.uint8)).resize((size, size),
                                                                                                   Image.BILINEAR),
                      np.float32)[..., None] / 255.0
    tint = np.concatenate([255 * (1 - heat), 200 * heat, np.zeros_like(heat)], axis=2)
    return np.clip(0.6 * big + 0.4 * tint, 0, 255).astype(np.uint8)


def _reason(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


__all__ = ["Limits", "ServiceError", "base64_bytes", "decode_base64", "decode_image", "png_base64", "visibility_overlay"]
