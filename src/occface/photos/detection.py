"""Faces in photos: YuNet (OpenCV's ``cv2.FaceDetectorYN``), boxes and five points.

Everything here works on RGB ``uint8 [H, W, 3]`` arrays (what :func:`occface.data.images.read_image`
returns); OpenCV's BGR order stays inside :class:`FaceDetector`. The detector file (YuNet 2023mar,
from the OpenCV model zoo) is found and verified by :mod:`occface.photos.model_files`: an explicit
path, ``$OCCFACE_DETECTOR``, then ``$OCCFACE_HOME`` (default ``~/.cache/occface``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.errors import DataError
from ..errors import InputError
from . import model_files
from .geometry import apply_transform, compose, invert_transform, similarity_transform, template, warp_face

DETECTOR = model_files.MODEL_FILES["detector"]
DETECTOR_NAME, DETECTOR_SHA256, DETECTOR_SOURCE = DETECTOR.name, DETECTOR.sha256, DETECTOR.source

#: Views tried, in order, on a photo with no face found: (degrees turned, zoom).
DEFAULT_RETRIES = ((0.0, 1.0), (25.0, 1.0), (-25.0, 1.0), (0.0, 2.0), (20.0, 2.0), (-20.0, 2.0))


def default_detector_path() -> Path:
    """Where occface looks for the detector when no path is given: ``$OCCFACE_HOME`` (default
    ``~/.cache/occface``)/face_detection_yunet_2023mar.onnx."""
    return model_files.occface_home() / DETECTOR_NAME


def find_detector(path: str | Path | None = None) -> Path:
    """The detector file: ``path``, else ``$OCCFACE_DETECTOR``, else :func:`default_detector_path`."""
    found = model_files.lookup("detector", path)
    if found.exists:
        return found.path
    if found.how in ("explicit path", "$OCCFACE_DETECTOR"):
        raise InputError(f"{found.path}: face detector not found (expected YuNet 2023mar, {DETECTOR_NAME})")
    raise InputError(f"no face detector: photos need YuNet 2023mar ({DETECTOR_NAME}, sha256 {DETECTOR_SHA256}) "
                     f"from {DETECTOR_SOURCE}; put it at {found.path} (`occface models install DIR`), or pass "
                     "--detector PATH or set OCCFACE_DETECTOR")


def verify_detector(path: Path) -> None:
    """Raise an InputError unless ``path`` is the YuNet 2023mar file (by size and sha256)."""
    model_files.verify("detector", path)


@dataclass
class Detection:
    """One face in a photo: ``box`` (x, y, width, height), ``landmarks`` [5, 2] in YuNet's order
    (see :data:`occface.photos.geometry.ARCFACE_112`), ``score`` in [0, 1]; all in the photo's pixels."""

    box: np.ndarray
    landmarks: np.ndarray
    score: float

    @property
    def size(self) -> float:
        """The box's shorter side in pixels."""
        return float(min(self.box[2], self.box[3]))


