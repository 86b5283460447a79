"""Face detection and alignment on photos where the truth is known, clean and with niqabs and masks.

Aligned CFP frontal faces (whose five landmarks are known: ``cfp112/landmarks.csv`` gives the source
points, mapped into the aligned crop by the least-squares similarity that made it) get a niqab, a
medical mask or nothing (``occluders/``), and are pasted into a 640x480 scene (gradient, clutter and
noise backgrounds) by a random similarity: face size 0.9-2.5x the 112 crop, rotation up to ±30°,
anywhere in the frame. occface's aligner (YuNet, then Face Mesh + Iris where their files are found, then a similarity
onto the template) runs on the scene.

Per condition: the share of faces found (the largest face, its eye centre within a third of the eye
distance of the truth), the mean eye-landmark error in the 112 crop's pixels (found eyes mapped back
through the paste transform), the share of faces with both eyes within 5 px, the crop error (how far
the aligned crop's template points lie from where the data set's own alignment put them: 0 for the
crop the model was trained on), the share aligned on the eyes alone, photos/s at 640x480 and the
landmark refinement's milliseconds a face, on this machine's cores.

    python benchmarks/align_bench.py --data ../shared/data --models ../shared/models
    python benchmarks/align_bench.py ... --landmarks yunet      # YuNet's points only (earlier versions)
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

from occface.photos import FaceAligner, apply_transform, compose, invert_transform, similarity_transform, template

SCENE_W, SCENE_H = 640, 480


def true_landmarks(data: Path, count: int, rng: np.random.Generator) -> list[tuple[Path, np.ndarray]]:
    """(aligned CFP frontal face, its five landmarks [5, 2] in the 112 crop) for ``count`` faces."""
    rows = []
    with (data / "cfp112" / "landmarks.csv").open() as handle:
        for row in csv.DictReader(handle):
            if "/frontal/" in row["rel_path"]:
                rows.append(row)
    chosen = rng.choice(len(rows), size=min(count, len(rows)), replace=False)
    faces = []
    for index in chosen:
        row = rows[index]
        source = np.array([[float(row[f"{p}_x"]), float(row[f"{p}_y"])] for p in ("le", "re", "nose", "lm", "rm")])
        if source[0, 0] > source[1, 0]:  # keep the template's order: the image-left eye first
            source[[0, 1]], source[[3, 4]] = source[[1, 0]], source[[4, 3]]
        matrix = similarity_transform(source, template(112))
        faces.append((data / "cfp112" / row["rel_path"], apply_transform(matrix, source)))
    return faces


def background(rng: np.random.Generator) -> np.ndarray:
    """A 640x480 RGB scene: a colour gradient, random rectangles and ellipses, blur and noise."""
    import cv2

    y, x = np.mgrid[0:SCENE_H, 0:SCENE_W].astype(np.float32)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (x / SCENE_W * rng.uniform(-1, 1) + y / SCENE_H * rng.uniform(-1, 1)) % 1.0
    scene = (a * (1 - t[..., None]) + b * t[..., None]).astype(np.uint8)
    for _ in range(rng.integers(0, 12)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        p = rng.integers(0, [SCENE_W, SCENE_H])
        if rng.random() < 0.5:
            cv2.rectangle(scene, tuple(int(v) for v in p), tuple(int(v) for v in p + rng.integers(20, 200, 2)), colour, -1)
        else:
            cv2.ellipse(scene, tuple(int(v) for v in p), tuple(int(v) for v in rng.integers(10, 120, 2)),
                        float(rng.uniform(0, 180)), 0, 360, colour, -1)
    scene = cv2.GaussianBlur(scene, (0, 0), float(rng.uniform(0.5, 3)))
    noise = rng.normal(0, rng.uniform(2, 10), scene.shape)
    return np.clip(scene + noise, 0, 255).astype(np.uint8)


def paste(face: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(scene, matrix [2, 3] from the 112 crop to the scene) with ``face`` under a random similarity."""
    import cv2

    scale = rng.uniform(0.9, 2.5)
    angle = np.deg2rad(rng.uniform(-30, 30))
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    half = 56 * scale * 1.42
    centre = rng.uniform([half, half], [SCENE_W - half, SCENE_H - half])
    matrix = np.hstack([linear, (centre - linear @ np.array([56.0, 56.0]))[:, None]])
    alpha = np.zeros((112, 112), np.float32)
    alpha[4:-4, 4:-4] = 1.0
    alpha = cv2.GaussianBlur(alpha, (0, 0), 2.0)
    warped = cv2.warpAffine(face, matrix, (SCENE_W, SCENE_H), flags=cv2.INTER_LINEAR)
    weight = cv2.warpAffine(alpha, matrix, (SCENE_W, SCENE_H), flags=cv2.INTER_LINEAR)[..., None]
    scene = background(rng).astype(np.float32)
    return (scene * (1 - weight) + warped * weight).round().astype(np.uint8), matrix


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with cfp112/ and occluders/")
    parser.add_argument("--detector", default=None, help="YuNet 2023mar .onnx (default: as occface finds it)")
    parser.add_argument("--models", type=Path, default=None,
                        help="folder of the model files (default: as occface finds them: OCCFACE_HOME, ...)")
    parser.add_argument("--landmarks", default="auto", choices=("auto", "mesh", "yunet"),
                        help="mesh: Face Mesh + Iris (required); yunet: YuNet's points; auto: mesh where found")
    parser.add_argument("--faces", type=int, default=500, help="faces per condition")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score-threshold", type=float, default=None, help="YuNet score threshold (default: occface's)")
    parser.add_argument("--conditions", default="clean,mask,niqab",
                        help="comma-separated: clean, mask, niqab (the overlays in occluders/), drawn-mask, drawn-niqab "
                             "(occface's procedural occluders: a niqab of one colour over the whole crop but the eye slit)")
    parser.add_argument("--no-retries", action="store_true", help="YuNet once per photo (no retried views)")
    parser.add_argument("--refine", type=int, default=None, help="landmark refinement passes (default: occface's)")
    args = parser.parse_args()
    for needed in ("cfp112/landmarks.csv", "occluders"):
        if not (args.data / needed).exists():
            print(f"{args.data / needed}: not found; this benchmark needs the workplace's real face data", file=sys.stderr)
            return 2
    import cv2

    from occface.photos import FaceDetector
    from occface.data import OcclusionSynthesizer
    from occface.data.images import read_image

    options = {} if args.score_threshold is None else {"score_threshold": args.score_threshold}
    if args.no_retries:
        options["retries"] = ()
    files = {}
    if args.models is not None:
        files = {"face_mesh": args.models / "face_landmark.tflite", "iris": args.models / "iris_landmark.tflite"}
        args.detector = args.detector or args.models / "face_detection_yunet_2023mar.onnx"
    detector = FaceDetector(args.detector, **options)
    aligner = FaceAligner(detector, refine=args.refine, landmarks=args.landmarks, **files)
    print(f"OpenCV {cv2.__version__}, {cv2.getNumThreads()} threads; detector {detector.path} "
          f"(score threshold {detector.score_threshold:g}); landmarks: {aligner.landmark_source}, "
          f"{aligner.refine} YuNet refinement pass(es)")
    overlays = OcclusionSynthesizer.from_directory(args.data / "occluders", ["niqab", "mask"])
    drawn = OcclusionSynthesizer([], ["niqab", "mask"])  # no overlays: both kinds drawn procedurally
    rng = np.random.default_rng(args.seed)
    faces = true_landmarks(args.data, args.faces, rng)
    print(f"\n{len(faces)} CFP frontal faces per condition in 640x480 scenes (scale 0.9-2.5, rotation ±30°)\n")
    print("| faces | found | mean eye error (px at 112) | both eyes within 5 px | crop error (px) | aligned on the eyes "
          "| photos/s | refinement (ms a face) |")
    print("|---|---|---|---|---|---|---|---|")
    for condition in args.conditions.split(","):
        found, errors, within, seconds, crops, on_eyes, refining = 0, [], 0, 0.0, [], 0, 0.0
        for path, truth in faces:
            face = read_image(path)
            if condition.startswith("drawn-"):
                face = drawn(face, rng, condition.removeprefix("drawn-"))[0]
            elif condition != "clean":
                face = overlays(face, rng, condition)[0]
            scene, matrix = paste(face, rng)
            tick = time.perf_counter()
            detections = aligner.detector.detect(scene)
            middle = time.perf_counter()
            result = aligner.face(scene, detections[0]) if detections else None
            seconds += time.perf_counter() - tick
            refining += time.perf_counter() - middle
            if result is None:
                continue
            detected = apply_transform(invert_transform(matrix), result.landmarks)
            eye_distance = np.linalg.norm(truth[1] - truth[0])
            if np.linalg.norm(detected[:2].mean(0) - truth[:2].mean(0)) > eye_distance / 3:
                continue  # the largest detection is not this face
            found += 1
            eye_errors = np.linalg.norm(detected[:2] - truth[:2], axis=1)
            errors.extend(eye_errors)
            within += bool((eye_errors <= 5).all())
            crop = compose(result.matrix, matrix)  # the true crop -> this crop: the identity when perfect
            crops.append(np.linalg.norm(apply_transform(crop, template(112)) - template(112), axis=1).mean())
            on_eyes += result.points_used == "eyes"
        n = len(faces)
        mean_error = f"{np.mean(errors):.2f}" if errors else "—"
        crop_error = f"{np.mean(crops):.2f}" if crops else "—"
        print(f"| {condition} | {100 * found / n:.1f}% ({found}/{n}) | {mean_error} | {100 * within / n:.1f}% | "
              f"{crop_error} | {100 * on_eyes / max(found, 1):.0f}% | {n / seconds:.0f} | {1000 * refining / n:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
