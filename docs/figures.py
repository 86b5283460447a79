"""The pictures of the README and the documentation, drawn from occface's own procedural faces (no
data set is needed, and none is shown).

    python docs/figures.py --model occface-demo/run/model      # after `occface demo --out occface-demo`

writes ``docs/images/occluders.jpg`` (a grid of drawn niqabs and masks, one family a row) and
``docs/images/overview.png`` (a face in the demo's procedural niqab beside a clean face of the same identity, each
with the visibility map the model predicts, and their strongest visible-to-visible correspondences).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def occluder_grid(out: Path, columns: int = 8, seed: int = 3) -> Path:
    from PIL import Image

    from occface.data.drawn_occluders import FAMILIES, DrawnOccluders
    from occface.data.procedural import ProceduralFaces
    from occface.data.synth import composite

    faces = ProceduralFaces(columns, 2, seed=seed)
    generator, rng = DrawnOccluders(), np.random.default_rng(seed)
    rows = []
    for family, subs in FAMILIES.items():
        for sub in subs:
            row = [composite(faces.render(k, k % 2), generator.render(f"{family}/{sub}", 112, rng)[0])[0]
                   for k in range(columns)]
            rows.append(np.concatenate(row, axis=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(out, quality=88, optimize=True)
    return out


def overview(model_dir: Path, out: Path, seed: int = 5) -> Path:
    from occface.data.procedural import ProceduralFaces
    from occface.data.synth import OcclusionSynthesizer
    from occface.match import draw_match, match
    from occface.models import OccFaceModel

    model = OccFaceModel.from_pretrained(model_dir).eval()
    faces = ProceduralFaces(60, 16, seed=0)  # the demo's identities; the last 20 were held out of training
    identity = 40  # the first held-out identity
    veiled = OcclusionSynthesizer([], ["niqab"])(faces.render(identity, 3), np.random.default_rng(seed))[0]
    result = match(model, veiled, faces.render(identity, 7), top=10, precision="fp32")
    return draw_match(veiled, faces.render(identity, 7), result, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a model folder (the demo's) for the overview")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "images")
    args = parser.parse_args()
    print(occluder_grid(args.out / "occluders.jpg"))
    if args.model is not None:
        print(overview(args.model, args.out / "overview.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
