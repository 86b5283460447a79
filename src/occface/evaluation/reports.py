"""Evaluation reports: tables, ``metrics.json``, ROC curves, score histograms, visibility grids."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .metrics import PAIR_TYPES, compare_sources
from ..scoring import PAIR_KINDS, Features
from .pairs import OcclusionPairs


def comparison_table(comparisons: dict) -> str:
    """A Markdown table of AUC differences with their 95% intervals; a difference whose interval
    excludes 0 is marked as clear (``>`` or ``<``)."""
    present = [t for t in PAIR_TYPES if any(t in c for c in comparisons.values())]
    lines = ["| comparison | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
    for name, by_type in comparisons.items():
        cells = []
        for pair_type in present:
            entry = by_type.get(pair_type)
            if entry is None:
                cells.append("—")
                continue
            low, high = entry["ci95"]
            verdict = ">" if low > 0 else "<" if high < 0 else "≈"
            cells.append(f"{verdict} {entry['auc_difference']:+.3f} [{low:+.3f}, {high:+.3f}]")
        first, _, second = name.partition("-vs-")
        lines.append(f"| {first} − {second} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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

    present = [t for t in PAIR_KINDS if (types == t).any()]
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


def visibility_grid(images: torch.Tensor, predicted: torch.Tensor, masks: torch.Tensor | None, path: str | Path,
                    columns: int = 8) -> Path:
    """PNG grid: each face (images [N, 3, S, S] RGB in [0, 1]), its predicted visibility map and
    (if given) the ground truth, upsampled."""
    from PIL import Image

    from ..data.images import tile_grid, to_image

    size = images.shape[-1]
    tiles = []
    for index in range(images.shape[0]):
        face = to_image(images[index])
        maps = [predicted[index]] + ([masks[index]] if masks is not None else [])
        row = [face]
        for visibility in maps:
            up = torch.nn.functional.interpolate(visibility[None].float(), size=(size, size), mode="nearest")[0, 0]
            row.append(np.repeat((up.clamp(0, 1).numpy() * 255).astype(np.uint8)[:, :, None], 3, axis=2))
        tiles.append(np.concatenate(row, axis=1))
    grid = tile_grid(tiles, columns)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def visibility_statistics(features: Features) -> dict:
    """Mean predicted visibility on occluded and clean faces and, where ground-truth masks were
    kept, the MSE and IoU (maps thresholded at 0.5) against the downsampled masks."""
    from ..data.masks import downsample_mask

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
    """A report folder: ``metrics.json`` ({source: {pair_type: metrics}} plus ``visibility`` and
    ``comparisons`` from :func:`compare_sources`), ``report.md``, ``roc.png`` and
    ``visibility_grid.png`` (faces, predicted and true maps)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    visibility = visibility_statistics(features)
    comparisons = compare_sources(scores, pairs.issame, pairs.types)
    write_metrics({**metrics, "visibility": visibility, "comparisons": comparisons}, out_dir / "metrics.json")
    plot_roc(scores, pairs.issame, pairs.types, out_dir / "roc.png")
    occluded = np.flatnonzero(features.occluded.numpy())
    clean = np.flatnonzero(~features.occluded.numpy())
    chosen = np.concatenate([occluded[: grid_faces * 3 // 4], clean[: grid_faces // 4]])
    samples = [pairs.dataset[int(i)] for i in chosen]
    visibility_grid(torch.stack([s.image for s in samples]), features.occlusion[chosen],
                    torch.stack([s.mask for s in samples]),
                    out_dir / "visibility_grid.png", columns=4)
    lines = [f"# {title}", "", "Verification accuracy (10-fold) by score source and pair type:", "",
             summary_table(metrics), "", "TAR at FAR 1e-2:", "", summary_table(metrics, "tar@far=1e-2"), "",
             "ROC AUC:", "", summary_table(metrics, "auc"), "", "EER:", "", summary_table(metrics, "eer"), "",
             ("ROC AUC differences with 95% paired-bootstrap intervals over the pairs (`>` / `<`: the interval "
              "excludes 0; `≈`: these pairs cannot tell the two apart; another training run may rank them "
              "differently):"), "", comparison_table(comparisons), "",
             "Predicted visibility:", ""]
    lines += [f"- {key}: {'—' if value is None else f'{value:.3f}'}" for key, value in visibility.items()]
    if extra:
        lines += ["", "Run:", ""] + [f"- {key}: {value}" for key, value in extra.items()]
    lines += ["", "Files: `metrics.json`, `roc.png` (ROC per pair type), `visibility_grid.png` (each face, its predicted "
              "visibility map, its ground-truth mask; white = visible)."]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return out_dir


def plot_histograms(scores: dict[str, np.ndarray], issame: np.ndarray, path: str | Path) -> Path:
    """Score histograms of same- and different-identity pairs, one panel per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(scores), figsize=(3.6 * len(scores), 3.2), squeeze=False)
    for axis, (source, values) in zip(axes[0], scores.items()):
        bins = np.linspace(values.min(), values.max(), 40)
        axis.hist(values[issame], bins=bins, alpha=0.6, label="same identity")
        axis.hist(values[~issame], bins=bins, alpha=0.6, label="different")
        axis.set_title(source)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
