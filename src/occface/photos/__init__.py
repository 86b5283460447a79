"""Photos in: detection (YuNet), landmarks that survive a niqab (MediaPipe Face Mesh + Iris),
alignment to the ArcFace template, whole folders, and the model files all of it needs.

    from occface.photos import FaceAligner
    faces = FaceAligner().align(rgb_photo, all_faces=True).faces   # box, points, source, crop, matrix

Modules, bottom up: ``geometry`` (template, similarity maps), ``model_files`` (find, verify,
install), ``detection`` (YuNet), ``landmarks`` (Face Mesh + Iris), ``alignment`` (FaceAligner,
FaceReader), ``folder`` (``occface align``).
"""
from .alignment import (FACE_MODES, LANDMARK_MODES, AlignedFace, FaceAligner, FaceMode, FaceReader, PhotoFaces,
                        align_face, landmark_refiner)
from .detection import (DEFAULT_RETRIES, DETECTOR_NAME, DETECTOR_SHA256, DETECTOR_SOURCE, Detection, FaceDetector,
                        default_detector_path, find_detector, verify_detector)
from .geometry import (ARCFACE_112, apply_transform, compose, invert_transform, similarity_transform, template,
                       warp_face)
from .landmarks import LandmarkRefiner, Landmarks

__all__ = ["ARCFACE_112", "DEFAULT_RETRIES", "DETECTOR_NAME", "DETECTOR_SHA256", "DETECTOR_SOURCE", "FACE_MODES",
           "LANDMARK_MODES", "AlignedFace", "Detection", "FaceAligner", "FaceDetector", "FaceMode", "FaceReader",
           "LandmarkRefiner", "Landmarks", "PhotoFaces", "align_face", "apply_transform", "compose",
           "default_detector_path", "find_detector", "invert_transform", "landmark_refiner", "similarity_transform",
           "template", "verify_detector", "warp_face"]
