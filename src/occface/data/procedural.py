"""Procedural faces: the embedded default data, generated deterministically from a seed.

Each identity is a set of lasting traits (face shape, skin tone, hair, eye shape, spacing and
tilt, iris colour, brows, nose, mouth, moles) drawn in the 112x112 ArcFace alignment; each image
of it varies in pose, lighting, expression, blur, noise and background. Identities differ in the
eye band (eye shape, iris colour, brows, spacing, moles near the eyes) as well as below it, so a
niqab leaves real but partial evidence.

    faces = ProceduralFaces(num_identities=40, images_per_identity=20, seed=0)
    image = faces.render(identity=3, index=7)      # uint8 [112, 112, 3] RGB
    faces.write("data/faces")                      # <dir>/id_0003/0007.png, an image folder
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .datasets import FaceDataset, RawSample
from .synth import LEFT_EYE, RIGHT_EYE

SKIN_TONES = np.array([[255, 224, 196], [241, 194, 160], [224, 172, 125], [198, 134, 90], [161, 102, 66],
                       [120, 75, 50], [90, 56, 38]], np.float32)
HAIR_COLORS = np.array([[20, 16, 14], [60, 40, 28], [110, 75, 45], [170, 130, 80], [200, 170, 120],
                        [130, 50, 30], [150, 150, 150]], np.float32)
IRIS_COLORS = np.array([[70, 45, 25], [110, 75, 40], [60, 110, 160], [80, 130, 90], [120, 120, 110],
                        [140, 110, 60], [40, 30, 20]], np.float32)
SUPERSAMPLE = 2


@dataclass(frozen=True)
class IdentityTraits:
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    iris: tuple[float, float, float]
    face_width: float
    face_height: float
    jaw: float
    hairline: float
    hair_sides: float
    eye_dx: float  # change of the half eye distance
    eye_width: float
    eye_height: float
    eye_tilt: float
    iris_radius: float
    brow_gap: float
    brow_thickness: float
    brow_arch: float
    brow_slant: float
    nose_length: float
    nose_width: float
    mouth_y: float
    mouth_width: float
    lip_thickness: float
    lip_color: tuple[float, float, float]
    moles: tuple[tuple[float, float, float], ...]  # (x, y, radius)


def sample_traits(rng: np.random.Generator) -> IdentityTraits:
    def color(palette: np.ndarray, spread: float) -> tuple[float, float, float]:
        base = palette[rng.integers(len(palette))] + rng.normal(0, spread, 3)
        return tuple(float(v) for v in np.clip(base, 0, 255))

    skin = color(SKIN_TONES, 10)
    moles = []
    for _ in range(rng.integers(0, 3)):
        # Moles anywhere on the face, often around the eyes.
        if rng.random() < 0.5:
            moles.append((float(rng.uniform(30, 82)), float(rng.uniform(40, 62)), float(rng.uniform(0.9, 1.6))))
        else:
            moles.append((float(rng.uniform(28, 84)), float(rng.uniform(62, 100)), float(rng.uniform(0.9, 1.8))))
    return IdentityTraits(
        skin=skin, hair=color(HAIR_COLORS, 12), iris=color(IRIS_COLORS, 15),
        face_width=float(rng.uniform(33, 41)), face_height=float(rng.uniform(46, 54)), jaw=float(rng.uniform(0.7, 1.0)),
        hairline=float(rng.uniform(22, 36)), hair_sides=float(rng.uniform(0, 1)),
        eye_dx=float(rng.uniform(-2.5, 2.5)), eye_width=float(rng.uniform(7, 11)), eye_height=float(rng.uniform(2.6, 5.0)),
        eye_tilt=float(rng.uniform(-0.18, 0.18)), iris_radius=float(rng.uniform(2.2, 3.4)),
        brow_gap=float(rng.uniform(5, 10)), brow_thickness=float(rng.uniform(1.2, 4.0)),
        brow_arch=float(rng.uniform(0, 3.5)), brow_slant=float(rng.uniform(-2.5, 2.5)),
        nose_length=float(rng.uniform(66, 77)), nose_width=float(rng.uniform(7, 15)),
        mouth_y=float(rng.uniform(88, 96)), mouth_width=float(rng.uniform(17, 30)), lip_thickness=float(rng.uniform(1.5, 4.5)),
        lip_color=tuple(float(v) for v in np.clip(np.asarray(skin) * rng.uniform([0.6, 0.35, 0.35], [0.85, 0.6, 0.6]), 0, 255)),
        moles=tuple(moles),
    )


class ProceduralFaces:
    """``num_identities`` x ``images_per_identity`` synthetic aligned faces, deterministic in ``seed``."""

    def __init__(self, num_identities: int = 40, images_per_identity: int = 20, seed: int = 0, size: int = 112) -> None:
        if num_identities < 1 or images_per_identity < 1:
            raise ValueError("need at least one identity and one image per identity")
        self.num_identities = num_identities
        self.images_per_identity = images_per_identity
        self.seed = seed
        self.size = size
        self.traits = [sample_traits(np.random.default_rng((seed, 1, i))) for i in range(num_identities)]

    def identity_name(self, identity: int) -> str:
        return f"id_{identity:04d}"

    def render(self, identity: int, index: int) -> np.ndarray:
        """Image ``index`` of ``identity``: uint8 [size, size, 3] RGB."""
        t = self.traits[identity]
        rng = np.random.default_rng((self.seed, 2, identity, index))
        scale = SUPERSAMPLE * self.size / 112.0
        angle = math.radians(rng.uniform(-4, 4))
        zoom = 1 + rng.uniform(-0.03, 0.03)
        shift = rng.uniform(-2, 2, size=2)
        cos, sin = math.cos(angle) * zoom, math.sin(angle) * zoom

        def p(x: float, y: float) -> tuple[float, float]:  # template point -> canvas pixel, with pose jitter
            dx, dy = x - 56, y - 60
            return ((56 + cos * dx - sin * dy + shift[0]) * scale, (60 + sin * dx + cos * dy + shift[1]) * scale)

        def ellipse(cx, cy, rx, ry, tilt=0.0, n=28):
            return [p(cx + rx * math.cos(a) * math.cos(tilt) - ry * math.sin(a) * math.sin(tilt),
                      cy + rx * math.cos(a) * math.sin(tilt) + ry * math.sin(a) * math.cos(tilt))
                    for a in np.linspace(0, 2 * math.pi, n, endpoint=False)]

        def rgb(color, factor=1.0):
            return tuple(int(np.clip(c * factor, 0, 255)) for c in color)

        background = tuple(int(v) for v in rng.integers(30, 226, size=3))
        canvas = Image.new("RGB", (self.size * SUPERSAMPLE,) * 2, background)
        draw = ImageDraw.Draw(canvas)
        skin = t.skin
        # Hair mass behind the head, then the face.
        draw.polygon(ellipse(56, 52, t.face_width + 6, t.face_height + 4), fill=rgb(t.hair))
        if t.hair_sides > 0.5:
            draw.polygon([p(56 - t.face_width - 6, 50), p(56 + t.face_width + 6, 50), p(56 + t.face_width + 8, 112),
                          p(56 - t.face_width - 8, 112)], fill=rgb(t.hair))
        jaw_points = [(56 + t.face_width * math.cos(a) * (1 - (1 - t.jaw) * max(0.0, math.sin(a))),
                       60 + t.face_height * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 40, endpoint=False)]
        draw.polygon([p(x, y) for x, y in jaw_points], fill=rgb(skin))
        # Hairline / fringe.
        draw.polygon(ellipse(56, t.hairline - 12, t.face_width + 1, 16), fill=rgb(t.hair))
        # Expression parameters.
        openness = rng.uniform(0.6, 1.1)
        brow_raise = rng.uniform(-1.2, 1.2)
        smile = rng.uniform(-1.5, 3.5)
        mouth_open = max(0.0, rng.uniform(-1.5, 2.5))
        for side, eye in ((-1, LEFT_EYE), (1, RIGHT_EYE)):
            ex, ey = eye[0] + side * t.eye_dx, eye[1]
            tilt = -side * t.eye_tilt
            draw.polygon(ellipse(ex, ey, t.eye_width, t.eye_height * openness, tilt), fill=(245, 245, 240))
            draw.polygon(ellipse(ex, ey, t.iris_radius, min(t.iris_radius, t.eye_height * openness + 0.3)), fill=rgb(t.iris))
            draw.polygon(ellipse(ex, ey, t.iris_radius * 0.45, min(t.iris_radius * 0.45, t.eye_height * openness)), fill=(10, 10, 10))
            draw.line(ellipse(ex, ey, t.eye_width, t.eye_height * openness, tilt)[14:28] + [p(ex + t.eye_width, ey)],
                      fill=rgb(skin, 0.55), width=max(1, int(scale)))
            by = ey - t.brow_gap - brow_raise
            brow = [p(ex - side * t.eye_width * 1.2, by + t.brow_slant * 0.5),
                    p(ex, by - t.brow_arch),
                    p(ex + side * t.eye_width * 1.3, by - t.brow_slant * 0.5 + 1)]
            draw.line(brow, fill=rgb(t.hair, 0.8), width=max(1, int(t.brow_thickness * scale)), joint="curve")
        # Nose: bridge shading and nostrils.
        nose_shade = rgb(skin, 0.78)
        draw.line([p(56, 56), p(56 - 1.5, t.nose_length - 3)], fill=nose_shade, width=max(1, int(scale)))
        draw.polygon(ellipse(56, t.nose_length, t.nose_width / 2, 3.2), fill=rgb(skin, 0.9))
        for side in (-1, 1):
            draw.polygon(ellipse(56 + side * t.nose_width / 4, t.nose_length + 0.8, 1.6, 1.0), fill=rgb(skin, 0.45))
        # Mouth with expression.
        half = t.mouth_width / 2
        upper = [p(56 + half * x, t.mouth_y - smile * (1 - x * x) * 0 - smile * x * x) for x in np.linspace(-1, 1, 9)]
        lower = [p(56 + half * x, t.mouth_y + t.lip_thickness + mouth_open - smile * x * x + 1.5 * (1 - x * x))
                 for x in np.linspace(1, -1, 9)]
        draw.polygon(upper + lower, fill=rgb(t.lip_color))
        if mouth_open > 0.8:
            draw.line([p(56 + half * x * 0.8, t.mouth_y + t.lip_thickness / 2 + mouth_open / 2 - smile * x * x * 0.8)
                       for x in np.linspace(-1, 1, 7)], fill=(60, 20, 25), width=max(1, int(mouth_open * scale * 0.6)))
        for mx, my, radius in t.moles:
            draw.polygon(ellipse(mx, my, radius, radius, n=10), fill=rgb(skin, 0.35))

        image = canvas.resize((self.size, self.size), Image.BOX)
        blur = rng.uniform(0, 1.0)
        if blur > 0.35:
            image = image.filter(ImageFilter.GaussianBlur(blur))
        pixels = np.asarray(image, np.float32)
        # Directional light and overall exposure.
        direction = rng.uniform(0, 2 * math.pi)
        ramp = (np.cos(direction) * (np.arange(self.size) - self.size / 2)[None, :]
                + np.sin(direction) * (np.arange(self.size) - self.size / 2)[:, None]) / self.size
        pixels *= (rng.uniform(0.8, 1.15) + rng.uniform(0.1, 0.45) * ramp)[:, :, None]
        pixels += rng.normal(0, rng.uniform(1, 7), size=pixels.shape).astype(np.float32)
        return np.clip(pixels, 0, 255).astype(np.uint8)

    def write(self, directory: str | Path) -> Path:
        """Write every image as ``<directory>/<identity>/<NNNN>.png`` (an image-folder dataset)."""
        directory = Path(directory)
        for identity in range(self.num_identities):
            folder = directory / self.identity_name(identity)
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(self.images_per_identity):
                Image.fromarray(self.render(identity, index)).save(folder / f"{index:04d}.png", compress_level=1)
        return directory


class ProceduralFaceDataset(FaceDataset):
    """The procedural faces as a dataset rendered on the fly (no files)."""

    def __init__(self, faces: ProceduralFaces, identities: list[int] | None = None, **kwargs) -> None:
        kwargs.setdefault("input_size", faces.size)
        super().__init__(**kwargs)
        self.faces = faces
        chosen = list(range(faces.num_identities)) if identities is None else list(identities)
        self.identities = [faces.identity_name(i) for i in chosen]
        self.items = [(identity, index) for identity in chosen for index in range(faces.images_per_identity)]
        self.targets = [label for label in range(len(chosen)) for _ in range(faces.images_per_identity)]
        self.occluded_flags = [False] * len(self.items)

    def read(self, index: int) -> RawSample:
        identity, image_index = self.items[index]
        return RawSample(self.faces.render(identity, image_index), None, self.targets[index])
