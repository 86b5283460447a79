"""Landmarks that survive a niqab: MediaPipe's Face Mesh and Iris networks, run by OpenCV's DNN module.

YuNet reads a niqab's eye band as a small whole face and puts the eyes ~20% too close together.
The refinement here starts from a detection and finds the points again, each pass on a level,
square view of the face (all in RGB ``uint8 [H, W, 3]`` photos, points in photo pixels):

1. Face Mesh (468 points, input 192x192) on a view of side 1.5x the detection's box, centred a
   quarter of the box below the detection's eye midpoint and level with its eye line;
2. Face Mesh again on a view of side 3.6 eye distances round the first pass's eyes (centre 0.45 eye
   distances below them);
3. Iris (eyelid contour and iris, input 64x64) on a view of 1.2 eye distances round each eye; the
   network is made for the eye on the image's left, so the other eye's view is mirrored and its
   points mirrored back. Each eye is the mean of its 16 eyelid points.

The five points are the two eyes, the mesh's nose tip (point 4) and mouth corners (61, 291), in
YuNet's order (image-left eye first). The lower three are *trusted* only when the face's lower half
is seen: YuNet's and the mesh's nose and mouth agree (mean distance under 0.14 eye distances) and
the cheeks have the colour of the skin between the eyes (CIELAB distance under 40). Under a niqab
or a mask neither holds; the aligner then uses the eyes alone (see :mod:`occface.photos.alignment`).
Both tests were set on clean and overlay-occluded CFP faces (``benchmarks/align_bench.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .geometry import apply_transform, invert_transform

MESH_SIZE, IRIS_SIZE = 192, 64
#: Face Mesh's eyelid contours (16 points each): the eye on the image's left (the subject's right), the other.
EYE_CONTOURS = ((33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246),
                (362, 382, 381, 380, 374, 373, 390, 249, 263, 466, 388, 387, 386, 385, 384, 398))
#: Face Mesh's nose tip and mouth corners (image-left first): closest to the five-point convention.
LOWER_POINTS = (4, 61, 291)
#: Skin between the eyes (seen through a niqab's slit), the two cheeks and the forehead, for the test.
SKIN_REFERENCE, CHEEKS, FOREHEAD = 168, (205, 425), 151
#: The lower-face test's thresholds (see the module's docstring): the detector's and the mesh's nose
#: and mouth within AGREEMENT_LIMIT eye distances and the cheeks within COLOUR_LIMIT of the skin;
#: failing that, the face counts as covered when its forehead is too (FOREHEAD_LIMIT) or the two
#: disagree by more than COVERED_AGREEMENT: a face turned aside fails the first test, not these.
AGREEMENT_LIMIT, COLOUR_LIMIT, FOREHEAD_LIMIT, COVERED_AGREEMENT = 0.14, 40.0, 30.0, 0.2
#: Where the five-point convention of occface's data (dlib's 68 points reduced to five: each eye the
#: mean of its six contour points) puts each point, relative to these networks' points, in eye
#: distances in the face's level frame (x along the eye line, y down): measured on 600 clean CFP
#: frontal faces by ``benchmarks/landmark_convention.py``. Adding it moves the eyes 1.2% of the eye
#: distance apart and the mouth corners 1.5% apart and 3% down.
CONVENTION_SHIFT = np.array([[-0.0106, 0.0002], [0.0134, -0.0009], [0.0031, 0.0126],
                             [-0.0163, 0.0294], [0.0145, 0.0297]])
MESH_OUTPUTS = ("conv2d_20", "conv2d_30")
IRIS_OUTPUTS = ("output_eyes_contours_and_brows", "output_iris")
SOURCE = "mesh+iris"


def view_matrix(centre: np.ndarray, side: float, angle: float, size: int) -> np.ndarray:
    """The affine [2, 3] from a photo to a ``size`` x ``size`` view: the square of ``side`` photo
    pixels centred on ``centre``, turned by ``-angle`` (radians) so that direction ``angle`` is level.
    ``centre`` goes to the middle of the view's pixel grid, ``(size - 1) / 2`` with pixel centres at
    integers, so a mirrored view is the view of the mirrored photo, pixel for pixel."""
    cos, sin = np.cos(angle), np.sin(angle)
    linear = (size / side) * np.array([[cos, sin], [-sin, cos]])
    middle = np.full(2, (size - 1) / 2)
    return np.hstack([linear, (middle - linear @ np.asarray(centre, np.float64))[:, None]])


def _level(eyes: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(eye distance, angle of the eye line, unit vector "down" the face) of eyes [2, 2]."""
    line = eyes[1] - eyes[0]
    angle = float(np.arctan2(line[1], line[0]))
    return float(np.linalg.norm(line)), angle, np.array([-np.sin(angle), np.cos(angle)])


