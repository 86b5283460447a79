"""From a photo to aligned faces: detection (YuNet), landmarks that survive a niqab (Face Mesh +
Iris, where their files are installed) and a similarity onto the ArcFace template.

Which points align a face: all five when its lower half is seen; under a niqab or a mask the eyes
alone, mapped onto the template's eyes (the eye line level, the scale from the eye distance), so
that a nose and mouth guessed under the cloth never move the crop. Without the landmark files the
five points are YuNet's, refined on upright views of the face, and occface says so once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ..data.errors import DataError
from ..data.images import read_image
from ..errors import InputError
from .detection import Detection, FaceDetector
from .geometry import similarity_transform, template, warp_face
from .landmarks import LandmarkRefiner, Landmarks

log = logging.getLogger(__name__)

FaceMode = Literal["auto", "aligned", "detect"]
FACE_MODES = ("auto", "aligned", "detect")
LandmarkMode = Literal["auto", "mesh", "yunet"]
LANDMARK_MODES = ("auto", "mesh", "yunet")
_warned: set[str] = set()


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112,
               eyes_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(aligned crop [size, size, 3], matrix [2, 3] photo -> crop) for five landmarks [5, 2] of
    ``image``: the least-squares similarity onto the template, or with ``eyes_only`` the one that
    puts the two eyes exactly on the template's eyes."""
    points, target = (landmarks[:2], template(size)[:2]) if eyes_only else (landmarks, template(size))
    matrix = similarity_transform(points, target)
    return warp_face(image, matrix, size), matrix


@dataclass
class AlignedFace:
    """A face from a photo, all coordinates in the photo's pixels: ``image`` RGB uint8 [size, size, 3],
    the ``detection`` (YuNet's box, points and score), the five ``landmarks`` [5, 2] the alignment
    came from and their ``landmark_source`` (``"mesh+iris"`` or ``"yunet"``), ``points_used``
    (``"five"`` or ``"eyes"``: under a niqab or mask only the eyes align the face) and ``matrix``
    [2, 3], the similarity from photo to crop."""

    image: np.ndarray
    detection: Detection
    matrix: np.ndarray
    landmarks: np.ndarray | None = None
    landmark_source: str = "yunet"
    points_used: str = "five"

    def __post_init__(self) -> None:
        if self.landmarks is None:
            self.landmarks = self.detection.landmarks

    @property
    def box(self) -> np.ndarray:
        """(x, y, width, height) of the detection."""
        return self.detection.box

    @property
    def score(self) -> float:
        """The detector's score in [0, 1]."""
        return self.detection.score

    def describe(self) -> str:
        """E.g. "score 0.93, eyes at [[412, 388], [506, 381]], mesh+iris points, aligned on the eyes"."""
        eyes = self.landmarks[:2].round().astype(int).tolist()
        on = "the eyes" if self.points_used == "eyes" else "five points"
        return f"score {self.score:.2f}, eyes at {eyes}, {self.landmark_source} landmarks, aligned on {on}"


@dataclass
class PhotoFaces:
    """What a photo gave: aligned ``faces`` (largest first), how many faces were ``found`` (of at
    least the minimum size), and the ``reason`` when there are none."""

    faces: list[AlignedFace]
    found: int
    reason: str | None = None


def landmark_refiner(mode: LandmarkMode | LandmarkRefiner | None = "auto", face_mesh: str | Path | None = None,
                     iris: str | Path | None = None) -> LandmarkRefiner | None:
    """The refiner for ``mode``: ``"mesh"`` needs the files (an InputError names the missing or wrong
    one), ``"yunet"`` gives None, ``"auto"`` the refiner where both files are found and verified,
    else None with one warning (per process and reason) that eyes under a niqab will be less precise."""
    if mode is None or isinstance(mode, LandmarkRefiner):
        return mode
    if mode not in LANDMARK_MODES:
        raise InputError(f"landmarks must be one of {LANDMARK_MODES}, got {mode!r}")
    if mode == "yunet":
        return None
    try:
        return LandmarkRefiner(face_mesh, iris)
    except InputError as error:
        if mode == "mesh":
            raise
        reason = str(error)
        if reason not in _warned:
            _warned.add(reason)
            log.warning("landmarks: YuNet's points (less precise under a niqab or mask), because %s; "
                        "`occface models` shows what is installed", reason)
        return None


