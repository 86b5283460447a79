"""Occluders as a distribution: niqabs and face masks drawn at random, each with its exact mask.

One overlay image teaches a network that overlay; niqabs worn at a gate differ in cut, slit
height and curve, hood, colour, fabric and light. Here every one of those is a random draw:

* ``veil`` (a niqab): a hood whose outline follows the head (or, rarely, cloth over the whole
  crop) and an eye opening cut out of it. Sub-families: ``slit`` (one opening: width, height,
  pointed or rounded ends, curved up or down, tilted), ``two-hole`` (a band of cloth over the nose
  bridge between the eyes), ``sheer`` (a see-through panel over the opening: the eyes partly
  visible) and ``full`` (no head outline: cloth everywhere but the opening);
* ``facemask``: ``surgical`` (pleated, ear loops), ``cloth`` (a fitted shape with a centre seam,
  plain or patterned) and ``respirator`` (a dome over nose and mouth, folded or not).

Cloth is drawn in a colour from a palette or at random, with fabric noise, a weave, folds, a
lighting gradient and a hem; the edges are softened by a random blur. Shapes are placed in the
112x112 ArcFace template's coordinates (eyes, nose, mouth where the template puts them), moved by
the same random similarity (:class:`occface.data.placement.Jitter`) as every occluder, and drawn with
edges one pixel wide (alpha: the coverage of each pixel); the visibility mask is ``1 - alpha`` of
the layer drawn, so it is exact by construction.

    generator = DrawnOccluders()
    layer, name = generator.render("veil", 112, rng)          # premultiplied RGBA [112, 112, 4]
    layer, name = generator.render("veil/two-hole", 112, rng)  # one sub-family
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .placement import EYE_CENTER, EYE_DISTANCE, NOSE_TIP, Jitter

#: Sub-families of each family and their shares when the family is drawn.
FAMILIES: dict[str, dict[str, float]] = {
    "veil": {"slit": 0.55, "two-hole": 0.2, "sheer": 0.1, "full": 0.15},
    "facemask": {"surgical": 0.45, "cloth": 0.35, "respirator": 0.2},
}
DRAWN_KINDS = tuple(FAMILIES) + tuple(f"{f}/{s}" for f, subs in FAMILIES.items() for s in subs)

VEIL_COLOURS = ((12, 12, 14), (20, 20, 24), (28, 26, 30), (18, 22, 40), (40, 26, 22), (52, 44, 40),
                (30, 36, 30), (60, 20, 30), (80, 80, 86), (120, 110, 100), (196, 186, 170), (34, 30, 52))
MASK_COLOURS = ((208, 226, 242), (150, 196, 232), (236, 236, 236), (40, 40, 46), (168, 214, 190),
               (240, 200, 214), (90, 110, 160), (200, 60, 60), (230, 220, 190), (70, 70, 70))


def _smooth_inside(distance: np.ndarray, width: float) -> np.ndarray:
    """Coverage from a signed distance (negative inside) with an edge ``width`` pixels wide."""
    return np.clip(0.5 - distance / max(width, 1e-6), 0.0, 1.0)


@dataclass
class Cloth:
    """How a piece of cloth looks: base colour (RGB 0-255), fabric noise, weave, folds, light."""

    colour: np.ndarray
    noise: float
    weave: float
    weave_period: float
    folds: float
    fold_period: float
    fold_angle: float
    light: float
    light_angle: float

    @classmethod
    def draw(cls, rng: np.random.Generator, palette: tuple, dark: bool = False) -> "Cloth":
        draw = rng.random()
        if dark and draw < 0.45:  # most niqabs are black
            colour = np.full(3, rng.uniform(6, 30), np.float32)
        elif draw < 0.8:
            colour = np.asarray(palette[rng.integers(len(palette))], np.float32)
            colour = np.clip(colour + rng.normal(0, 8, 3), 0, 255).astype(np.float32)
        else:
            colour = rng.uniform(0, 90 if dark else 255, 3).astype(np.float32)
        return cls(colour, rng.uniform(0.0, 0.06), rng.uniform(0.0, 0.04) * (rng.random() < 0.5), rng.uniform(1.6, 4.0),
                   rng.uniform(0.0, 0.15), rng.uniform(8.0, 30.0), rng.uniform(-0.4, 0.4),
                   rng.uniform(0.0, 0.35), rng.uniform(0, 2 * math.pi))

    def paint(self, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """RGB in [0, 1] [H, W, 3] of this cloth at template coordinates (u, v)."""
        shade = 1.0 + self.light * ((u - 56) * math.cos(self.light_angle) + (v - 56) * math.sin(self.light_angle)) / 80
        if self.folds > 0.02:
            shade += self.folds * np.sin((u * math.cos(self.fold_angle) + v * math.sin(self.fold_angle))
                                         * (2 * math.pi / self.fold_period) + rng.uniform(0, 2 * math.pi))
        if self.weave > 0:
            shade += self.weave * np.sin(u * (2 * math.pi / self.weave_period)) * np.sin(v * (2 * math.pi / self.weave_period))
        if self.noise > 0.005:
            shade += rng.normal(0, self.noise, u.shape).astype(np.float32)
        base = (self.colour + 18.0) / 255.0  # dark cloth still shows its folds
        return np.clip(base[None, None, :] * shade[..., None] - 18.0 / 255.0, 0.0, 1.0).astype(np.float32)


class DrawnOccluders:
    """Random niqabs (``veil``) and face masks (``facemask``) with exact masks; see the module.

    ``render(kind, size, rng, jitter)`` -> (premultiplied RGBA layer [size, size, 4] in [0, 1],
    name such as ``"veil/slit"``). ``kind``: a family (its sub-family drawn by :data:`FAMILIES`'s
    shares) or ``family/sub-family``."""

    def __init__(self, jitter: Jitter | None = None) -> None:
        self.jitter = jitter or Jitter()

    def render(self, kind: str, size: int, rng: np.random.Generator, jitter: Jitter | None = None) -> tuple[np.ndarray, str]:
        """(premultiplied RGBA layer [size, size, 4] in [0, 1], its name) for one draw of ``kind``, placed
        by ``jitter`` (default: this generator's) on a face aligned to the 112 template scaled to ``size``."""
        family, _, sub = kind.partition("/")
        if family not in FAMILIES or (sub and sub not in FAMILIES[family]):
            raise DataError(f"unknown drawn occluder {kind!r}; expected one of {list(DRAWN_KINDS)}")
        if not sub:
            names, shares = zip(*FAMILIES[family].items())
            sub = names[rng.choice(len(names), p=np.asarray(shares) / sum(shares))]
        jitter = jitter or self.jitter
        placement = jitter.sample(rng, EYE_CENTER if family == "veil" else NOSE_TIP)
        # Template coordinates of each output pixel's centre (pixel centres at integers, as in
        # occface's other warps: pixel i of a 112 crop is template coordinate i).
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) * np.float32(112.0 / size)
        inverse = np.linalg.inv(placement).astype(np.float32)
        u = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
        v = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
        edge = 112.0 / size  # one output pixel, in template units
        if family == "veil":
            alpha, rgb = self._veil(sub, u, v, edge, rng)
        else:
            alpha, rgb = self._facemask(sub, u, v, edge, rng)
        alpha = alpha.astype(np.float32)
        layer = np.concatenate([rgb * alpha[..., None], alpha[..., None]], axis=2)
        softness = rng.uniform(0.0, 0.9) * size / 112.0
        if softness > 0.15:
            import cv2

            layer = cv2.GaussianBlur(layer, (0, 0), softness)
        layer[..., :3] = np.minimum(layer[..., :3], layer[..., 3:4])
        return np.clip(layer, 0.0, 1.0), f"{family}/{sub}"

    # ------------------------------------------------------------ niqabs
    def _veil(self, sub: str, u: np.ndarray, v: np.ndarray, edge: float, rng: np.random.Generator):
        cx = EYE_CENTER[0] + rng.normal(0, 1.0)
        eye_line = EYE_CENTER[1]
        if sub == "full":
            cloth = np.ones_like(u)
        else:  # a hood round the head, flaring into a drape below the chin
            top = rng.uniform(-12.0, 14.0)
            half = rng.uniform(36.0, 50.0)  # half-width at the eyes
            flare = rng.uniform(0.1, 0.6)
            below = np.maximum(v - eye_line, 0.0)
            width = half + flare * below + 0.004 * below ** 2
            above = np.clip((eye_line - v) / max(eye_line - top, 1.0), 0.0, None)
            width = np.where(v < eye_line, half * np.sqrt(np.clip(1 - above ** 2, 0.0, 1.0)), width)
            cloth = _smooth_inside(np.abs(u - cx) - width, edge) * _smooth_inside(top - v, edge)
        opening, sheer, distance = self._opening(sub, u, v, cx, eye_line, edge, rng)
        alpha = cloth * (1.0 - opening * (1.0 - sheer))
        veil = Cloth.draw(rng, VEIL_COLOURS, dark=True)
        rgb = veil.paint(u, v, rng)
        if rng.random() < 0.3:  # a two-tone niqab: the hood above the opening another cloth
            hood = Cloth.draw(rng, VEIL_COLOURS, dark=True).paint(u, v, rng)
            split = eye_line - rng.uniform(6, 12)
            rgb = np.where((v < split)[..., None], hood, rgb)
        if rng.random() < 0.5:  # a hem round the opening
            hem = _smooth_inside(-distance, edge) * _smooth_inside(distance - rng.uniform(0.8, 2.0), edge)
            tone = rng.uniform(0.5, 1.6)
            rgb = np.clip(rgb * (1 + (tone - 1) * hem[..., None]), 0, 1)
        return np.clip(alpha, 0, 1), rgb

    def _opening(self, sub: str, u, v, cx: float, eye_line: float, edge: float, rng: np.random.Generator):
        """(opening coverage in [0, 1], see-through alpha of what covers it, the approximate signed
        distance to its edge in template pixels) for the eye opening."""
        width = rng.uniform(1.3, 2.25) * EYE_DISTANCE
        height = rng.uniform(6.0, 20.0)
        centre_y = eye_line + rng.uniform(-4.0, 3.0)
        bend = rng.uniform(-4.0, 4.0)  # the opening's ends up (-) or down (+)
        tilt = math.radians(rng.normal(0, 2.0))
        point = rng.uniform(1.2, 4.0)  # 1.2: pointed ends, 4: nearly a rectangle
        x = ((u - cx) * math.cos(tilt) + (v - centre_y) * math.sin(tilt)) / (width / 2)
        y = (-(u - cx) * math.sin(tilt) + (v - centre_y) * math.cos(tilt) - bend * x ** 2) / (height / 2)
        level = np.abs(x) ** point + np.abs(y) ** 2
        distance = (np.sqrt(level) - 1.0) * min(width, height) / 2  # approximately signed, in template px
        opening = _smooth_inside(distance, edge)
        if sub == "two-hole":
            band = rng.uniform(3.0, 10.0)
            opening = opening * (1.0 - _smooth_inside(np.abs(u - cx) - band / 2, edge))
        sheer = rng.uniform(0.35, 0.75) if sub == "sheer" else 0.0
        return opening, sheer, distance

    # ------------------------------------------------------------ face masks
    def _facemask(self, sub: str, u: np.ndarray, v: np.ndarray, edge: float, rng: np.random.Generator):
        cx = NOSE_TIP[0] + rng.normal(0, 1.0)
        top = rng.uniform(55.0, 66.0)
        bottom = rng.uniform(104.0, 120.0)
        dx = u - cx
        if sub == "surgical":
            half_top, half_bottom = rng.uniform(34, 44), rng.uniform(26, 36)
            t = np.clip((v - top) / (bottom - top), 0, 1)
            half = half_top + (half_bottom - half_top) * t
            inside = (_smooth_inside(np.abs(dx) - half, edge) * _smooth_inside(top + 0.004 * dx ** 2 - v, edge)
                      * _smooth_inside(v - bottom + 0.006 * dx ** 2, edge))
        elif sub == "cloth":
            peak = rng.uniform(2.0, 8.0)  # the top rises to a peak over the nose
            half = rng.uniform(34, 44)
            top_curve = top - peak * np.exp(-(dx / 12.0) ** 2) + 0.006 * dx ** 2
            bottom_curve = bottom - 0.012 * dx ** 2
            inside = (_smooth_inside(np.abs(dx) - half, edge) * _smooth_inside(top_curve - v, edge)
                      * _smooth_inside(v - bottom_curve, edge))
        else:  # respirator: a dome over nose and mouth
            centre = (top + bottom) / 2 - rng.uniform(0, 6)
            top -= rng.uniform(0, 6)
            rx, ry = rng.uniform(28, 38), (bottom - top) / 2
            inside = _smooth_inside((np.sqrt((dx / rx) ** 2 + ((v - centre) / ry) ** 2) - 1) * min(rx, ry), edge)
        fabric = Cloth.draw(rng, MASK_COLOURS)
        fabric.folds *= 0.4
        rgb = fabric.paint(u, v, rng)
        if sub == "surgical":  # pleats
            for k in range(3):
                y = top + (bottom - top) * (0.25 + 0.2 * k) + rng.normal(0, 1)
                rgb = rgb * (1 - 0.25 * _smooth_inside(np.abs(v - y) - 0.7, edge))[..., None]
        elif sub == "cloth" and rng.random() < 0.6:  # a pattern, and the centre seam
            pattern = rng.integers(3)
            period = rng.uniform(4, 10)
            if pattern == 0:
                marks = np.sin((u + v) * 2 * math.pi / period) > 0.6
            elif pattern == 1:
                marks = (np.hypot((u % period) - period / 2, (v % period) - period / 2) < period / 5)
            else:
                marks = (np.sin(u * 2 * math.pi / period) > 0.7) | (np.sin(v * 2 * math.pi / period) > 0.7)
            other = Cloth.draw(rng, MASK_COLOURS).colour / 255.0
            rgb = np.where(marks[..., None], other[None, None, :] * (rgb.mean(2, keepdims=True) + 0.3), rgb)
            rgb = rgb * (1 - 0.3 * _smooth_inside(np.abs(dx) - 0.5, edge))[..., None]
        elif sub == "respirator" and rng.random() < 0.5:  # a vertical fold
            rgb = rgb * (1 - 0.2 * _smooth_inside(np.abs(dx) - 0.6, edge))[..., None]
        straps = np.zeros_like(u)
        if sub != "respirator" or rng.random() < 0.5:
            for side in (-1, 1):
                y0 = top + rng.uniform(4, 12)
                along = np.clip((side * dx - 30) / 30, 0, 1)
                line = np.abs(v - (y0 - 6 * along)) - 0.8
                straps = np.maximum(straps, _smooth_inside(line, edge) * (side * dx > 30) * (side * dx < 62))
        strap_colour = np.full(3, rng.uniform(0.75, 0.95))
        alpha = np.maximum(inside, straps)
        rgb = np.where((straps > inside)[..., None], strap_colour[None, None, :], rgb)
        return np.clip(alpha, 0, 1), np.clip(rgb, 0, 1)
