"""Verification with and without occlusion weighting, by pair type, and its report.

Score sources: ``embedding`` (cosine of flip-and-norm fused embeddings, as AdaFace evaluates),
``qaconv`` (QAConv without visibility maps), ``qaconv_weighted`` (with the predicted maps) and
``fused`` (``fusion_weight`` * z-scored embedding + (1 - ``fusion_weight``) * z-scored weighted
QAConv; z-scores use the mean and std of each source over the evaluated pairs).
Pair types: ``occluded-occluded``, ``occluded-clean``, ``clean-clean`` and ``all``.

Metrics per (source, pair type): 10-fold accuracy (the threshold chosen on nine folds), ROC AUC,
EER, and TAR at FAR 1e-1 / 1e-2 / 1e-3 / 1e-4 where there are enough negative pairs to measure
it (at least 1/FAR; otherwise the entry is None and ``notes`` says why).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data.datasets import FaceSample
from .models.occface import OccFaceModel

log = logging.getLogger(__name__)

SOURCES = ("embedding", "qaconv", "qaconv_weighted", "fused")
PAIR_TYPES = ("occluded-occluded", "occluded-clean", "clean-clean", "all")
FARS = (1e-1, 1e-2, 1e-3, 1e-4)


@dataclass
class Features:
    """Per image: embedding [N, 512] (flip-fused, unit norm), feature_map [N, C, H, W],
    occlusion [N, 1, H, W] (predicted visibility), occluded [N] bool, mask [N, 1, S, S] or None."""

    embedding: torch.Tensor
    feature_map: torch.Tensor
    occlusion: torch.Tensor
    occluded: torch.Tensor
    mask: torch.Tensor | None = None


@torch.inference_mode()
def extract_features(model: OccFaceModel, dataset: Dataset, batch_size: int = 64, device: str | torch.device = "cpu",
                     keep_masks: bool = False, progress: bool = False) -> Features:
    """Run the model over a dataset of :class:`FaceSample`. Embeddings are fused with those of the
    mirrored images weighted by their norms (AdaFace's flip-and-norm fusion)."""
    model = model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="features", unit="batch")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("embedding", "feature_map", "occlusion", "occluded", "mask")}
    for batch in loader:
        batch: FaceSample
        images = batch.image.to(device)
        out = model(images)
        flipped = model.backbone(images.flip(3))
        fused = out.embedding * out.norm + flipped.embedding * flipped.norm
        parts["embedding"].append(torch.nn.functional.normalize(fused, dim=1).cpu())
        parts["feature_map"].append(out.feature_map.cpu())
        parts["occlusion"].append(out.occlusion.cpu())
        parts["occluded"].append(batch.occluded)
        if keep_masks:
            parts["mask"].append(batch.mask)
    return Features(*(torch.cat(parts[k]) for k in ("embedding", "feature_map", "occlusion", "occluded")),
                    torch.cat(parts["mask"]) if keep_masks else None)


def pair_scores(model: OccFaceModel, features: Features, pairs: np.ndarray, fusion_weight: float = 0.5) -> dict[str, np.ndarray]:
    """Scores of every source for pairs [N, 2] of feature indices."""
    left, right = torch.as_tensor(pairs[:, 0]), torch.as_tensor(pairs[:, 1])
    qaconv = model.qaconv.cpu().eval()
    scores = {
        "embedding": (features.embedding[left] * features.embedding[right]).sum(1).numpy(),
        "qaconv": qaconv.score_pairs(features.feature_map[left], features.feature_map[right]).numpy(),
        "qaconv_weighted": qaconv.score_pairs(features.feature_map[left], features.feature_map[right],
                                              features.occlusion[left], features.occlusion[right]).numpy(),
    }

    def z(values: np.ndarray) -> np.ndarray:
        return (values - values.mean()) / (values.std() + 1e-12)

    scores["fused"] = fusion_weight * z(scores["embedding"]) + (1 - fusion_weight) * z(scores["qaconv_weighted"])
    return scores


