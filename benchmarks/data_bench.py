"""Data throughput: procedural face generation and occlusion synthesis, in images per second.

    python benchmarks/data_bench.py                          # procedural faces and occluders only
    python benchmarks/data_bench.py --data ../shared/data    # also real faces with RGBA overlays

Figures: generation in memory (render only) and to disk (PNG writing included); synthesis in
memory (composite only) and to disk (``occface synth``: read, composite, write image and mask).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from occface.data import OcclusionSynthesizer, ProceduralFaces, read_image
from occface.data.tools import synthesize_dataset


def rate(count: int, start: float) -> float:
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="folder with faces112/ and occluders/")
    args = parser.parse_args()
    rows = []
    faces = ProceduralFaces(50, 20, seed=0)
    start = time.perf_counter()
    for identity in range(50):
        for index in range(20):
            faces.render(identity, index)
    rows.append(("procedural faces, render", 1000, rate(1000, start)))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        ProceduralFaces(25, 20, seed=1).write(Path(tmp) / "faces")
        rows.append(("procedural faces, to PNG files", 500, rate(500, start)))
        _, count, speed = synthesize_dataset(Path(tmp) / "faces", Path(tmp) / "occ", None, ("niqab", "mask", "sunglasses"))
        rows.append(("synth to disk, procedural occluders", count, speed))
        if args.data:
            _, count, speed = synthesize_dataset(args.data / "faces112", Path(tmp) / "occ_real", args.data / "occluders")
            rows.append(("synth to disk, real faces + overlays", count, speed))

    face = faces.render(0, 0) if args.data is None else read_image(next((args.data / "faces112").glob("*/*.png")))
    sources = [("procedural occluders", None)] + ([("RGBA overlays", args.data / "occluders")] if args.data else [])
    for name, occluders in sources:
        synthesizer = OcclusionSynthesizer.from_directory(occluders)
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        for _ in range(500):
            synthesizer(face, rng)
        rows.append((f"composite in memory, {name}", 500, rate(500, start)))

    print(f"{'task':<42} {'images':>7} {'images/s':>9}")
    for task, count, speed in rows:
        print(f"{task:<42} {count:>7} {speed:>9.0f}")


if __name__ == "__main__":
    main()