class FaceAligner:
    """Detects the faces of a photo, finds their landmarks and aligns them.

    Args:
        detector: a :class:`FaceDetector`, or a path to the detector file (None: found as
            :mod:`occface.photos.model_files` says).
        size: side of the aligned faces (112: the ArcFace template).
        min_face: faces whose box is shorter than this many pixels are left out (0: keep all).
        refine: passes of YuNet on an upright view of each face before the landmarks
            (:meth:`FaceDetector.refine`; default 1 with Face Mesh + Iris, 2 with YuNet's points).
        landmarks: ``"auto"`` (Face Mesh + Iris where their files are found, else YuNet's points
            with a warning), ``"mesh"`` (the files are required), ``"yunet"`` (YuNet's points), or
            a :class:`LandmarkRefiner`.
        face_mesh: an explicit path of the Face Mesh file (``face_landmark.tflite``).
        iris: an explicit path of the Iris file (``iris_landmark.tflite``).
    """

    def __init__(self, detector: FaceDetector | str | Path | None = None, size: int = 112, min_face: int = 0,
                 refine: int | None = None, landmarks: LandmarkMode | LandmarkRefiner | None = "auto",
                 face_mesh: str | Path | None = None, iris: str | Path | None = None) -> None:
        self.detector = detector if isinstance(detector, FaceDetector) else FaceDetector(detector)
        self.refiner = landmark_refiner(landmarks, face_mesh, iris)
        self.size, self.min_face = size, min_face
        self.refine = refine if refine is not None else (1 if self.refiner is not None else 2)

    @property
    def landmark_source(self) -> str:
        return "mesh+iris" if self.refiner is not None else "yunet"

    def face(self, image: np.ndarray, detection: Detection) -> AlignedFace:
        """One detected face of ``image``, its landmarks found and the face aligned."""
        for _ in range(self.refine):
            detection = self.detector.refine(image, detection)
        if self.refiner is None:
            crop, matrix = align_face(image, detection.landmarks, self.size)
            return AlignedFace(crop, detection, matrix)
        found: Landmarks = self.refiner.refine(image, detection.landmarks[:2], detection.box, detection.landmarks[2:])
        eyes_only = not found.lower_face_visible
        crop, matrix = align_face(image, found.points, self.size, eyes_only=eyes_only)
        return AlignedFace(crop, detection, matrix, found.points, found.source, "eyes" if eyes_only else "five")

    def align(self, image: np.ndarray, all_faces: bool = False) -> PhotoFaces:
        """The aligned faces of a photo, largest first (without ``all_faces`` only the largest)."""
        found = self.detector.detect(image)
        if not found:
            return PhotoFaces([], 0, f"no face found (YuNet, score >= {self.detector.score_threshold:g})")
        kept = [f for f in found if f.size >= self.min_face]
        if not kept:
            return PhotoFaces([], len(found), f"face too small ({found[0].size:.0f} px, below the minimum of "
                                              f"{self.min_face} px)")
        return PhotoFaces([self.face(image, d) for d in (kept if all_faces else kept[:1])], len(kept))


# ---------------------------------------------------------------- faces for a model
@dataclass
class FaceReader:
    """Reads the face a model sees from an image file: a ``size`` x ``size`` image is taken as aligned
    (``mode="auto"``), anything else is detected and aligned; ``mode`` ``"aligned"`` or ``"detect"``
    forces either. ``landmarks`` as :class:`FaceAligner` takes it. ``counts`` tells how many went
    each way. The aligner is made on first need."""

    size: int = 112
    mode: FaceMode = "auto"
    detector: str | Path | None = None
    min_face: int = 0
    counts: dict = field(default_factory=lambda: {"aligned": 0, "detected": 0})
    landmarks: LandmarkMode = "auto"
    _aligner: FaceAligner | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in FACE_MODES:
            raise InputError(f"faces mode must be one of {FACE_MODES}, got {self.mode!r}")
        if self.landmarks not in LANDMARK_MODES:
            raise InputError(f"landmarks must be one of {LANDMARK_MODES}, got {self.landmarks!r}")

    @property
    def aligner(self) -> FaceAligner:
        if self._aligner is None:
            self._aligner = FaceAligner(self.detector, self.size, self.min_face, landmarks=self.landmarks)
        return self._aligner

    def how(self, image: np.ndarray) -> str:
        """``"aligned"`` or ``"detected"``: what this reader does with ``image``."""
        if self.mode == "aligned" or (self.mode == "auto" and image.shape[:2] == (self.size, self.size)):
            return "aligned"
        return "detected"

    def read_array(self, image: np.ndarray, name: str = "<image>") -> tuple[np.ndarray, AlignedFace | None]:
        """(face RGB uint8 [size, size, 3], the alignment or None for an aligned input) of an RGB
        uint8 image already in memory; ``name`` is used in errors."""
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

    def read(self, source: str | Path | bytes) -> tuple[np.ndarray, AlignedFace | None]:
        """(face RGB uint8 [size, size, 3], the alignment or None for an aligned input)."""
        name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
        return self.read_array(read_image(source), name)

    def __call__(self, source: str | Path | bytes) -> np.ndarray:
        return self.read(source)[0]

    def describe(self) -> str:
        """E.g. "2 taken as aligned, 1 detected and aligned"."""
        return f"{self.counts['aligned']} taken as aligned, {self.counts['detected']} detected and aligned"

    def read_all(self, sources: list[str | Path]) -> list[np.ndarray]:
        """Every source's face; every source that gives none is listed in one DataProblems."""
        from ..data.errors import DataProblems
        from ..progress import progress_bar

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
        from ..data.images import image_size

        if self.mode == "aligned":
            return False
        if self.mode == "detect":
            return True
        return any(not isinstance(s, (bytes, bytearray)) and image_size(s) != (self.size, self.size) for s in sources)
