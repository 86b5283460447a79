"""Where occluders go on an aligned face: the ArcFace 112x112 template's five points and the random
similarity (scale, shift, rotation) every occluder is placed with."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# ArcFace's five-point template for 112x112 faces.
LEFT_EYE = (38.2946, 51.6963)
RIGHT_EYE = (73.5318, 51.5014)
NOSE_TIP = (56.0252, 71.7366)
MOUTH_LEFT = (41.5493, 92.3655)
MOUTH_RIGHT = (70.7299, 92.2041)
EYE_CENTER = ((LEFT_EYE[0] + RIGHT_EYE[0]) / 2, (LEFT_EYE[1] + RIGHT_EYE[1]) / 2)
EYE_DISTANCE = RIGHT_EYE[0] - LEFT_EYE[0]


@dataclass
class Jitter:
    """Random placement noise: relative scale, shift in template pixels, rotation in degrees."""

    scale: float = 0.08
    shift: float = 3.0
    rotation: float = 8.0

    def sample(self, rng: np.random.Generator, center: tuple[float, float]) -> np.ndarray:
        """A 3x3 similarity about ``center`` in template coordinates."""
        s = 1.0 + rng.uniform(-self.scale, self.scale)
        angle = math.radians(rng.uniform(-self.rotation, self.rotation))
        dx, dy = rng.uniform(-self.shift, self.shift, size=2)
        c, si = math.cos(angle) * s, math.sin(angle) * s
        cx, cy = center
        return np.array([[c, -si, cx - c * cx + si * cy + dx], [si, c, cy - si * cx - c * cy + dy], [0, 0, 1]])
