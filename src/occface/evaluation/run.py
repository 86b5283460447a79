"""``occface eval``: verification (and identification) with and without occlusion weighting, by
pair type, on pairs with occluders synthesised on one or both faces, and its report.

Scoring is :mod:`occface.scoring`'s, the pairs :mod:`occface.evaluation.pairs`', metrics
:mod:`occface.evaluation.metrics`', the report :mod:`occface.evaluation.reports`'.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..data.errors import DataError
from ..errors import InputError
from ..models.occface import OccFaceModel
from ..photos import FaceReader
from ..precision import describe_precision
from ..runtimes.onnx_model import load_face_model
from .metrics import evaluate_pairs
from .pairs import OCCLUDE_SIDES, OcclusionPairs, VariantDataset  # noqa: F401 - re-exported
from .reports import plot_histograms, write_metrics, write_report
from ..scoring import (
    Features,
    FusionWeight,
    calibrated_fusion_weight,
    describe_fusion_weight,
    extract_features,
    pair_scores,
    pair_types,
    score_matrix,
)

log = logging.getLogger(__name__)

def evaluate_occlusion_pairs(model: OccFaceModel, pairs: OcclusionPairs, batch_size: int = 64,
                             device: str | torch.device = "cpu", fusion_weight: FusionWeight = 0.5,
                             keep_masks: bool = False, progress: bool = False,
                             precision: str = "auto") -> tuple[dict, dict[str, np.ndarray], Features]:
    """Metrics of every source and pair type, the raw scores and the features. Pair types come
    from the faces' occluded flags."""
    features = extract_features(model, pairs.dataset, batch_size, device, keep_masks=keep_masks, progress=progress,
                                precision=precision)
    scores = pair_scores(model, features, pairs.pairs, fusion_weight, precision=precision)
    pairs.types = pair_types(features.occluded.numpy(), pairs.pairs)
    return evaluate_pairs(scores, pairs.issame, pairs.types, pairs.folds), scores, features


def identification(model: OccFaceModel, gallery: Features, probe: Features, gallery_labels: np.ndarray,
                   probe_labels: np.ndarray, ranks: tuple[int, ...] = (1, 5), fusion_weight: FusionWeight = 0.5,
                   progress: bool = False, precision: str = "auto") -> dict:
    """Closed-set identification: for each probe, is its identity's gallery face among the top-k
    scores? ``{source: {"rank-1": .., "rank-5": .., "probes": n, "gallery": m}}``."""
    matrices = score_matrix(model, probe, gallery, fusion_weight, precision, progress)
    result = {}
    for source, matrix in matrices.items():
        order = np.argsort(-matrix, axis=1)
        hits = gallery_labels[order] == probe_labels[:, None]
        result[source] = {f"rank-{k}": float(hits[:, :k].any(axis=1).mean()) for k in ranks}
        result[source].update(probes=int(len(probe_labels)), gallery=int(len(gallery_labels)))
    return result


def parse_occlusion_specs(specs: list[str]) -> tuple[list[str], list[str]]:
    """``["none", "niqab:probe", "niqab+mask:both"]`` -> (sides, occluder kinds). All specs that
    occlude must name the same kinds."""
    sides, kinds = [], None
    for spec in specs or ["none"]:
        if spec == "none":
            sides.append("none")
            continue
        kind_text, sep, side = spec.partition(":")
        if not sep or side not in ("probe", "both"):
            raise InputError(f"--occlude {spec!r}: expected none, KIND:probe or KIND:both (KIND e.g. niqab or niqab+mask)")
        spec_kinds = kind_text.split("+")
        if kinds is not None and spec_kinds != kinds:
            raise InputError("all --occlude specs must use the same occluder kinds")
        kinds = spec_kinds
        sides.append(side)
    return sides, kinds or []