class FaceDetector:
    """YuNet through OpenCV. ``detect(image)`` -> faces, largest first.

    Photos are scaled so their longer side is at most ``max_side`` pixels (YuNet finds faces from
    about 10 px up; bigger inputs only cost time). When nothing is found, the photo is tried again
    in each of the views ``retries`` gives as (degrees turned, zoom), until one has a face: at zoom 1
    inside a border of half its size (crops where the face fills the frame). YuNet misses faces
    tilted by 30 degrees and small faces under a niqab far more often than upright ones.
    """

    def __init__(self, path: str | Path | None = None, score_threshold: float = 0.5, nms_threshold: float = 0.3,
                 max_side: int = 640, retries: tuple[tuple[float, float], ...] = DEFAULT_RETRIES,
                 verify: bool = True) -> None:
        import cv2

        self.path = find_detector(path)
        from cv2.utils import logging as cv2_logging

        cv2_logging.setLogLevel(cv2_logging.LOG_LEVEL_ERROR)  # OpenCV 5 warns about DNN targets on every load
        if verify:
            verify_detector(self.path)
        self.score_threshold, self.max_side, self.retries = score_threshold, max_side, tuple(retries)
        try:
            self._net = cv2.FaceDetectorYN.create(str(self.path), "", (320, 320), score_threshold, nms_threshold, 5000)
        except cv2.error as error:
            raise InputError(f"{self.path}: OpenCV could not load the face detector ({error})") from error

    def _run(self, bgr: np.ndarray) -> list[Detection]:
        height, width = bgr.shape[:2]
        self._net.setInputSize((width, height))
        _, found = self._net.detect(bgr)
        if found is None:
            return []
        return [Detection(row[:4].astype(np.float64), row[4:14].reshape(5, 2).astype(np.float64), float(row[14]))
                for row in found]

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in an RGB ``uint8 [H, W, 3]`` photo, largest box first."""
        import cv2

        if image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"face detection needs an RGB image [H, W, 3], got shape {list(image.shape)}")
        height, width = image.shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        bgr = np.ascontiguousarray(image[..., ::-1])
        if scale < 1.0:
            bgr = cv2.resize(bgr, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
        to_photo = np.array([[1 / scale, 0, 0], [0, 1 / scale, 0]])
        faces, to_view = self._run(bgr), np.array([[1.0, 0, 0], [0, 1.0, 0]])
        for angle, zoom in self.retries if not faces else ():
            view, to_view = _view(bgr, angle, zoom)
            faces = self._run(view)
            if faces:
                break
        back = compose(to_photo, invert_transform(to_view))
        return sorted((_mapped(face, back) for face in faces), key=lambda f: -f.box[2] * f.box[3])

    def refine(self, image: np.ndarray, detection: Detection, size: int = 224, mirror: bool = True,
               near: float = 1 / 3) -> Detection:
        """Landmarks found again on an upright view of the face (aligned at ``size`` scale, in a canvas
        with a margin) and, with ``mirror``, on its mirror image, the two averaged. YuNet's landmarks
        drift on faces tilted by 20-30 degrees (10 px mean eye error at 112 scale for a 30 degree
        tilt) and are more precise on large faces; each pass brings them closer. A face in the view
        counts when its eye centre lies within ``near`` x ``size`` of where the detection put it
        (the drift of a tilted or masked face reaches a fifth of the face); the detection unchanged
        when none does."""
        margin = size // 3
        canvas = size + 2 * margin
        expected = template(size) + margin
        centre = expected[:2].mean(0)
        to_view = similarity_transform(detection.landmarks, expected)
        view = np.ascontiguousarray(warp_face(image, to_view, canvas)[..., ::-1])
        estimates, scores = [], []
        for flipped in (False, True) if mirror else (False,):
            found = self._run(np.ascontiguousarray(view[:, ::-1]) if flipped else view)
            for face in found:
                if flipped:  # back from the mirror: x -> canvas - 1 - x, and the left and right points swap
                    face.landmarks[:, 0] = canvas - 1 - face.landmarks[:, 0]
                    face.landmarks = face.landmarks[[1, 0, 2, 4, 3]]
            close = [f for f in found if np.linalg.norm(f.landmarks[:2].mean(0) - centre) < near * size]
            if close:
                best = max(close, key=lambda f: f.score)
                estimates.append(best.landmarks)
                scores.append(best.score)
        if not estimates:
            return detection
        landmarks = apply_transform(invert_transform(to_view), np.mean(estimates, axis=0))
        return Detection(detection.box, landmarks, max(detection.score, *scores))


def _view(bgr: np.ndarray, angle: float, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    """(view, matrix [2, 3] image -> view): the image turned by ``angle`` degrees and scaled by
    ``zoom`` about its centre, on a canvas that holds it whole; at zoom 1 with a border of half the
    image's size, for crops where the face fills the frame."""
    import cv2

    height, width = bgr.shape[:2]
    pad = max(height, width) / 2 if zoom <= 1 else 0.0
    canvas_w, canvas_h = round(width * zoom + 2 * pad), round(height * zoom + 2 * pad)
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, zoom)
    matrix[:, 2] += (canvas_w - width) / 2, (canvas_h - height) / 2
    return cv2.warpAffine(bgr, matrix, (canvas_w, canvas_h), flags=cv2.INTER_LINEAR), matrix


def _mapped(face: Detection, matrix: np.ndarray) -> Detection:
    """A detection moved by an affine [2, 3]: landmarks mapped; the box as the bounding box of its
    mapped corners."""
    x, y, w, h = face.box
    corners = apply_transform(matrix, np.array([[x, y], [x + w, y], [x, y + h], [x + w, y + h]]))
    low, high = corners.min(0), corners.max(0)
    return Detection(np.array([*low, *(high - low)]), apply_transform(matrix, face.landmarks), face.score)
