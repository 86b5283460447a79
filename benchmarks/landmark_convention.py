"""Where the five-point convention of occface's data lies relative to Face Mesh + Iris's points.

occface's aligned data (``../shared/data``) was aligned on dlib's 68 landmarks reduced to five (each
eye the mean of its six contour points, the nose tip, the mouth corners). MediaPipe's networks
define their points otherwise: their eyelid-contour means lie ~1% of the eye distance inside
dlib's eye centres, their mouth corners ~3% higher. This script measures the difference on clean
CFP frontal faces, each scaled 2.5x onto a plain canvas (no scene, no occluder), in eye distances
in the face's level frame, and prints it as ``occface.photos.landmarks.CONVENTION_SHIFT``. Faces
are drawn with another seed than ``align_bench.py``'s.

    python benchmarks/landmark_convention.py --data ../shared/data --models ../shared/models
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with cfp112/")
    parser.add_argument("--models", type=Path, required=True, help="folder with face_landmark.tflite, iris_landmark.tflite")
    parser.add_argument("--faces", type=int, default=600)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()
    import cv2

    from align_bench import true_landmarks
    from occface.data.images import read_image
    from occface.photos import LandmarkRefiner, apply_transform
    from occface.photos.landmarks import CONVENTION_SHIFT, _level

    refiner = LandmarkRefiner(args.models / "face_landmark.tflite", args.models / "iris_landmark.tflite",
                              convention=False)
    scale = 2.5
    to_canvas = np.array([[scale, 0, 100.0], [0, scale, 80.0]])
    shifts = []
    for path, truth in true_landmarks(args.data, args.faces, np.random.default_rng(args.seed)):
        canvas = cv2.warpAffine(read_image(path), to_canvas, (480, 440))
        points = apply_transform(to_canvas, truth)
        distance = np.linalg.norm(points[1] - points[0])
        box = np.array([points[0, 0] - 0.5 * distance, points[0, 1] - 0.6 * distance, 2 * distance, 2.2 * distance])
        found = refiner.refine(canvas, points[:2], box, points[2:]).points
        _, angle, down = _level(found[:2])
        along = np.array([np.cos(angle), np.sin(angle)])
        offset = (points - found) / distance  # from the networks' points to the data's convention
        shifts.append(np.stack([offset @ along, offset @ down], axis=1))
    shifts = np.array(shifts)
    print(f"{len(shifts)} clean CFP frontal faces; shift (along the eye line, down), eye distances, mean ± std:")
    for name, mean, std in zip(("eye (image-left)", "eye (image-right)", "nose tip", "mouth (image-left)",
                                "mouth (image-right)"), shifts.mean(0), shifts.std(0)):
        print(f"  {name:<20} {mean[0]:+.4f} ± {std[0]:.4f}, {mean[1]:+.4f} ± {std[1]:.4f}")
    print("CONVENTION_SHIFT = np.array(" + repr(np.round(shifts.mean(0), 4).tolist()) + ")")
    print("in occface now:    np.array(" + repr(np.round(CONVENTION_SHIFT, 4).tolist()) + ")")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