def read_occluded_list(path: str | Path, image_root: str | Path | None) -> set[str]:
    """The names in an occluded-list file (paths relative to ``image_root``, one a line; for a .bin,
    ``NAME.bin#INDEX``). A name that is no file under ``image_root`` is an error, not a silent no-op."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: occluded-list file not found")
    listed = {line.strip() for line in path.read_text().splitlines() if line.strip()}
    if image_root is not None:
        unknown = sorted(name for name in listed if not (Path(image_root) / name).is_file())
        if unknown:
            raise DataError(f"{path}: {len(unknown)} name(s) are no image under {image_root}, e.g. {unknown[:3]} "
                            "(the list holds paths relative to the image root, one a line)")
    return listed


def run_eval(model_dir: str | Path, out_dir: str | Path, *, pairs_file: str | Path | None = None,
             root: str | Path | None = None, bin_file: str | Path | None = None, folder: str | Path | None = None,
             occlude: list[str] | None = None, occluders: str | Path | None = None,
             occluded_list: str | Path | None = None, pairs_per_type: int = 600, identification_split: bool = False,
             fusion_weight: FusionWeight | None = None, batch_size: int = 64, seed: int = 0, device: str = "cpu",
             progress: bool = True, faces: FaceReader | None = None, precision: str = "auto", runtime: str = "torch",
             onnx_path: str | Path | None = None) -> dict:
    """The ``occface eval`` command: verification (and optionally identification) with every
    score source, written to ``out_dir`` (metrics.json, report.md, roc.png, histograms.png,
    visibility_grid.png). ``fusion_weight`` None: the model's calibrated weights per visibility
    stratum (:func:`choose_fusion_weights`), or the spec's 0.5 for a model without them. ``faces``:
    how the images of a pairs file are read (photos detected and aligned); default: all aligned.
    ``runtime``, ``onnx_path``: the network in PyTorch or in ONNX Runtime (:func:`load_face_model`)."""
    from ..data import OcclusionSynthesizer
    from ..data.tools import open_dataset
    from ..data.verification import ImageListDataset, read_bin, read_pairs_txt

    model = load_face_model(model_dir, runtime, onnx_path)
    if fusion_weight is None:
        fusion_weight = calibrated_fusion_weight(model)
    sides, kinds = parse_occlusion_specs(occlude or ["none"])
    synthesizer = OcclusionSynthesizer.from_directory(occluders, kinds) if kinds else None
    image_root = folder if folder is not None else root
    listed = read_occluded_list(occluded_list, image_root) if occluded_list else set()
    common = dict(input_size=model.config.input_size)
    identification_result = None
    if folder is not None:
        base = open_dataset(folder, **common)
        paths = getattr(base, "paths", None) or getattr(base, "image_paths", None)
        names = [str(Path(p).relative_to(folder)) for p in paths] if paths else None
        types = tuple({"none": "clean-clean", "probe": "occluded-clean", "both": "occluded-occluded"}[s] for s in sides)
        pairs = OcclusionPairs.build(base, synthesizer, pairs_per_type, seed, types)
        pairs.dataset.names, pairs.dataset.occluded_names = names, listed
        source_name = str(folder)
        if identification_split:
            targets = np.asarray(base.targets)
            first = {}
            for index, label in enumerate(targets):
                if label >= 0:
                    first.setdefault(int(label), index)
            gallery_index = sorted(first.values())
            in_gallery = set(gallery_index)
            probe_index = [i for i in range(len(targets)) if targets[i] >= 0 and i not in in_gallery]
            probe_side = next((s for s in sides if s != "none"), "none")
            gallery = VariantDataset(base, [(i, probe_side == "both") for i in gallery_index], synthesizer, seed + 1, names, listed)
            probes = VariantDataset(base, [(i, probe_side != "none") for i in probe_index], synthesizer, seed + 2, names, listed)
            identification_result = identification(
                model, extract_features(model, gallery, batch_size, device, progress=progress, precision=precision),
                extract_features(model, probes, batch_size, device, progress=progress, precision=precision),
                targets[gallery_index], targets[probe_index], fusion_weight=fusion_weight, progress=progress,
                precision=precision)
    else:
        if bin_file is not None:
            pair_set = read_bin(bin_file)
        elif pairs_file is not None:
            if root is None:
                raise InputError("--pairs needs --root, the folder the pairs file's names refer to")
            pair_set = read_pairs_txt(pairs_file, root)
        else:
            raise InputError("give --pairs with --root, --bin or --folder")
        images = pair_set.images
        if faces is not None:
            faces.size = model.config.input_size
        if faces is not None and faces.needs_detection(images):
            images = faces.read_all(images)
            log.info("%s: %s", pairs_file or bin_file, faces.describe())
        base = ImageListDataset(images, **common)
        pairs = OcclusionPairs.from_pairs(base, pair_set.pairs, pair_set.issame, pair_set.folds, sides, synthesizer,
                                          seed, pair_set.image_names, listed)
        source_name = str(bin_file or pairs_file)
    metrics, scores, features = evaluate_occlusion_pairs(model, pairs, batch_size, device, fusion_weight,
                                                         keep_masks=True, progress=progress, precision=precision)
    out_dir = Path(out_dir)
    header = {"model": str(model_dir), "occlusion": ", ".join(occlude or ["none"]), "pairs": len(pairs.issame),
              "fusion shares": describe_fusion_weight(fusion_weight),
              "precision": describe_precision(precision, device)}
    if runtime == "onnx":
        header["runtime"] = f"ONNX Runtime ({model.onnx_path}; the network in fp32)"
    if faces is not None and faces.counts["detected"]:
        header["faces"] = faces.describe()
    write_report(out_dir, metrics, scores, pairs, features, f"occface eval: {source_name}", header)
    plot_histograms(scores, pairs.issame, out_dir / "histograms.png")
    result = json.loads((out_dir / "metrics.json").read_text())
    if identification_result is not None:
        result["identification"] = identification_result
        write_metrics(result, out_dir / "metrics.json")
        with (out_dir / "report.md").open("a") as handle:
            handle.write("\nClosed-set identification (gallery: first image of each identity):\n\n"
                         "| source | rank-1 | rank-5 | probes | gallery |\n|---|---|---|---|---|\n")
            for source, values in identification_result.items():
                handle.write(f"| {source} | {100 * values['rank-1']:.1f}% | {100 * values['rank-5']:.1f}% | "
                             f"{values['probes']} | {values['gallery']} |\n")
    return result