def pair_types(occluded: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Pair type of each pair from the per-image occluded flags."""
    count = occluded[pairs[:, 0]].astype(int) + occluded[pairs[:, 1]].astype(int)
    return np.array(["clean-clean", "occluded-clean", "occluded-occluded"])[count]


def _best_threshold(scores: np.ndarray, issame: np.ndarray) -> float:
    candidates = np.unique(scores)
    if len(candidates) > 2000:
        candidates = np.quantile(scores, np.linspace(0, 1, 2001))
    accuracy = [((scores >= t) == issame).mean() for t in candidates]
    return float(candidates[int(np.argmax(accuracy))])


def verification_metrics(scores: np.ndarray, issame: np.ndarray, folds: np.ndarray | None = None,
                         num_folds: int = 10, seed: int = 0) -> dict:
    """Accuracy (k-fold: threshold chosen on the other folds), AUC, EER and TAR@FAR for one score set."""
    from sklearn.metrics import roc_auc_score, roc_curve
    from sklearn.model_selection import StratifiedKFold

    scores, issame = np.asarray(scores, np.float64), np.asarray(issame, bool)
    result: dict = {"pairs": int(len(scores)), "positives": int(issame.sum()), "negatives": int((~issame).sum())}
    if issame.all() or not issame.any():
        result.update(accuracy=None, auc=None, eer=None, note="needs both same and different pairs")
        return result
    if folds is None:
        splits = max(2, min(num_folds, int(issame.sum()), int((~issame).sum())))
        folds = np.zeros(len(scores), int)
        for k, (_, test) in enumerate(StratifiedKFold(splits, shuffle=True, random_state=seed).split(scores, issame)):
            folds[test] = k
    correct = 0
    for k in np.unique(folds):
        test = folds == k
        threshold = _best_threshold(scores[~test], issame[~test]) if (~test).any() else _best_threshold(scores, issame)
        correct += ((scores[test] >= threshold) == issame[test]).sum()
    far, tar, _ = roc_curve(issame, scores)
    eer_index = int(np.nanargmin(np.abs((1 - tar) - far)))
    result.update(accuracy=float(correct / len(scores)), auc=float(roc_auc_score(issame, scores)),
                  eer=float((far[eer_index] + 1 - tar[eer_index]) / 2), threshold=_best_threshold(scores, issame))
    notes = []
    for target in FARS:
        key = f"tar@far={target:.0e}".replace("e-0", "e-")
        if result["negatives"] * target < 1:
            result[key] = None
            notes.append(f"{key} not measurable with {result['negatives']} negative pairs")
        else:
            result[key] = float(np.interp(target, far, tar))
    if notes:
        result["notes"] = notes
    return result


def evaluate_pairs(scores: dict[str, np.ndarray], issame: np.ndarray, types: np.ndarray,
                   folds: np.ndarray | None = None) -> dict:
    """``{source: {pair_type: metrics}}`` for every source and pair type present."""
    metrics: dict = {}
    for source, values in scores.items():
        metrics[source] = {}
        for pair_type in PAIR_TYPES:
            chosen = np.ones(len(values), bool) if pair_type == "all" else types == pair_type
            if chosen.any():
                metrics[source][pair_type] = verification_metrics(
                    values[chosen], issame[chosen], None if folds is None else folds[chosen])
    return metrics


def threshold_at_far(scores: np.ndarray, issame: np.ndarray, far: float) -> float:
    """The lowest threshold whose false-accept rate on these pairs is at most ``far``."""
    negatives = np.sort(np.asarray(scores)[~np.asarray(issame, bool)])[::-1]
    if len(negatives) == 0:
        raise ValueError("calibration needs different-identity pairs")
    allowed = int(np.floor(far * len(negatives)))
    return float(np.nextafter(negatives[allowed], np.inf)) if allowed < len(negatives) else float(negatives[-1])


def summary_table(metrics: dict, key: str = "accuracy") -> str:
    """A Markdown table of one metric: rows = sources, columns = pair types."""
    present = [t for t in PAIR_TYPES if any(t in metrics[s] for s in metrics)]
    lines = ["| source | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
    for source in metrics:
        cells = []
        for pair_type in present:
            value = metrics[source].get(pair_type, {}).get(key)
            percent = key == "accuracy" or key.startswith("tar@")
            cells.append("—" if value is None else f"{100 * value:.1f}%" if percent else f"{value:.3f}")
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_metrics(metrics: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2))
    return path


def plot_roc(scores: dict[str, np.ndarray], issame: np.ndarray, types: np.ndarray, path: str | Path) -> Path:
    """ROC curves (log FAR) of every source, one panel per pair type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    present = [t for t in PAIR_TYPES[:3] if (types == t).any()]
    figure, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.8), squeeze=False)
    for axis, pair_type in zip(axes[0], present):
        chosen = types == pair_type
        if issame[chosen].all() or not issame[chosen].any():
            continue
        for source, values in scores.items():
            far, tar, _ = roc_curve(issame[chosen], values[chosen])
            axis.plot(np.maximum(far, 1e-4), tar, label=source)
        axis.set_xscale("log")
        axis.set_xlim(1e-3, 1)
        axis.set_ylim(0, 1.01)
        axis.set_title(pair_type)
        axis.set_xlabel("false accept rate")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("true accept rate")
    axes[0][0].legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def visibility_grid(images: torch.Tensor, predicted: torch.Tensor, masks: torch.Tensor | None, color_space: str,
                    path: str | Path, columns: int = 8) -> Path:
    """PNG grid: each face, its predicted visibility map and (if given) the ground truth, upsampled."""
    from PIL import Image

    from .data.images import from_model_input

    size = images.shape[-1]
    tiles = []
    for index in range(images.shape[0]):
        face = from_model_input(images[index], color_space)
        maps = [predicted[index]] + ([masks[index]] if masks is not None else [])
        row = [face]
        for visibility in maps:
            up = torch.nn.functional.interpolate(visibility[None].float(), size=(size, size), mode="nearest")[0, 0]
            row.append(np.repeat((up.clamp(0, 1).numpy() * 255).astype(np.uint8)[:, :, None], 3, axis=2))
        tiles.append(np.concatenate(row, axis=1))
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.concatenate([np.concatenate(tiles[i : i + columns], axis=1) for i in range(0, len(tiles), columns)], axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


class _VariantDataset:
    """Base images, some with a synthesised occluder (deterministic per item)."""

    def __init__(self, base, variants: list[tuple[int, bool]], synthesizer, seed: int) -> None:
        self.base, self.variants, self.synthesizer, self.seed = base, variants, synthesizer, seed

    def __len__(self) -> int:
        return len(self.variants)

    def __getitem__(self, item: int) -> FaceSample:
        from .data.images import resize_image, to_model_input

        index, occlude = self.variants[item]
        raw = self.base.read(index)
        image = resize_image(raw.image, self.base.input_size)
        mask = np.ones(image.shape[:2], np.float32)
        if occlude:
            image, mask, _ = self.synthesizer(image, np.random.default_rng((self.seed, item)))
        mask_tensor = torch.from_numpy(np.array(mask, np.float32))[None]
        return FaceSample(to_model_input(image, self.base.color_space), raw.label, mask_tensor, bool(occlude))


@dataclass
class OcclusionPairs:
    """Verification pairs drawn from an identity dataset, with occluders synthesised on the second
    face (occluded-clean) or on both (occluded-occluded). ``dataset`` holds each image variant once;
    ``pairs`` index it."""

    dataset: _VariantDataset
    pairs: np.ndarray
    issame: np.ndarray
    types: np.ndarray

    @classmethod
    def build(cls, base, synthesizer, pairs_per_type: int, seed: int = 0,
              types: tuple[str, ...] = ("occluded-occluded", "occluded-clean", "clean-clean")) -> "OcclusionPairs":
        """Half same-identity, half different-identity pairs of each type (fixed seed)."""
        rng = np.random.default_rng((seed, 7))
        targets = np.asarray(base.targets)
        by_label = {label: np.flatnonzero(targets == label) for label in np.unique(targets[targets >= 0])}
        multi = [label for label, members in by_label.items() if len(members) >= 2]
        labels = list(by_label)
        if not multi or len(labels) < 2:
            raise ValueError("pairs need an identity with two images and at least two identities")
        variants: dict[tuple[int, bool], int] = {}
        pairs, issame, kinds = [], [], []
        for pair_type in types:
            occlude = {"occluded-occluded": (True, True), "occluded-clean": (False, True), "clean-clean": (False, False)}[pair_type]
            for k in range(pairs_per_type):
                if k % 2 == 0:
                    members = by_label[multi[rng.integers(len(multi))]]
                    a, b = rng.choice(members, size=2, replace=False)
                else:
                    first, second = rng.choice(len(labels), size=2, replace=False)
                    a, b = rng.choice(by_label[labels[first]]), rng.choice(by_label[labels[second]])
                ids = [variants.setdefault((int(x), o), len(variants)) for x, o in ((a, occlude[0]), (b, occlude[1]))]
                pairs.append(ids)
                issame.append(k % 2 == 0)
                kinds.append(pair_type)
        dataset = _VariantDataset(base, list(variants), synthesizer, seed)
        return cls(dataset, np.asarray(pairs, np.int64), np.asarray(issame, bool), np.asarray(kinds))


def evaluate_occlusion_pairs(model: OccFaceModel, pairs: OcclusionPairs, batch_size: int = 64,
                             device: str | torch.device = "cpu", fusion_weight: float = 0.5,
                             keep_masks: bool = False) -> tuple[dict, dict[str, np.ndarray], Features]:
    """Metrics of every source and pair type on synthesised occlusion pairs, the raw scores and features."""
    features = extract_features(model, pairs.dataset, batch_size, device, keep_masks=keep_masks)
    scores = pair_scores(model, features, pairs.pairs, fusion_weight)
    return evaluate_pairs(scores, pairs.issame, pairs.types), scores, features


def visibility_statistics(features: Features) -> dict:
    """Mean predicted visibility on occluded and clean faces and, where ground-truth masks were
    kept, the MSE and IoU (maps thresholded at 0.5) against the downsampled masks."""
    from .data.masks import downsample_mask

    occluded = features.occluded
    stats = {
        "mean_visibility_occluded": float(features.occlusion[occluded].mean()) if occluded.any() else None,
        "mean_visibility_clean": float(features.occlusion[~occluded].mean()) if (~occluded).any() else None,
    }
    if features.mask is not None:
        target = downsample_mask(features.mask, tuple(features.occlusion.shape[-2:]))
        stats["mse"] = float(((features.occlusion - target) ** 2).mean())
        hidden_pred, hidden_true = features.occlusion < 0.5, target < 0.5
        union = (hidden_pred | hidden_true).sum()
        stats["iou_occluded_region"] = float((hidden_pred & hidden_true).sum() / union) if union > 0 else None
    return stats


def write_report(out_dir: str | Path, metrics: dict, scores: dict[str, np.ndarray], pairs: OcclusionPairs,
                 features: Features, title: str, extra: dict | None = None, grid_faces: int = 16) -> Path:
    """A report folder: ``metrics.json`` ({source: {pair_type: metrics}} plus ``visibility``),
    ``report.md``, ``roc.png`` and ``visibility_grid.png`` (faces, predicted and true maps)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    visibility = visibility_statistics(features)
    write_metrics({**metrics, "visibility": visibility}, out_dir / "metrics.json")
    plot_roc(scores, pairs.issame, pairs.types, out_dir / "roc.png")
    occluded = np.flatnonzero(features.occluded.numpy())
    clean = np.flatnonzero(~features.occluded.numpy())
    chosen = np.concatenate([occluded[: grid_faces * 3 // 4], clean[: grid_faces // 4]])
    samples = [pairs.dataset[int(i)] for i in chosen]
    visibility_grid(torch.stack([s.image for s in samples]), features.occlusion[chosen],
                    torch.stack([s.mask for s in samples]), pairs.dataset.base.color_space,
                    out_dir / "visibility_grid.png", columns=4)
    lines = [f"# {title}", "", "Verification accuracy (10-fold) by score source and pair type:", "",
             summary_table(metrics), "", "TAR at FAR 1e-2:", "", summary_table(metrics, "tar@far=1e-2"), "",
             "ROC AUC:", "", summary_table(metrics, "auc"), "", "Predicted visibility:", ""]
    lines += [f"- {key}: {'—' if value is None else f'{value:.3f}'}" for key, value in visibility.items()]
    if extra:
        lines += ["", "Run:", ""] + [f"- {key}: {value}" for key, value in extra.items()]
    lines += ["", "Files: `metrics.json`, `roc.png` (ROC per pair type), `visibility_grid.png` (each face, its predicted "
              "visibility map, its ground-truth mask; white = visible)."]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return out_dir
