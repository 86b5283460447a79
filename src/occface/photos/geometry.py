"""The geometry of alignment: the ArcFace template and 2-D similarity and affine maps.

Points are ``[N, 2]`` arrays of (x, y) pixel coordinates (pixel centres at integers, as OpenCV's
warps take them); an affine map is a ``[2, 3]`` matrix ``[A | t]`` taking ``p`` to ``A p + t``.
"""
from __future__ import annotations

import numpy as np

from ..data.placement import LEFT_EYE, MOUTH_LEFT, MOUTH_RIGHT, NOSE_TIP, RIGHT_EYE

#: ArcFace's five points for a 112x112 face, in YuNet's landmark order: the eye on the image's left
#: (the subject's right), the other eye, nose tip, mouth corner on the image's left, the other one.
ARCFACE_112 = np.array([LEFT_EYE, RIGHT_EYE, NOSE_TIP, MOUTH_LEFT, MOUTH_RIGHT], dtype=np.float64)


def template(size: int = 112) -> np.ndarray:
    """The five template points [5, 2] for a ``size`` x ``size`` face (the 112 template scaled)."""
    return ARCFACE_112 * (size / 112.0)


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The similarity (scale, rotation, shift; no reflection) [2, 3] that maps the points ``source``
    [N, 2] onto ``target`` [N, 2] with the least squared error (Umeyama's closed form; N >= 2)."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    mu_s, mu_t = source.mean(0), target.mean(0)
    s, t = source - mu_s, target - mu_t
    covariance = t.T @ s / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    variance = (s ** 2).sum() / len(source)
    scale = float((singular * sign).sum() / variance) if variance > 0 else 1.0
    shift = mu_t - scale * rotation @ mu_s
    return np.hstack([scale * rotation, shift[:, None]])


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points [N, 2] mapped by an affine [2, 3]."""
    points = np.asarray(points, np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def invert_transform(matrix: np.ndarray) -> np.ndarray:
    """The inverse of an affine [2, 3]."""
    linear = np.linalg.inv(matrix[:, :2])
    return np.hstack([linear, (-linear @ matrix[:, 2])[:, None]])


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The affine [2, 3] applying ``inner`` then ``outer``."""
    return np.hstack([outer[:, :2] @ inner[:, :2], (outer[:, :2] @ inner[:, 2] + outer[:, 2])[:, None]])


def warp_face(image: np.ndarray, matrix: np.ndarray, size: int = 112) -> np.ndarray:
    """The ``size`` x ``size`` crop of ``image`` [H, W, 3] under ``matrix`` (image -> crop), black outside."""
    import cv2

    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(0, 0, 0))
