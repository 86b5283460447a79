"""Occlusion synthesis with exact ground-truth masks.

Occluders are composited onto faces aligned to the 112x112 ArcFace template (224x224 faces are
handled by scaling). The visibility mask of a composite is ``1 - alpha`` at image resolution,
so it is exact by construction.

Three sources of occluders:

* RGBA overlay images (:func:`load_overlays`): a niqab placed by its eye slit (found as the
  transparent hole inside the opaque cloth) on the template's eye line, medical masks by the
  nose/mouth region (MaskTheFace templates by their six anchor points), sunglasses by the eyes;
* procedural occluders drawn in code (:class:`ProceduralOccluders`) for machines without
  overlay files: a niqab with an eye slit, a medical mask, sunglasses, a hand, a bar;
* occluders as a distribution (:mod:`occface.data.drawn_occluders`): kinds ``veil`` and
  ``facemask`` (or one of their sub-families, e.g. ``veil/two-hole``), niqabs and masks whose
  shape, opening, hood, cloth and light are drawn at random.

Every placement gets random jitter in scale, position and rotation; overlays may be tinted.
"""
from __future__ import annotations

import configparser
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import DataError

from .drawn_occluders import DRAWN_KINDS, DrawnOccluders
from .placement import (EYE_CENTER, EYE_DISTANCE, LEFT_EYE, MOUTH_LEFT, MOUTH_RIGHT, NOSE_TIP,  # noqa: F401
                        RIGHT_EYE, Jitter)

OCCLUSION_KINDS = ("niqab", "mask", "sunglasses", "hand", "bar")
DEFAULT_KINDS = ("niqab", "mask", "sunglasses")

# Where MaskTheFace's six anchors (a: upper left, b: nose bridge, c: upper right, d: lower left,
# e: chin, f: lower right) fall on a 112x112 ArcFace-aligned face.
MASKTHEFACE_TARGETS = {
    "mask_a": (19.0, 64.0), "mask_b": (56.0, 58.0), "mask_c": (93.0, 64.0),
    "mask_d": (25.0, 98.0), "mask_e": (56.0, 116.0), "mask_f": (87.0, 98.0),
}


@dataclass
class Overlay:
    """An RGBA occluder image and its placement: ``to_template`` (3x3) maps overlay pixels to
    112x112 template coordinates; ``center`` is where jitter rotates and scales about."""

    name: str
    kind: str
    rgba: np.ndarray  # uint8 [h, w, 4]
    to_template: np.ndarray
    center: tuple[float, float]
    tint_colors: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        # Large overlays (sunglasses.png is 2000x2000) are shrunk once so that warping never
        # samples more than 4 overlay pixels per template pixel (enough for 224x224 faces).
        template_per_pixel = math.sqrt(abs(np.linalg.det(self.to_template[:2, :2])))
        factor = 4 * template_per_pixel
        if factor < 1:
            height, width = self.rgba.shape[:2]
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            small = Image.fromarray(self.rgba, "RGBA").convert("RGBa").resize(size, Image.LANCZOS)
            self.rgba = np.asarray(small.convert("RGBA"))
            self.to_template = self.to_template @ np.diag([width / size[0], height / size[1], 1.0])
        self.premultiplied = Image.fromarray(self.rgba, "RGBA").convert("RGBa")


def similarity(anchor: tuple[float, float], span: float, target: tuple[float, float], target_span: float) -> np.ndarray:
    """3x3 scale-and-shift taking ``anchor`` to ``target`` with ``span`` pixels -> ``target_span``."""
    s = target_span / span
    return np.array([[s, 0, target[0] - s * anchor[0]], [0, s, target[1] - s * anchor[1]], [0, 0, 1]])


def affine_from_points(source: Sequence[tuple[float, float]], target: Sequence[tuple[float, float]]) -> np.ndarray:
    """Least-squares 3x3 affine map from >= 3 source points to target points."""
    src = np.asarray(source, float)
    dst = np.asarray(target, float)
    design = np.hstack([src, np.ones((len(src), 1))])
    solution, *_ = np.linalg.lstsq(design, dst, rcond=None)
    return np.vstack([solution.T, [0, 0, 1]])


