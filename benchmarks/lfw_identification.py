"""1:N identification on LFW through an occface gallery: clean probes and probes behind occluders.

The 1,559 people of ``lfw112`` with at least two images: the first image of each is enrolled clean,
the other 3,420 are probes; the 2,722 people with one image are enrolled as distractors (4,281 faces
in the gallery). Each probe is searched (``Gallery.search``: FAISS shortlist of 100 by embedding,
then QAConv plain and weighted and the fusion) clean and with each occluder of ``--probes``
(``niqab``: the overlay image; ``procedural niqab``: occface's flat drawn one; ``veil``: the drawn
distribution; any name of ``niqab_lfw.OCCLUDERS``). Reported per model and probe set:

- rank-1 and rank-5 identification rate (closed set: every probe's person is enrolled);
- TPIR at FPIR 1% (open set): the threshold lets 1% of non-mated searches through (a probe's
  non-mated search is the same search with its own person left out, so its best other score), and
  TPIR is the share of probes whose person is first and above that threshold;

for the embedding alone, the re-rank as the model fuses for search (calibrated on searches of its
validation people, where it has that calibration) and the re-rank fused as calibrated on pairs.
A model without QAConv calibration (the embedding-only baseline) is reported by its embedding.

    python benchmarks/lfw_identification.py --data ../shared/data \\
        --model full=runs/niqab_lfw_pretrained/full/model --model baseline=runs/niqab_lfw_pretrained/baseline/model \\
        --probes "clean,niqab,procedural niqab,veil"
"""
from __future__ import annotations

import argparse
import copy
import json
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


def probe_faces(data: Path, clean: list[np.ndarray], name: str, seed: int) -> list[np.ndarray]:
    """The probes with occluder ``name`` synthesised on each (seeded per probe set)."""
    from niqab_lfw import OCCLUDERS

    from occface.data import OcclusionSynthesizer

    if name == "clean":
        return clean
    source, kind = OCCLUDERS[name]
    synthesizer = (OcclusionSynthesizer.from_directory(data / "occluders", [kind]) if source == "overlay" else
                   OcclusionSynthesizer([], [kind]))
    rng = np.random.default_rng((seed, sorted(OCCLUDERS).index(name)))
    return [synthesizer(face, rng, kind)[0] for face in clean]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with lfw112/ and occluders/")
    parser.add_argument("--model", action="append", required=True,
                        help="NAME=DIR (repeatable), or DIR: occface model folders")
    parser.add_argument("--probes", default="clean,niqab", help="comma-separated probe sets: clean and occluders")
    parser.add_argument("--shortlist", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if not (args.data / "lfw112").is_dir() or not (args.data / "occluders").is_dir():
        print(f"{args.data}: lfw112/ or occluders/ not found; this benchmark needs the workplace's real face data",
              file=sys.stderr)
        return 2
    from occface.data.images import read_image
    from occface.galleries import Gallery
    from occface.models import OccFaceModel

    people = lfw_people(args.data / "lfw112")
    enrolled = [(images[0], name) for name, images in people.items()]
    probes = [(image, name) for name, images in people.items() if len(images) > 1 for image in images[1:]]
    mated = sum(len(images) > 1 for images in people.values())
    print(f"gallery: {len(enrolled)} faces ({mated} people with probes, {len(enrolled) - mated} distractors); "
          f"probes: {len(probes)} a set")
    clean = [read_image(path) for path, _ in probes]
    truth = [name for _, name in probes]
    probe_sets = {name: probe_faces(args.data, clean, name, args.seed) for name in args.probes.split(",")}
    table: dict = {}
    for spec in args.model:
        name, _, folder = spec.rpartition("=")
        name, folder = name or Path(spec).parent.name, Path(folder)
        model = OccFaceModel.from_pretrained(folder)
        calibration = model.config.calibration
        with tempfile.TemporaryDirectory() as work:
            gallery = Gallery.create(Path(work) / "lfw.gallery", model, folder)
            start = time.perf_counter()
            gallery.enroll(enrolled, precision=args.precision, progress=True)
            print(f"{name}: enrolment {len(enrolled) / (time.perf_counter() - start):.0f} faces/s")
            fused = bool(calibration.get("normalization"))
            for label, faces in probe_sets.items():
                start = time.perf_counter()
                results = gallery.search(faces, top=args.shortlist, shortlist=args.shortlist, precision=args.precision)
                print(f"{name}, {label} probes: {len(faces) / (time.perf_counter() - start):.1f} searches/s")
                rows = table.setdefault(name, {}).setdefault(label, {})
                rows["embedding only"] = rates(results, truth, "embedding")
                if not fused:
                    continue
                which = results[0].calibration if results else "none"
                rows[f"shortlist + re-rank, fused as calibrated on {which}"] = rates(results, truth, "fused")
                if which == "search":  # the same searches fused as calibrated on pairs, for comparison
                    pairs_only = {k: v for k, v in calibration.items() if k != "search"}
                    model.config.calibration = pairs_only
                    again = gallery.search(faces, top=args.shortlist, shortlist=args.shortlist,
                                           precision=args.precision)
                    model.config.calibration = copy.deepcopy(calibration)
                    rows["shortlist + re-rank, fused as calibrated on pairs"] = rates(again, truth, "fused")
    print("\n| model | probes | search | rank-1 | rank-5 | TPIR @ FPIR 1% |\n|---|---|---|---|---|---|")
    for name, by_probes in table.items():
        for label, rows in by_probes.items():
            for search, values in rows.items():
                print(f"| {name} | {label} | {search} | {100 * values['rank-1']:.1f}% | {100 * values['rank-5']:.1f}% | "
                      f"{100 * values['tpir@fpir=1e-2']:.1f}% |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
