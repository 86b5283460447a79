"""Faces from photos: detect with YuNet (OpenCV's ``cv2.FaceDetectorYN``) and align to the ArcFace
template by a least-squares similarity transform of the five landmarks.

Everything here works on RGB ``uint8 [H, W, 3]`` arrays (what :func:`occface.data.images.read_image`
returns); OpenCV's BGR order stays inside :class:`FaceDetector`.

The detector is a file (YuNet 2023mar, from the OpenCV model zoo); occface never downloads it. It is
found from, in order: an explicit path, ``$OCCFACE_DETECTOR``, ``$OCCFACE_HOME/face_detection_yunet_2023mar.onnx``
(default ``OCCFACE_HOME``: ``~/.cache/occface``); its sha256 is checked when it is loaded.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .data.errors import DataError
from .data.images import file_sha256, read_image
from .data.synth import LEFT_EYE, MOUTH_LEFT, MOUTH_RIGHT, NOSE_TIP, RIGHT_EYE
from .errors import InputError

log = logging.getLogger(__name__)

#: ArcFace's five points for a 112x112 face, in YuNet's landmark order: the eye on the image's left
#: (the subject's right), the other eye, nose tip, mouth corner on the image's left, the other one.
ARCFACE_112 = np.array([LEFT_EYE, RIGHT_EYE, NOSE_TIP, MOUTH_LEFT, MOUTH_RIGHT], dtype=np.float64)

DETECTOR_NAME = "face_detection_yunet_2023mar.onnx"
DETECTOR_SHA256 = "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"
DETECTOR_SOURCE = ("the OpenCV model zoo (github.com/opencv/opencv_zoo, models/face_detection_yunet/"
                   f"{DETECTOR_NAME})")

#: Views tried, in order, on a photo with no face found: (degrees turned, zoom).
DEFAULT_RETRIES = ((0.0, 1.0), (25.0, 1.0), (-25.0, 1.0), (0.0, 2.0), (20.0, 2.0), (-20.0, 2.0))

FaceMode = Literal["auto", "aligned", "detect"]
FACE_MODES = ("auto", "aligned", "detect")


# ---------------------------------------------------------------- geometry
def template(size: int = 112) -> np.ndarray:
    """The five template points [5, 2] for a ``size`` x ``size`` face (the 112 template scaled)."""
    return ARCFACE_112 * (size / 112.0)


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The similarity (scale, rotation, shift; no reflection) [2, 3] that maps the points ``source``
    [N, 2] onto ``target`` [N, 2] with the least squared error (Umeyama's closed form)."""
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


def warp_face(image: np.ndarray, matrix: np.ndarray, size: int = 112) -> np.ndarray:
    """The ``size`` x ``size`` crop of ``image`` [H, W, 3] under ``matrix`` (image -> crop), black outside."""
    import cv2

    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(0, 0, 0))


# ---------------------------------------------------------------- the detector file
def default_detector_path() -> Path:
    """Where occface looks for the detector when no path is given: ``$OCCFACE_HOME`` (default
    ``~/.cache/occface``)/face_detection_yunet_2023mar.onnx."""
    home = os.environ.get("OCCFACE_HOME") or Path.home() / ".cache" / "occface"
    return Path(home) / DETECTOR_NAME


def find_detector(path: str | Path | None = None) -> Path:
    """The detector file: ``path``, else ``$OCCFACE_DETECTOR``, else :func:`default_detector_path`."""
    if path is None:
        path = os.environ.get("OCCFACE_DETECTOR") or None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: face detector not found (expected YuNet 2023mar, {DETECTOR_NAME})")
        return path
    default = default_detector_path()
    if default.is_file():
        return default
    raise InputError(f"no face detector: photos need YuNet 2023mar ({DETECTOR_NAME}, sha256 {DETECTOR_SHA256}) "
                     f"from {DETECTOR_SOURCE}; put it at {default}, or pass --detector PATH or set OCCFACE_DETECTOR")


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime: float) -> str:  # cached while the file is unchanged
    return file_sha256(path)


def verify_detector(path: Path) -> None:
    """Raise an InputError unless ``path`` is the YuNet 2023mar file (by its sha256)."""
    stat = path.stat()
    found = _sha256(str(path), stat.st_size, stat.st_mtime)
    if found != DETECTOR_SHA256:
        raise InputError(f"{path}: not the YuNet 2023mar face detector (sha256 {found}, expected {DETECTOR_SHA256}; "
                         f"get {DETECTOR_NAME} from {DETECTOR_SOURCE})")


# ---------------------------------------------------------------- detection
@dataclass
class Detection:
    """One face in a photo: ``box`` (x, y, width, height), ``landmarks`` [5, 2] in YuNet's order
    (see :data:`ARCFACE_112`), ``score`` in [0, 1]; all in the photo's pixel coordinates."""

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
        back = _compose(to_photo, invert_transform(to_view))
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


