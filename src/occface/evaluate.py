"""``occface eval``: verification (and identification) with and without occlusion weighting, by
pair type, on pairs with occluders synthesised on one or both faces, and its report.

Scoring is :mod:`occface.scoring`'s, metrics :mod:`occface.metrics`', the report
:mod:`occface.reports`'.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .photos import FaceReader
from .data.datasets import FaceDataset, RawSample
from .data.errors import DataError
from .data.images import resize_image, resize_mask
from .errors import InputError
from .metrics import evaluate_pairs
from .models.occface import OccFaceModel
from .onnx_model import load_face_model
from .precision import describe_precision
from .reports import plot_histograms, write_metrics, write_report
from .scoring import (
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

class VariantDataset(FaceDataset):
    """Images of a base dataset, each optionally with a synthesised occluder (deterministic per
    item): ``variants`` are (base index, occlude) with occlude False, True (a random kind of the
    synthesizer's) or a kind name (e.g. "niqab"). A face counts as occluded when an occluder was
    synthesised on it, when its ground-truth mask has occluded pixels, or when its name is in
    ``occluded_names``."""

    def __init__(self, base: FaceDataset, variants: list[tuple[int, bool | str]], synthesizer=None, seed: int = 0,
                 names: list[str] | None = None, occluded_names: set[str] | None = None) -> None:
        if synthesizer is None and any(occlude for _, occlude in variants):
            raise ValueError("occluded variants need an OcclusionSynthesizer")
        super().__init__(base.input_size, seed=seed)
        self.base, self.variants, self.synthesizer = base, variants, synthesizer
        self.names, self.occluded_names = names, occluded_names or set()
        self.identities = base.identities
        self.targets = [base.targets[index] for index, _ in variants]
        self.occluded_flags = [bool(occlude) for _, occlude in variants]

    def read(self, item: int) -> RawSample:
        index, occlude = self.variants[item]
        raw = self.base.read(index)
        if not occlude:
            return raw
        image = resize_image(raw.image, self.input_size)
        size = self.input_size
        mask = np.ones((size, size), np.float32) if raw.mask is None else resize_mask(raw.mask, size, size)
        kind = occlude if isinstance(occlude, str) else None
        image, visibility, _ = self.synthesizer(image, np.random.default_rng((self.seed, item)), kind)
        return RawSample(image, mask * visibility, raw.label)

    def is_occluded(self, item: int, mask: torch.Tensor) -> bool:
        index, occlude = self.variants[item]
        listed = self.names is not None and self.names[index] in self.occluded_names
        return bool(occlude or listed or super().is_occluded(item, mask))


OCCLUDE_SIDES = {"none": (False, False), "probe": (False, True), "both": (True, True)}


@dataclass
class OcclusionPairs:
    """Verification pairs over a :class:`VariantDataset` (each image variant once); ``pairs``
    index it. The first face of a pair is the gallery side, the second the probe side: an
    occluder "on the probe" goes on the second face, as in the LFW-with-niqab protocol."""

    dataset: VariantDataset
    pairs: np.ndarray
    issame: np.ndarray
    types: np.ndarray  # the intended pair type; the evaluated type comes from the faces' flags
    folds: np.ndarray | None = None

    @classmethod
    def build(cls, base, synthesizer, pairs_per_type: int, seed: int = 0,
              types: tuple[str, ...] = ("occluded-occluded", "occluded-clean", "clean-clean")) -> "OcclusionPairs":
        """Pairs drawn from an identity dataset: half same-identity, half different-identity of each
        type (fixed seed)."""
        rng = np.random.default_rng((seed, 7))
        targets = np.asarray(base.targets)
        by_label = {label: np.flatnonzero(targets == label) for label in np.unique(targets[targets >= 0])}
        multi = [label for label, members in by_label.items() if len(members) >= 2]
        labels = list(by_label)
        if not multi or len(labels) < 2:
            raise InputError("pairs need an identity with two images and at least two identities")
        base_pairs, issame = [], []
        for k in range(pairs_per_type):
            if k % 2 == 0:
                base_pairs.append(rng.choice(by_label[multi[rng.integers(len(multi))]], size=2, replace=False))
            else:
                first, second = rng.choice(len(labels), size=2, replace=False)
                base_pairs.append((rng.choice(by_label[labels[first]]), rng.choice(by_label[labels[second]])))
            issame.append(k % 2 == 0)
        sides = {"occluded-occluded": "both", "occluded-clean": "probe", "clean-clean": "none"}
        return cls.from_pairs(base, np.asarray(base_pairs, np.int64), np.asarray(issame, bool), None,
                              [sides[t] for t in types], synthesizer, seed)

    @classmethod
    def from_pairs(cls, base, pairs: np.ndarray, issame: np.ndarray, folds: np.ndarray | None,
                   sides: list[str], synthesizer=None, seed: int = 0, names: list[str] | None = None,
                   occluded_names: set[str] | None = None) -> "OcclusionPairs":
        """The given pairs once per entry of ``sides`` ("none", "probe" or "both")."""
        variants: dict[tuple[int, bool], int] = {}
        all_pairs, all_same, all_types, all_folds = [], [], [], []
        kind = {"none": "clean-clean", "probe": "occluded-clean", "both": "occluded-occluded"}
        for side in sides:
            if side not in OCCLUDE_SIDES:
                raise ValueError(f"unknown occlusion side {side!r}; expected one of {sorted(OCCLUDE_SIDES)}")
            first, second = OCCLUDE_SIDES[side]
            for a, b in pairs:
                all_pairs.append([variants.setdefault((int(a), first), len(variants)),
                                  variants.setdefault((int(b), second), len(variants))])
            all_same.append(issame)
            all_types += [kind[side]] * len(pairs)
            if folds is not None:
                all_folds.append(folds)
        dataset = VariantDataset(base, list(variants), synthesizer, seed, names, occluded_names)
        return cls(dataset, np.asarray(all_pairs, np.int64).reshape(-1, 2), np.concatenate(all_same),
                   np.asarray(all_types), np.concatenate(all_folds) if folds is not None else None)


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
    from .data import OcclusionSynthesizer
    from .data.tools import open_dataset
    from .data.verification import ImageListDataset, read_bin, read_pairs_txt

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