@dataclass
class Landmarks:
    """What the refinement found for one face, in photo pixels: ``points`` [5, 2] (eyes, nose tip,
    mouth corners, YuNet's order), ``mesh`` [468, 2], whether the ``lower_face_visible`` test passed
    (nose and mouth to be trusted), the mesh's face ``presence`` in [0, 1] and the ``source``."""

    points: np.ndarray
    mesh: np.ndarray
    lower_face_visible: bool
    presence: float
    source: str = SOURCE

    @property
    def eyes(self) -> np.ndarray:
        return self.points[:2]


class LandmarkRefiner:
    """Face Mesh + Iris, from their TFLite files (:mod:`occface.photos.model_files` finds and
    verifies them: explicit path, ``$OCCFACE_FACE_MESH`` / ``$OCCFACE_IRIS``, ``$OCCFACE_HOME``).
    ``refine(photo, eyes, box)`` -> :class:`Landmarks`."""

    def __init__(self, face_mesh: str | Path | None = None, iris: str | Path | None = None, verify: bool = True,
                 convention: bool = True) -> None:
        from . import model_files

        self.convention = convention
        find = model_files.find_verified if verify else model_files.find
        self.mesh_path = find("face_mesh", face_mesh)
        self.iris_path = find("iris", iris)
        self._mesh, self._iris = _load(self.mesh_path, "Face Mesh"), _load(self.iris_path, "Iris")

    def _mesh_pass(self, image: np.ndarray, centre: np.ndarray, side: float, angle: float):
        import cv2

        to_view = view_matrix(centre, side, angle, MESH_SIZE)
        view = cv2.warpAffine(image, to_view, (MESH_SIZE, MESH_SIZE), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT)
        self._mesh.setInput(_blob(view))
        points, presence = self._mesh.forward(list(MESH_OUTPUTS))
        points = points.reshape(468, 3)[:, :2].astype(np.float64)
        return apply_transform(invert_transform(to_view), points), view, points, float(presence.ravel()[0])

    def _eyes(self, image: np.ndarray, eyes: np.ndarray) -> np.ndarray:
        """Both eyes [2, 2] from the Iris network, one batch of two views (the second mirrored)."""
        import cv2

        distance, angle, _ = _level(eyes)
        matrices, views = [], []
        for k in (0, 1):
            to_view = view_matrix(eyes[k], 1.2 * distance, angle, IRIS_SIZE)
            view = cv2.warpAffine(image, to_view, (IRIS_SIZE, IRIS_SIZE), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_REPLICATE)
            views.append(view if k == 0 else view[:, ::-1])
            matrices.append(to_view)
        self._iris.setInput(np.concatenate([_blob(v) for v in views]))
        contours = self._iris.forward(IRIS_OUTPUTS[0]).reshape(2, 71, 3)[:, :16, :2].astype(np.float64)
        result = []
        for k in (0, 1):
            lid = contours[k].copy()
            if k == 1:  # back from the mirror (pixel centres at integers: x -> size - 1 - x)
                lid[:, 0] = IRIS_SIZE - 1 - lid[:, 0]
            result.append(apply_transform(invert_transform(matrices[k]), lid).mean(0))
        return np.array(result)

    def refine(self, image: np.ndarray, eyes: np.ndarray, box: np.ndarray,
               lower: np.ndarray | None = None) -> Landmarks:
        """The landmarks of the face whose detection put the eyes at ``eyes`` [2, 2] (image-left
        first) with ``box`` (x, y, width, height); ``lower`` [3, 2]: the detector's own nose and
        mouth points, for the lower-face test (without them the test fails: eyes only)."""
        eyes = np.asarray(eyes, np.float64)
        side = float(max(box[2], box[3]))
        _, angle, down = _level(eyes)
        mesh, *_ = self._mesh_pass(image, eyes.mean(0) + 0.25 * side * down, 1.5 * side, angle)
        first = _mesh_eyes(mesh)
        distance, angle, down = _level(first)
        mesh, view, view_points, presence = self._mesh_pass(image, first.mean(0) + 0.45 * distance * down,
                                                            3.6 * distance, angle)
        eyes = self._eyes(image, _mesh_eyes(mesh))
        points = np.vstack([eyes, mesh[list(LOWER_POINTS)]])
        if self.convention:
            distance, angle, down = _level(eyes)
            along = np.array([np.cos(angle), np.sin(angle)])
            points = points + distance * (CONVENTION_SHIFT[:, :1] * along + CONVENTION_SHIFT[:, 1:] * down)
        visible = lower is not None and _lower_face_seen(points, np.asarray(lower, np.float64), view, view_points)
        return Landmarks(points, mesh, visible, float(1 / (1 + np.exp(-presence))))


