"""1:N identification on LFW through an occface gallery: clean probes and probes in a niqab.

The 1,559 people of ``lfw112`` with at least two images: the first image of each is enrolled, the
other 3,420 are probes; the 2,722 people with one image are enrolled as distractors (4,281 faces in
the gallery). Each probe is searched (``Gallery.search``: FAISS shortlist of 100 by embedding, then
weighted QAConv and the calibrated fusion) clean, and again with the niqab overlay synthesised on it.
Reported per probe set, for embedding-only search and for shortlist + re-rank:

- rank-1 and rank-5 identification rate (closed set: every probe's person is enrolled);
- TPIR at FPIR 1% (open set): the threshold lets 1% of non-mated searches through — a probe's
  non-mated search is the same search with its own person left out, so its best other score — and
  TPIR is the share of probes whose person is first and above that threshold.

    python benchmarks/lfw_identification.py --data ../shared/data --model runs/niqab_lfw_pretrained/full/model
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def lfw_people(root: Path) -> dict[str, list[Path]]:
    people = defaultdict(list)
    for image in sorted(root.glob("*/*.jpg")):
        people[image.parent.name].append(image)
    return dict(people)


def rates(results, truth: list[str], source: str) -> dict:
    """rank-1, rank-5 and TPIR at FPIR 1% for the candidates ranked by ``source``."""
    ranks, mated, nonmated = [], [], []
    for result, person in zip(results, truth):
        ordered = sorted(result.candidates, key=lambda c: -c.scores[source])
        names = [c.identity for c in ordered]
        ranks.append(names.index(person) + 1 if person in names else len(names) + 1)
        mated.append(ordered[0].scores[source] if names and names[0] == person else -np.inf)
        others = [c.scores[source] for c in ordered if c.identity != person]
        nonmated.append(others[0] if others else -np.inf)
    ranks, mated, nonmated = np.asarray(ranks), np.asarray(mated), np.asarray(nonmated)
    threshold = np.quantile(nonmated, 0.99)
    return {"rank-1": float((ranks == 1).mean()), "rank-5": float((ranks <= 5).mean()),
            "tpir@fpir=1e-2": float((mated > threshold).mean()), "threshold": float(threshold)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with lfw112/ and occluders/")
    parser.add_argument("--model", type=Path, required=True, help="occface model folder (calibrated for the fusion)")
    parser.add_argument("--shortlist", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    args = parser.parse_args()
    if not (args.data / "lfw112").is_dir() or not (args.data / "occluders").is_dir():
        print(f"{args.data}: lfw112/ or occluders/ not found; this benchmark needs the workplace's real face data",
              file=sys.stderr)
        return 2
    from occface.data import OcclusionSynthesizer
    from occface.data.images import read_image
    from occface.gallery import Gallery
    from occface.models import OccFaceModel

    people = lfw_people(args.data / "lfw112")
    enrolled = [(images[0], name) for name, images in people.items()]
    probes = [(image, name) for name, images in people.items() if len(images) > 1 for image in images[1:]]
    mated = sum(len(images) > 1 for images in people.values())
    print(f"gallery: {len(enrolled)} faces ({mated} people with probes, {len(enrolled) - mated} distractors); "
          f"probes: {len(probes)}")
    model = OccFaceModel.from_pretrained(args.model)
    overlays = OcclusionSynthesizer.from_directory(args.data / "occluders", ["niqab"])
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        gallery = Gallery.create(Path(folder) / "lfw.gallery", model, args.model)
        start = time.perf_counter()
        gallery.enroll(enrolled, precision=args.precision, progress=True)
        print(f"enrolment: {len(enrolled) / (time.perf_counter() - start):.0f} faces/s")
        clean = [read_image(path) for path, _ in probes]
        probe_sets = {"clean probes": clean, "niqab probes": [overlays(face, rng, "niqab")[0] for face in clean]}
        truth = [name for _, name in probes]
        table = {}
        for label, faces in probe_sets.items():
            start = time.perf_counter()
            results = gallery.search(faces, top=args.shortlist, shortlist=args.shortlist, precision=args.precision)
            print(f"{label}: {len(faces) / (time.perf_counter() - start):.1f} searches/s")
            table[label] = {"embedding only": rates(results, truth, "embedding")}
            if results and "fused" in results[0].candidates[0].scores:
                table[label]["shortlist + re-rank (fused)"] = rates(results, truth, "fused")
            table[label]["weighted QAConv on the shortlist"] = rates(results, truth, "qaconv_weighted")
    print("\n| probes | search | rank-1 | rank-5 | TPIR @ FPIR 1% |\n|---|---|---|---|---|")
    for label, rows in table.items():
        for search, values in rows.items():
            print(f"| {label} | {search} | {100 * values['rank-1']:.1f}% | {100 * values['rank-5']:.1f}% | "
                  f"{100 * values['tpir@fpir=1e-2']:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
