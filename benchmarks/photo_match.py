"""What alignment from photos costs in matching: LFW pairs scored from their aligned crops and from
photos of the same faces.

Each pair's first face stays clean; the second is clean or gets the niqab / medical-mask overlay
(``occluders/``). The two faces are scored by ``occface.match.match`` (the path ``occface match``
takes) twice: as the aligned 112x112 crops, and after being pasted into 640x480 scenes by a random
similarity (``align_bench.paste``: 0.9-2.5x, ±30°) and found and aligned again by occface's aligner.
Per condition: pairs whose photo gave no face, and the ROC AUC of the embedding and of the fused
score from crops and from photos (over the pairs where both faces were found).

    python benchmarks/photo_match.py --data ../shared/data --model runs/niqab_lfw_pretrained/full/model \\
        --models ../shared/models --pairs 300 [--landmarks yunet]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with lfw112/, lfw112_pairs.txt, occluders/")
    parser.add_argument("--model", type=Path, required=True, help="an occface model directory (with calibration)")
    parser.add_argument("--detector", default=None, help="YuNet 2023mar .onnx (default: as occface finds it)")
    parser.add_argument("--models", type=Path, default=None, help="folder of the model files (default: OCCFACE_HOME, ...)")
    parser.add_argument("--landmarks", default="auto", choices=("auto", "mesh", "yunet"))
    parser.add_argument("--pairs", type=int, default=300, help="pairs a condition: half same (fold 1), half not")
    parser.add_argument("--conditions", default="clean,mask,niqab", help="comma-separated: clean, mask, niqab")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for needed in ("lfw112_pairs.txt", "occluders"):
        if not (args.data / needed).exists():
            print(f"{args.data / needed}: not found; this benchmark needs the workplace's real face data", file=sys.stderr)
            return 2
    from sklearn.metrics import roc_auc_score

    from align_bench import paste
    from occface.photos import FaceAligner
    from occface.data import OcclusionSynthesizer, read_pairs_txt
    from occface.data.images import read_image
    from occface.match import match
    from occface.models import OccFaceModel

    pair_set = read_pairs_txt(args.data / "lfw112_pairs.txt", args.data / "lfw112")
    half = min(args.pairs // 2, 300)
    chosen = np.concatenate([np.arange(half), 300 + np.arange(half)])  # fold 1: 300 same, then 300 not
    model = OccFaceModel.from_pretrained(args.model).eval()
    files = {}
    if args.models is not None:
        files = {"face_mesh": args.models / "face_landmark.tflite", "iris": args.models / "iris_landmark.tflite"}
        args.detector = args.detector or args.models / "face_detection_yunet_2023mar.onnx"
    aligner = FaceAligner(args.detector, landmarks=args.landmarks, **files)
    overlays = OcclusionSynthesizer.from_directory(args.data / "occluders", ["niqab", "mask"])
    print(f"model {args.model}; landmarks {aligner.landmark_source}; {len(chosen)} LFW pairs a condition (fold 1), "
          "the occluder on the second face; AUCs over the pairs whose photos both gave a face\n")
    print("| second face | pairs without a face found | AUC embedding / fused, from the crops | from the photos | seconds |")
    print("|---|---|---|---|---|")
    for condition in args.conditions.split(","):
        rng = np.random.default_rng(args.seed)
        crops, photos, same, missed, tick = [], [], [], 0, time.perf_counter()
        for index in chosen:
            first, second = (read_image(pair_set.images[i]) for i in pair_set.pairs[index])
            if condition != "clean":
                second = overlays(second, rng, condition)[0]
            scores = match(model, first, second, precision="fp32")["scores"]
            crops.append((scores["embedding"], scores["fused"]))
            found = [aligner.align(paste(face, rng)[0]).faces for face in (first, second)]
            if not all(found):
                missed += 1
                photos.append((np.nan, np.nan))
            else:
                scores = match(model, found[0][0].image, found[1][0].image, precision="fp32")["scores"]
                photos.append((scores["embedding"], scores["fused"]))
            same.append(bool(pair_set.issame[index]))
        crops, photos, same = np.array(crops), np.array(photos), np.array(same)
        ok = ~np.isnan(photos[:, 0])

        def aucs(scores: np.ndarray, keep: np.ndarray) -> str:
            return " / ".join(f"{roc_auc_score(same[keep], scores[keep, k]):.4f}" for k in (0, 1))

        print(f"| {condition} | {missed} of {len(chosen)} | {aucs(crops, ok)} | {aucs(photos, ok)} | "
              f"{time.perf_counter() - tick:.0f} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