def _mesh_eyes(mesh: np.ndarray) -> np.ndarray:
    return np.stack([mesh[list(contour)].mean(0) for contour in EYE_CONTOURS])


def _lower_face_seen(points: np.ndarray, detector_lower: np.ndarray, view: np.ndarray, view_points: np.ndarray) -> bool:
    """Whether nose and mouth can be trusted: the detector and the mesh agree on them and both
    cheeks have the colour of the skin between the eyes; or, failing that, the face is not covered
    as a niqab covers it (forehead as the skin, the two roughly agreeing). Colours are compared in
    CIELAB in the mesh's 192 view, where the eye distance is 192 / 3.6 px."""
    import cv2

    distance = np.linalg.norm(points[1] - points[0])
    agreement = np.linalg.norm(points[2:] - detector_lower, axis=1).mean() / max(distance, 1e-6)
    lab = cv2.cvtColor(view, cv2.COLOR_RGB2LAB).astype(np.float32)
    radius = max(1, round(0.06 * MESH_SIZE / 3.6))

    def colour(index: int) -> np.ndarray:
        x, y = np.clip(np.round(view_points[index]).astype(int), 0, MESH_SIZE - 1)
        return lab[max(0, y - radius):y + radius + 1, max(0, x - radius):x + radius + 1].reshape(-1, 3).mean(0)

    skin = colour(SKIN_REFERENCE)
    if agreement < AGREEMENT_LIMIT and all(np.linalg.norm(colour(cheek) - skin) < COLOUR_LIMIT for cheek in CHEEKS):
        return True
    covered = np.linalg.norm(colour(FOREHEAD) - skin) > FOREHEAD_LIMIT or agreement > COVERED_AGREEMENT
    return not covered


def _blob(view: np.ndarray) -> np.ndarray:
    """RGB uint8 [S, S, 3] -> float32 [1, 3, S, S] in [0, 1], as both networks take it."""
    return np.ascontiguousarray(view, np.float32).transpose(2, 0, 1)[None] / 255.0


def _load(path: Path, what: str):
    import cv2

    try:
        return cv2.dnn.readNetFromTFLite(str(path))
    except cv2.error as error:
        first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: OpenCV could not load the {what} network ({first})") from error