def _compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The affine [2, 3] applying ``inner`` then ``outer``."""
    return np.hstack([outer[:, :2] @ inner[:, :2], (outer[:, :2] @ inner[:, 2] + outer[:, 2])[:, None]])


def _mapped(face: Detection, matrix: np.ndarray) -> Detection:
    """A detection moved by an affine [2, 3]: landmarks mapped; the box as the bounding box of its
    mapped corners."""
    x, y, w, h = face.box
    corners = apply_transform(matrix, np.array([[x, y], [x + w, y], [x, y + h], [x + w, y + h]]))
    low, high = corners.min(0), corners.max(0)
    return Detection(np.array([*low, *(high - low)]), apply_transform(matrix, face.landmarks), face.score)


# ---------------------------------------------------------------- alignment
@dataclass
class AlignedFace:
    """A face cut from a photo: ``image`` RGB uint8 [size, size, 3], the ``detection`` it came from
    and ``matrix`` [2, 3], the similarity from photo to crop coordinates."""

    image: np.ndarray
    detection: Detection
    matrix: np.ndarray


@dataclass
class PhotoFaces:
    """What a photo gave: aligned ``faces`` (largest first), how many faces were ``found`` (of at
    least the minimum size), and the ``reason`` when there are none."""

    faces: list[AlignedFace]
    found: int
    reason: str | None = None


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """(aligned crop [size, size, 3], matrix [2, 3]) for five landmarks [5, 2] of ``image``."""
    matrix = similarity_transform(landmarks, template(size))
    return warp_face(image, matrix, size), matrix


class FaceAligner:
    """Detects and aligns the faces of a photo.

    Args:
        detector: a :class:`FaceDetector`, or a path to the detector file (None: found as
            :func:`find_detector` says).
        size: side of the aligned faces (112: the ArcFace template).
        min_face: faces whose box is shorter than this many pixels are left out (0: keep all).
        refine: passes that find the landmarks again on an upright view of each face
            (:meth:`FaceDetector.refine`; 0: YuNet's landmarks as they come).
    """

    def __init__(self, detector: FaceDetector | str | Path | None = None, size: int = 112, min_face: int = 0,
                 refine: int = 2) -> None:
        self.detector = detector if isinstance(detector, FaceDetector) else FaceDetector(detector)
        self.size, self.min_face, self.refine = size, min_face, refine

    def align(self, image: np.ndarray, all_faces: bool = False) -> PhotoFaces:
        """The aligned faces of a photo, largest first (without ``all_faces`` only the largest)."""
        found = self.detector.detect(image)
        if not found:
            return PhotoFaces([], 0, f"no face found (YuNet, score >= {self.detector.score_threshold:g})")
        kept = [f for f in found if f.size >= self.min_face]
        if not kept:
            return PhotoFaces([], len(found), f"face too small ({found[0].size:.0f} px, below the minimum of "
                                              f"{self.min_face} px)")
        faces = []
        for detection in kept if all_faces else kept[:1]:
            for _ in range(self.refine):
                detection = self.detector.refine(image, detection)
            crop, matrix = align_face(image, detection.landmarks, self.size)
            faces.append(AlignedFace(crop, detection, matrix))
        return PhotoFaces(faces, len(kept))


# ---------------------------------------------------------------- faces for a model
@dataclass
class FaceReader:
    """Reads the face a model sees from an image file: a ``size`` x ``size`` image is taken as aligned
    (``mode="auto"``), anything else is detected and aligned; ``mode`` ``"aligned"`` or ``"detect"``
    forces either. ``counts`` tells how many went each way. The aligner is made on first need."""

    size: int = 112
    mode: FaceMode = "auto"
    detector: str | Path | None = None
    min_face: int = 0
    counts: dict = field(default_factory=lambda: {"aligned": 0, "detected": 0})
    _aligner: FaceAligner | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in FACE_MODES:
            raise InputError(f"faces mode must be one of {FACE_MODES}, got {self.mode!r}")

    @property
    def aligner(self) -> FaceAligner:
        if self._aligner is None:
            self._aligner = FaceAligner(self.detector, self.size, self.min_face)
        return self._aligner

    def how(self, image: np.ndarray) -> str:
        """``"aligned"`` or ``"detected"``: what this reader does with ``image``."""
        if self.mode == "aligned" or (self.mode == "auto" and image.shape[:2] == (self.size, self.size)):
            return "aligned"
        return "detected"

    def read(self, source: str | Path | bytes) -> tuple[np.ndarray, AlignedFace | None]:
        """(face RGB uint8 [size, size, 3], the alignment or None for an aligned input)."""
        name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
        image = read_image(source)
        if self.how(image) == "aligned":
            if image.shape[:2] != (self.size, self.size):
                raise DataError(f"{name}: expected a face aligned to the {self.size}x{self.size} ArcFace template, "
                                f"got {image.shape[1]}x{image.shape[0]} (let occface detect and align it: "
                                "--faces auto or detect)")
            self.counts["aligned"] += 1
            return image, None
        result = self.aligner.align(image)
        if not result.faces:
            raise DataError(f"{name}: {result.reason}")
        if result.found > 1:
            log.warning("%s: %d faces found; using the largest", name, result.found)
        self.counts["detected"] += 1
        return result.faces[0].image, result.faces[0]

    def __call__(self, source: str | Path | bytes) -> np.ndarray:
        return self.read(source)[0]

    def describe(self) -> str:
        """E.g. "2 taken as aligned, 1 detected and aligned"."""
        return f"{self.counts['aligned']} taken as aligned, {self.counts['detected']} detected and aligned"

    def read_all(self, sources: list[str | Path]) -> list[np.ndarray]:
        """Every source's face; every source that gives none is listed in one DataProblems."""
        from .data.errors import DataProblems
        from .progress import progress_bar

        faces, problems = [], []
        for source in progress_bar(sources, desc="faces", unit="image", leave=False):
            try:
                faces.append(self(source))
            except DataError as error:
                problems.append(str(error))
        if problems:
            raise DataProblems(f"{len(problems)} of {len(sources)} images", problems + [
                "align photos beforehand with `occface align IN OUT` to see every failure in OUT/failures.csv"])
        return faces

    def needs_detection(self, sources: list) -> bool:
        """Whether any of ``sources`` (paths; encoded bytes count as aligned) is read as a photo."""
        from .data.images import image_size

        if self.mode == "aligned":
            return False
        if self.mode == "detect":
            return True
        return any(not isinstance(s, (bytes, bytearray)) and image_size(s) != (self.size, self.size) for s in sources)