def find_eye_slit(alpha: np.ndarray) -> tuple[float, float, float, float]:
    """The largest transparent hole inside the opaque region of an alpha channel:
    (center x, center y, width, height) in pixels. Raises DataError if there is none."""
    from scipy import ndimage

    transparent = alpha < 128
    labels, count = ndimage.label(transparent)
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
    best = None
    for component, box in enumerate(ndimage.find_objects(labels), start=1):
        if component in border or box is None:
            continue
        size = int((labels[box] == component).sum())
        if best is None or size > best[0]:
            best = (size, box)
    if best is None:
        raise DataError("no eye slit: the overlay has no transparent hole inside its opaque region")
    ys, xs = best[1]
    return (xs.start + xs.stop - 1) / 2, (ys.start + ys.stop - 1) / 2, xs.stop - xs.start, ys.stop - ys.start


def _read_rgba(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGBA"))
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: unreadable occluder overlay ({error})") from error


def _opaque_box(alpha: np.ndarray, path: Path) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(alpha >= 128)
    if xs.size == 0:
        raise DataError(f"{path}: the overlay is fully transparent")
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def load_overlays(directory: str | Path, kinds: Sequence[str] = DEFAULT_KINDS) -> list[Overlay]:
    """Overlays found in ``directory``: ``niqab.png``, ``medical_mask.png``, ``sunglasses.png`` and
    MaskTheFace's frontal templates in ``masktheface/`` (with ``anchors.cfg``). Raises DataError if a
    requested kind has no overlay there."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: occluder directory not found")
    overlays: list[Overlay] = []
    dark = ((20, 20, 20), (40, 30, 60), (60, 20, 30), (20, 40, 70), (35, 50, 35))
    light = ((230, 240, 250), (150, 200, 235), (170, 220, 200), (240, 210, 220), (60, 60, 60))
    if "niqab" in kinds and (path := directory / "niqab.png").is_file():
        rgba = _read_rgba(path)
        try:
            cx, cy, width, _ = find_eye_slit(rgba[..., 3])
        except DataError as error:
            raise DataError(f"{path}: {error}") from error
        # The slit's width becomes the visible eye band (about 62 px of a 112 px face).
        to_template = similarity((cx, cy), width, (EYE_CENTER[0], EYE_CENTER[1] - 0.5), 1.76 * EYE_DISTANCE)
        overlays.append(Overlay("niqab", "niqab", rgba, to_template, EYE_CENTER, dark))
    if "mask" in kinds:
        if (path := directory / "medical_mask.png").is_file():
            rgba = _read_rgba(path)
            x0, y0, x1, _ = _opaque_box(rgba[..., 3], path)
            to_template = similarity(((x0 + x1) / 2, y0), x1 - x0, (56.0, 59.0), 100.0)
            overlays.append(Overlay("medical_mask", "mask", rgba, to_template, NOSE_TIP, light))
        config_path = directory / "masktheface" / "anchors.cfg"
        if config_path.is_file():
            config = configparser.ConfigParser()
            config.read(config_path)
            for section in config.sections():
                entry = config[section]
                if section.endswith(("_left", "_right")) or not all(k in entry for k in ("template", *MASKTHEFACE_TARGETS)):
                    continue  # turned-head variants (aligned faces are near frontal) and placeholders
                template = config_path.parent / config[section]["template"]
                anchors = [tuple(float(v) for v in config[section][k].split(",")) for k in MASKTHEFACE_TARGETS]
                to_template = affine_from_points(anchors, list(MASKTHEFACE_TARGETS.values()))
                overlays.append(Overlay(f"masktheface/{section}", "mask", _read_rgba(template), to_template, NOSE_TIP))
    if "sunglasses" in kinds and (path := directory / "sunglasses.png").is_file():
        rgba = _read_rgba(path)
        x0, y0, x1, y1 = _opaque_box(rgba[..., 3], path)
        # Lens centres sit at about 24% and 76% of the frame's width, 45% down its height.
        span = 0.52 * (x1 - x0)
        to_template = similarity(((x0 + x1) / 2, y0 + 0.45 * (y1 - y0)), span, EYE_CENTER, 1.02 * EYE_DISTANCE)
        overlays.append(Overlay("sunglasses", "sunglasses", rgba, to_template, EYE_CENTER))
    missing = sorted(set(kinds) & {"niqab", "mask", "sunglasses"} - {o.kind for o in overlays})
    if missing:
        raise DataError(f"{directory}: no overlay image for {missing} (expected niqab.png, medical_mask.png, "
                        "masktheface/anchors.cfg or sunglasses.png)")
    return overlays


def _warp(premultiplied: Image.Image, matrix: np.ndarray, size: int) -> np.ndarray:
    """Warp a premultiplied RGBa overlay by a 3x3 (overlay -> output pixels) into a size x size
    premultiplied float image [size, size, 4] with values in [0, 1]."""
    inverse = np.linalg.inv(matrix)
    warped = premultiplied.transform((size, size), Image.AFFINE, tuple(inverse[:2].ravel()), Image.BICUBIC)
    return np.asarray(warped, np.float32) / 255.0


def composite(image: np.ndarray, layer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Put a premultiplied RGBA layer [H, W, 4] (floats in [0, 1]) over an RGB uint8 image.
    Returns (composited uint8 image, visibility = 1 - alpha as float32)."""
    alpha = np.clip(layer[..., 3:4], 0.0, 1.0)
    # A premultiplied colour cannot exceed its alpha (resampling can overshoot): clamp it, so the
    # composite is exactly image * (1 - alpha) + colour.
    colour = np.clip(layer[..., :3], 0.0, alpha)
    out = image.astype(np.float32) * (1.0 - alpha) + colour * 255.0
    return np.clip(out, 0, 255).round().astype(np.uint8), (1.0 - alpha[..., 0]).astype(np.float32)


class ProceduralOccluders:
    """Occluders drawn in code on a 4x supersampled canvas (anti-aliased alpha): ``niqab`` (cloth
    over the whole face with an eye slit), ``mask`` (a pleated medical mask from the nose bridge to
    the chin), ``sunglasses``, ``hand`` (a skin-toned palm and fingers) and ``bar`` (a solid band)."""

    SUPERSAMPLE = 4

    def render(self, kind: str, size: int, rng: np.random.Generator, jitter: Jitter) -> np.ndarray:
        """A premultiplied RGBA layer [size, size, 4] in [0, 1]."""
        if kind not in OCCLUSION_KINDS:
            raise DataError(f"unknown occlusion kind {kind!r}; expected one of {OCCLUSION_KINDS}")
        scale = self.SUPERSAMPLE * size / 112.0
        center = NOSE_TIP if kind in ("mask", "hand", "bar") else EYE_CENTER
        placement = jitter.sample(rng, center)

        def points(template_points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
            homogeneous = np.hstack([np.asarray(template_points, float), np.ones((len(template_points), 1))])
            mapped = homogeneous @ placement[:2].T * scale
            return [tuple(p) for p in mapped]

        canvas = Image.new("RGBA", (size * self.SUPERSAMPLE,) * 2, (0, 0, 0, 0))
        draw = ImageDraw.Draw(canvas)
        getattr(self, f"_draw_{kind}")(draw, points, rng, canvas)
        small = canvas.convert("RGBa").resize((size, size), Image.BOX)
        layer = np.asarray(small, np.float32) / 255.0
        if kind in ("niqab", "mask", "hand"):  # a little cloth/skin texture
            layer[..., :3] *= (1.0 + rng.normal(0, 0.04, size=(size, size, 1))).astype(np.float32)
            layer[..., :3] = np.minimum(layer[..., :3], layer[..., 3:4])
        return layer

    @staticmethod
    def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 40) -> list[tuple[float, float]]:
        return [(cx + rx * math.cos(t), cy + ry * math.sin(t)) for t in np.linspace(0, 2 * math.pi, n, endpoint=False)]

    def _draw_niqab(self, draw, points, rng, canvas) -> None:
        color = tuple(int(v) for v in rng.integers(10, 70, size=3)) + (255,)
        draw.polygon(points([(-30, -40), (142, -40), (142, 150), (-30, 150)]), fill=color)
        half_width, half_height = rng.uniform(29, 33), rng.uniform(6.5, 8.5)
        cx, cy = EYE_CENTER[0], EYE_CENTER[1] - 0.5
        slit = [(cx + half_width * math.cos(t) * min(1.0, 1.6 * abs(math.cos(t))) ** 0.3,
                 cy + half_height * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
        draw.polygon(points(slit), fill=(0, 0, 0, 0))

    def _draw_mask(self, draw, points, rng, canvas) -> None:
        colors = ((215, 230, 245), (140, 190, 230), (240, 240, 240), (45, 45, 50), (170, 215, 190))
        color = colors[rng.integers(len(colors))] + (255,)
        top, bottom = rng.uniform(57, 61), rng.uniform(110, 116)
        outline = [(14, top + 8), (34, top + 1), (56, top - 2), (78, top + 1), (98, top + 8),
                   (96, 92), (86, bottom - 8), (56, bottom), (26, bottom - 8), (16, 92)]
        draw.polygon(points(outline), fill=color)
        pleat = tuple(max(0, c - 35) for c in color[:3]) + (255,)
        for y in (top + 14, top + 22, top + 30):
            draw.line(points([(20, y), (92, y)]), fill=pleat, width=max(1, int(draw.im.size[0] / 112)))
        strap = (235, 235, 235, 255)
        draw.line(points([(14, top + 8), (2, top + 4)]), fill=strap, width=max(1, int(draw.im.size[0] / 56)))
        draw.line(points([(98, top + 8), (110, top + 4)]), fill=strap, width=max(1, int(draw.im.size[0] / 56)))

    def _draw_sunglasses(self, draw, points, rng, canvas) -> None:
        lens = tuple(int(v) for v in rng.integers(5, 45, size=3)) + (250,)
        frame = (15, 15, 15, 255)
        rx, ry = rng.uniform(12, 15), rng.uniform(8, 10.5)
        for eye in (LEFT_EYE, RIGHT_EYE):
            draw.polygon(points(self._ellipse(eye[0], eye[1] + 1, rx + 1.5, ry + 1.5)), fill=frame)
            draw.polygon(points(self._ellipse(eye[0], eye[1] + 1, rx, ry)), fill=lens)
        width = max(1, int(draw.im.size[0] / 60))
        draw.line(points([(LEFT_EYE[0] + rx, LEFT_EYE[1] - 2), (RIGHT_EYE[0] - rx, RIGHT_EYE[1] - 2)]), fill=frame, width=width)
        draw.line(points([(LEFT_EYE[0] - rx, LEFT_EYE[1] - 2), (2, LEFT_EYE[1] - 4)]), fill=frame, width=width)
        draw.line(points([(RIGHT_EYE[0] + rx, RIGHT_EYE[1] - 2), (110, RIGHT_EYE[1] - 4)]), fill=frame, width=width)

    def _draw_hand(self, draw, points, rng, canvas) -> None:
        skin = tuple(int(v) for v in rng.integers([140, 90, 60], [240, 190, 160])) + (255,)
        cx, cy = rng.uniform(35, 77), rng.uniform(70, 100)
        draw.polygon(points(self._ellipse(cx, cy, rng.uniform(20, 26), rng.uniform(15, 20))), fill=skin)
        for k in range(4):  # fingers
            fx = cx - 15 + 10 * k
            draw.polygon(points(self._ellipse(fx, cy - 22, 4.5, 13)), fill=skin)

    def _draw_bar(self, draw, points, rng, canvas) -> None:
        color = tuple(int(v) for v in rng.integers(0, 256, size=3)) + (255,)
        y, height = rng.uniform(20, 95), rng.uniform(10, 28)
        draw.polygon(points([(-20, y), (132, y), (132, y + height), (-20, y + height)]), fill=color)


class OcclusionSynthesizer:
    """Composites a random occluder onto an aligned face and returns the exact visibility mask.

    Args:
        overlays: RGBA overlays from :func:`load_overlays`; kinds without an overlay are drawn
            procedurally (``procedural=True``), or are an error.
        kinds: the occlusion kinds to choose from (uniformly).
        jitter: placement noise; tint_probability: chance of tinting an overlay's colour.
    """

    def __init__(self, overlays: Sequence[Overlay] = (), kinds: Sequence[str] = DEFAULT_KINDS,
                 jitter: Jitter | None = None, tint_probability: float = 0.3, procedural: bool = True) -> None:
        unknown = sorted(set(kinds) - set(OCCLUSION_KINDS) - set(DRAWN_KINDS))
        if unknown or not kinds:
            raise DataError(f"unknown occlusion kinds {unknown}; expected some of {OCCLUSION_KINDS + DRAWN_KINDS}")
        self.kinds = tuple(kinds)
        self.overlays = {kind: [o for o in overlays if o.kind == kind] for kind in self.kinds}
        lacking = [k for k in self.kinds if not self.overlays[k] and k not in DRAWN_KINDS]
        if lacking and not procedural:
            raise DataError(f"no overlays for occlusion kinds {lacking} and procedural occluders are off")
        self.jitter = jitter or Jitter()
        self.tint_probability = tint_probability
        self.procedural = ProceduralOccluders()
        self.drawn = DrawnOccluders(self.jitter)

    @classmethod
    def from_directory(cls, occluders: str | Path | None, kinds: Sequence[str] = DEFAULT_KINDS, **kwargs) -> "OcclusionSynthesizer":
        """Overlays from ``occluders`` (None: procedural occluders only)."""
        image_kinds = [k for k in kinds if k in ("niqab", "mask", "sunglasses")]
        overlays = load_overlays(occluders, image_kinds) if occluders is not None and image_kinds else []
        return cls(overlays, kinds, **kwargs)

    def layer(self, size: int, rng: np.random.Generator, kind: str | None = None) -> tuple[np.ndarray, str]:
        """A premultiplied RGBA layer [size, size, 4] for one random occluder, and its name."""
        kind = kind or self.kinds[rng.integers(len(self.kinds))]
        if kind in DRAWN_KINDS:
            return self.drawn.render(kind, size, rng, self.jitter)
        choices = self.overlays.get(kind) or []
        if not choices:
            return self.procedural.render(kind, size, rng, self.jitter), f"procedural/{kind}"
        overlay = choices[rng.integers(len(choices))]
        matrix = np.diag([size / 112.0, size / 112.0, 1.0]) @ self.jitter.sample(rng, overlay.center) @ overlay.to_template
        layer = _warp(overlay.premultiplied, matrix, size)
        if overlay.tint_colors and rng.random() < self.tint_probability:
            tint = np.asarray(overlay.tint_colors[rng.integers(len(overlay.tint_colors))], np.float32) / 255.0
            gray = layer[..., :3].mean(axis=2, keepdims=True)
            layer[..., :3] = np.minimum(0.5 * gray + 0.5 * tint * layer[..., 3:4], layer[..., 3:4])
        return layer, overlay.name

    def __call__(self, image: np.ndarray, rng: np.random.Generator, kind: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
        """Occlude an aligned RGB uint8 face [S, S, 3]: returns (image, visibility [S, S], occluder name)."""
        if image.ndim != 3 or image.shape[0] != image.shape[1]:
            raise DataError(f"occlusion synthesis needs square aligned faces, got shape {list(image.shape)}")
        layer, name = self.layer(image.shape[0], rng, kind)
        occluded, visibility = composite(image, layer)
        return occluded, visibility, name


class SynthesizeOcclusion:
    """Paired transform: with probability ``p`` composite a random occluder onto the face and
    multiply the mask by the occluder's visibility (the spec's authors trained with 80% occluded
    and 20% clean faces, so the head also learns "all visible")."""

    def __init__(self, synthesizer: OcclusionSynthesizer, p: float = 0.8, composite: bool = True) -> None:
        self.synthesizer, self.p, self.composite = synthesizer, p, composite

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if rng.random() >= self.p:
            return image, mask
        if not self.composite:  # draw the occluder as usual, so later transforms draw alike, but leave it out
            self.synthesizer.layer(image.shape[0], rng)
            return image, mask
        occluded, visibility, _ = self.synthesizer(image, rng)
        return occluded, mask * visibility


def without_occlusion(transform):
    """The same paired transform with every :class:`SynthesizeOcclusion` in it drawing its random
    numbers but not compositing: run with an RNG in the same state, it gives the clean face with
    exactly the augmentation (flip, crop, blur, colour) of the occluded one."""
    from .transforms import Compose

    if isinstance(transform, Compose):
        return Compose([without_occlusion(t) for t in transform.transforms])
    if isinstance(transform, SynthesizeOcclusion):
        return SynthesizeOcclusion(transform.synthesizer, transform.p, composite=False)
    return transform
