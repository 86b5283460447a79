"""Verification with and without occlusion weighting, by pair type, and its report.

Score sources: ``embedding`` (cosine of flip-and-norm fused embeddings, as AdaFace evaluates),
``qaconv`` (QAConv without visibility maps), ``qaconv_weighted`` (with the predicted maps) and
``fused`` (``w`` * z-scored embedding + (1 - ``w``) * z-scored weighted QAConv; z-scores use the
mean and std of each source over the evaluated pairs of the same visibility stratum: clean-clean,
occluded-clean or occluded-occluded as the model's predicted maps say). ``w`` is one number (the
spec's 0.5) or one per stratum, as :func:`choose_fusion_weights` picks them on validation pairs
when a model is trained; a model stores its weights with its calibration.
Pair types: ``occluded-occluded``, ``occluded-clean``, ``clean-clean`` and ``all``.

Metrics per (source, pair type): 10-fold accuracy (the threshold chosen on nine folds), ROC AUC,
EER, and TAR at FAR 1e-1 / 1e-2 / 1e-3 / 1e-4 where there are enough negative pairs to measure
it (at least 1/FAR; otherwise the entry is None and ``notes`` says why). Between sources, per pair
type: the ROC AUC difference with a 95% paired-bootstrap interval (:func:`compare_sources`).
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .align import FaceReader
from .data.datasets import FaceDataset, FaceSample, RawSample
from .data.errors import DataError
from .data.images import resize_image, resize_mask
from .errors import InputError
from .models.occface import OccFaceModel
from .precision import compute_dtype, describe_precision

log = logging.getLogger(__name__)

SOURCES = ("embedding", "qaconv", "qaconv_weighted", "fused")
PAIR_KINDS = ("occluded-occluded", "occluded-clean", "clean-clean")
PAIR_TYPES = (*PAIR_KINDS, "all")
# The embedding's share in the fused score: one number, or {stratum or "all": share}.
FusionWeight = Union[float, dict]
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
                     keep_masks: bool = False, progress: bool = False, precision: str = "auto") -> Features:
    """Run the model over a dataset of :class:`FaceSample`. Embeddings are fused with those of the
    mirrored images weighted by their norms (AdaFace's flip-and-norm fusion). ``precision``
    (:mod:`occface.precision`): the network may run in bf16; everything kept is fp32."""
    from .precision import autocast, check_cpu_bf16, network_precision

    model = model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    if progress:
        from .progress import progress_bar

        loader = progress_bar(loader, desc="features", unit="batch")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("embedding", "feature_map", "occlusion", "occluded", "mask")}
    chosen = None
    for batch in loader:
        batch: FaceSample
        images = batch.image.to(device)
        if chosen is None:
            chosen = network_precision(model, images, precision, network_key(model), device)
            check_cpu_bf16(compute_dtype(chosen, device), device, "extract_features")
        with autocast(chosen, device):
            out = model(images)
            parts["embedding"].append(model.fused_embedding(images, out).cpu())
        parts["feature_map"].append(out.feature_map.float().cpu())
        parts["occlusion"].append(out.occlusion.float().cpu())
        parts["occluded"].append(batch.occluded)
        if keep_masks:
            parts["mask"].append(batch.mask)
    return Features(*(torch.cat(parts[k]) for k in ("embedding", "feature_map", "occlusion", "occluded")),
                    torch.cat(parts["mask"]) if keep_masks else None)


def network_key(model: OccFaceModel) -> tuple:
    """What :func:`occface.precision.network_precision` measures once per process."""
    config = model.config
    return ("network", config.arch, config.width, config.feature_level)


def matcher_dtype(qaconv, feature_map: torch.Tensor, precision: str) -> torch.dtype:
    """The dtype of QAConv's correlations for ``precision`` on the CPU: "auto" times a block of
    pair scores (up to 64 pairs of the given maps [N, C, H, W]) in fp32 and in bf16."""
    probe = feature_map[:64]
    key = ("qaconv", *probe.shape[1:])
    return compute_dtype(precision, "cpu", key=key,
                         fp32_run=lambda: qaconv.score_pairs(probe, probe.flip(0), dtype=torch.float32),
                         bf16_run=lambda: qaconv.score_pairs(probe, probe.flip(0), dtype=torch.bfloat16))


def pair_scores(model: OccFaceModel, features: Features, pairs: np.ndarray, fusion_weight: FusionWeight = 0.5,
                normalization: dict | None = None, precision: str = "auto") -> dict[str, np.ndarray]:
    """Scores of every source for pairs [N, 2] of feature indices. ``fused`` z-scores the
    embedding and weighted-QAConv scores per visibility stratum (:func:`pair_strata`, with the
    model's stored rule) with ``normalization`` (from :func:`fusion_normalization`) if given,
    otherwise with their mean and std over these pairs. ``precision``: of QAConv's correlations
    (:mod:`occface.precision`); scores are fp32."""
    left, right = torch.as_tensor(pairs[:, 0]), torch.as_tensor(pairs[:, 1])
    qaconv = cpu_matcher(model)
    dtype = matcher_dtype(qaconv, features.feature_map, precision)
    scores = {
        "embedding": (features.embedding[left] * features.embedding[right]).sum(1).numpy(),
        "qaconv": qaconv.score_pairs(features.feature_map[left], features.feature_map[right], dtype=dtype).numpy(),
        "qaconv_weighted": qaconv.score_pairs(features.feature_map[left], features.feature_map[right],
                                              features.occlusion[left], features.occlusion[right], dtype=dtype).numpy(),
    }
    rule = normalization or strata_rule(model)
    strata = pair_strata(features, pairs, rule)
    stats = normalization or fusion_normalization(scores, strata, rule)
    scores["fused"] = fuse(scores["embedding"], scores["qaconv_weighted"], stats, fusion_weight, strata)
    return scores


def cpu_matcher(model: OccFaceModel):
    """An eval-mode CPU copy of the model's QAConv (features are kept on the CPU), leaving the
    model itself where and as it is (e.g. on a GPU, in training mode)."""
    return copy.deepcopy(model.qaconv).cpu().eval()


# A face counts as occluded for score normalisation when at least HIDDEN_SHARE of its visibility map
# is below HIDDEN_BELOW: a region confidently hidden, not a map that is unsure everywhere. On LFW with
# a niqab (benchmark models) this matches the synthesised occlusion on 99.9-100% of the pairs; a rule
# on the mean visibility (below 0.6) put 53 of the 7,701 clean faces among the occluded ones. A
# medical mask hides far less of the map than a niqab, and most masked faces fall below this share;
# with ``train.calibrate_strata`` a model stores a share chosen on its validation faces instead
# (:func:`choose_strata_rule`).
HIDDEN_BELOW = 0.2
HIDDEN_SHARE = 0.25


def predicted_occluded(occlusion: torch.Tensor, rule: dict | None = None) -> np.ndarray:
    """Visibility maps [N, 1, H, W] -> [N] bool: the model sees at least ``hidden_share`` of the
    face as hidden (visibility below ``hidden_below``); ``rule`` may override both (e.g. the
    normalisation stored with a model), the module's constants are the defaults."""
    rule = rule or {}
    below, share = rule.get("hidden_below", HIDDEN_BELOW), rule.get("hidden_share", HIDDEN_SHARE)
    return ((occlusion.flatten(1) < below).float().mean(1) >= share).numpy()


def choose_strata_rule(occlusion: torch.Tensor, occluded: np.ndarray, hidden_below: float = HIDDEN_BELOW) -> dict:
    """The rule of :func:`predicted_occluded` that best tells occluded faces from clean ones on
    labelled faces (validation faces with synthesised occluders): maps [N, 1, H, W] and the faces'
    true flags [N] -> ``{"hidden_below", "hidden_share"}``, the share threshold with the best
    balanced accuracy (the higher threshold on ties). Without both kinds of face: the defaults."""
    occluded = np.asarray(occluded, bool)
    if occluded.all() or not occluded.any():
        return {"hidden_below": hidden_below, "hidden_share": HIDDEN_SHARE}
    share = (occlusion.flatten(1) < hidden_below).float().mean(1).numpy().astype(np.float64)
    values = np.unique(share)
    candidates = np.concatenate([(values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    flagged = share[None, :] >= candidates[:, None]  # [candidates, N]
    balanced = (flagged[:, occluded].mean(1) + (~flagged[:, ~occluded]).mean(1)) / 2
    best = np.flatnonzero(balanced >= balanced.max() - 1e-12)[-1]
    return {"hidden_below": hidden_below, "hidden_share": float(round(candidates[best], 4))}


def strata_rule(model: OccFaceModel) -> dict | None:
    """The strata rule stored with a model's fusion normalisation (None: the defaults)."""
    normalization = model.config.calibration.get("normalization") or {}
    return {k: normalization[k] for k in ("hidden_below", "hidden_share") if k in normalization} or None


def pair_kind(first_occluded: np.ndarray, second_occluded: np.ndarray) -> np.ndarray:
    """Per pair (any shape), from each face's occluded flag: "clean-clean", "occluded-clean" or
    "occluded-occluded"."""
    count = np.asarray(first_occluded, int) + np.asarray(second_occluded, int)
    return np.array(PAIR_KINDS[::-1])[count]


def pair_strata(features: Features, pairs: np.ndarray, rule: dict | None = None) -> np.ndarray:
    """[N] pair type the model predicts for pairs [N, 2] of feature indices, from its maps
    (``rule``: see :func:`predicted_occluded`)."""
    return pair_types(predicted_occluded(features.occlusion, rule), pairs)


def fusion_normalization(scores: dict[str, np.ndarray], strata: np.ndarray | None = None,
                         rule: dict | None = None) -> dict:
    """Mean and std of the two fused sources over a score set, per visibility stratum and over
    all pairs, with the rule that gave the strata (``rule``; None: the defaults):
    ``{"hidden_below": b, "hidden_share": s, source: {stratum or "all": [mean, std]}}``.

    An occluder shifts a global descriptor's scores for all pairs alike (two faces in the same
    niqab look alike whoever wears it), so one normalisation for every pair type would put
    occluded pairs on another scale than clean ones; each stratum gets its own."""
    rule = rule or {}
    result: dict = {"hidden_below": rule.get("hidden_below", HIDDEN_BELOW),
                    "hidden_share": rule.get("hidden_share", HIDDEN_SHARE)}
    for source in ("embedding", "qaconv_weighted"):
        values = np.asarray(scores[source], np.float64)
        result[source] = {"all": [float(values.mean()), float(values.std() + 1e-12)]}
        if strata is not None:
            for stratum in PAIR_KINDS:
                chosen = values[strata == stratum]
                if len(chosen) >= 2:
                    result[source][stratum] = [float(chosen.mean()), float(chosen.std() + 1e-12)]
    return result


def per_stratum(values: dict, shape: tuple, strata: np.ndarray | None) -> np.ndarray:
    """Broadcast ``{stratum or "all": value}`` to an array of ``shape``: each pair gets its
    stratum's value, or the ``"all"`` value where ``strata`` is None or names a missing stratum."""
    out = np.full(shape, values["all"], dtype=np.float64)
    if strata is not None:
        for stratum, value in values.items():
            out[strata == stratum] = value
    return out


def fuse(embedding: np.ndarray, qaconv_weighted: np.ndarray, normalization: dict, weight: FusionWeight = 0.5,
         strata: np.ndarray | None = None) -> np.ndarray:
    """w * z(embedding) + (1 - w) * z(weighted QAConv), z-scored with the statistics of each
    pair's visibility stratum (``strata``, same shape as the scores; statistics over all pairs
    where it is None or the stratum has none). ``weight``: one number, or ``{stratum or "all": w}``
    (:func:`choose_fusion_weights`). Older models store one [mean, std] per source. The result has
    the broadcast shape of the scores and ``strata`` (one pair's scalars with a [1] stratum: [1])."""
    shape = np.broadcast_shapes(np.shape(embedding), np.shape(qaconv_weighted), np.shape(strata) if strata is not None else ())
    w = per_stratum(weight if isinstance(weight, dict) else {"all": weight}, shape, strata)
    fused = np.zeros(shape, np.float64)
    for source, values, share in (("embedding", embedding, w), ("qaconv_weighted", qaconv_weighted, 1 - w)):
        stats = normalization[source]
        stats = stats if isinstance(stats, dict) else {"all": stats}
        mean = per_stratum({k: v[0] for k, v in stats.items()}, shape, strata)
        std = per_stratum({k: v[1] for k, v in stats.items()}, shape, strata)
        fused += share * (np.asarray(values, np.float64) - mean) / std
    return fused


def calibrated_fusion_weight(model: OccFaceModel) -> FusionWeight:
    """The fusion weight stored with a model (per stratum, chosen on its validation pairs), or the
    spec's 0.5 for a model without one."""
    return model.config.calibration.get("fusion_weight", 0.5)


def describe_fusion_weight(weight: FusionWeight) -> str:
    """A fusion weight in words, e.g. ``0.5`` or ``occluded-occluded 0.3, occluded-clean 0.29,
    clean-clean 0.51, otherwise 0.24``."""
    if not isinstance(weight, dict):
        return f"{weight:g}"
    parts = [f"{k} {weight[k]:g}" for k in PAIR_KINDS if k in weight]
    return ", ".join(parts + [f"otherwise {weight['all']:g}"])


def separation(scores: np.ndarray, issame: np.ndarray) -> float:
    """d' of a score source on labelled pairs, from its ROC AUC under the equal-variance binormal
    model (AUC = Phi(d' / sqrt(2))); 0 for a source no better than chance."""
    from statistics import NormalDist

    from sklearn.metrics import roc_auc_score

    auc = min(float(roc_auc_score(issame, scores)), 0.999)
    return max(0.0, 2**0.5 * NormalDist().inv_cdf(auc))


def choose_fusion_weights(scores: dict[str, np.ndarray], issame: np.ndarray, strata: np.ndarray,
                          min_pairs: int = 20) -> dict:
    """The embedding's fusion weight per visibility stratum from labelled (validation) pairs:
    ``d'_emb / (d'_emb + d'_qaconv_weighted)`` (:func:`separation`): for two independent sources
    of equal within-class spread, the weighting whose sum separates the classes best. ``"all"``
    (for strata without enough pairs) comes from all pairs. A stratum needs ``min_pairs`` same and
    ``min_pairs`` different pairs; neither source better than chance gives the spec's 0.5.
    -> ``{"all": w, stratum: w, ...}``, rounded to 0.01.

    An occluder can leave the embedding near chance while weighted QAConv still separates
    identities (LFW with a niqab: 59% against 68%), so the spec's 0.5 for every pair type lets
    the weaker source drag the fusion below its better part. d' is estimated from the AUC, which
    is steadier on a few hundred pairs than picking the weight whose fused AUC is highest."""
    issame = np.asarray(issame, bool)

    def weight(chosen: np.ndarray) -> float | None:
        same = issame[chosen]
        if same.sum() < min_pairs or (~same).sum() < min_pairs:
            return None
        d_emb = separation(scores["embedding"][chosen], same)
        d_qa = separation(scores["qaconv_weighted"][chosen], same)
        return 0.5 if d_emb + d_qa == 0 else round(d_emb / (d_emb + d_qa), 2)

    overall = weight(np.ones(len(issame), bool))
    weights = {"all": 0.5 if overall is None else overall}
    for stratum in PAIR_KINDS:
        chosen = weight(strata == stratum)
        if chosen is not None:
            weights[stratum] = chosen
    return weights


def pair_types(occluded: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Pair type of each pair [N, 2] from the per-image occluded flags [num_images]."""
    return pair_kind(occluded[pairs[:, 0]], occluded[pairs[:, 1]])


def _best_threshold(scores: np.ndarray, issame: np.ndarray) -> float:
    """The accuracy-maximising threshold, taken midway between neighbouring scores."""
    values = np.unique(scores)
    if len(values) > 2001:
        values = np.unique(np.quantile(scores, np.linspace(0, 1, 2001)))
    candidates = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    order = np.argsort(scores)
    sorted_same = issame[order]
    # accuracy(t) = positives at or above t + negatives below t, from cumulative counts.
    below = np.searchsorted(scores[order], candidates, side="left")
    negatives_below = np.concatenate([[0], np.cumsum(~sorted_same)])[below]
    positives_above = sorted_same.sum() - np.concatenate([[0], np.cumsum(sorted_same)])[below]
    return float(candidates[int(np.argmax(negatives_below + positives_above))])


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
    notes = []
    if folds is None:
        splits = min(num_folds, int(issame.sum()), int((~issame).sum()))
        folds = np.zeros(len(scores), int)
        if splits >= 2:
            for k, (_, test) in enumerate(StratifiedKFold(splits, shuffle=True, random_state=seed).split(scores, issame)):
                folds[test] = k
        else:
            notes.append("too few pairs for folds: accuracy at the threshold chosen on the same pairs")
    correct = 0
    for k in np.unique(folds):
        test = folds == k
        threshold = _best_threshold(scores[~test], issame[~test]) if (~test).any() else _best_threshold(scores, issame)
        correct += ((scores[test] >= threshold) == issame[test]).sum()
    far, tar, _ = roc_curve(issame, scores)
    eer_index = int(np.nanargmin(np.abs((1 - tar) - far)))
    result.update(accuracy=float(correct / len(scores)), auc=float(roc_auc_score(issame, scores)),
                  eer=float((far[eer_index] + 1 - tar[eer_index]) / 2), threshold=_best_threshold(scores, issame))
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


# The comparisons the report tests: does occlusion weighting help QAConv, does weighted QAConv beat
# the embedding, and does the fusion beat its better part.
COMPARISONS = (("qaconv_weighted", "qaconv"), ("qaconv_weighted", "embedding"), ("fused", "qaconv_weighted"))


def _bootstrap_auc(scores: np.ndarray, issame: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """ROC AUC of one score set under each resample's pair multiplicities ``counts`` [R, N] -> [R]
    (ties count one half, as in the Mann-Whitney statistic)."""
    order = np.argsort(scores, kind="stable")
    sorted_scores, same = scores[order], issame[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # tie groups
    weights = counts[:, order].astype(np.float64)
    positives = np.add.reduceat(weights * same, starts, axis=1)  # [R, groups]
    negatives = np.add.reduceat(weights * ~same, starts, axis=1)
    negatives_below = np.cumsum(negatives, axis=1) - negatives
    wins = (positives * (negatives_below + 0.5 * negatives)).sum(axis=1)
    total = positives.sum(axis=1) * negatives.sum(axis=1)
    return np.divide(wins, total, out=np.full(len(wins), np.nan), where=total > 0)


def compare_sources(scores: dict[str, np.ndarray], issame: np.ndarray, types: np.ndarray,
                    comparisons: tuple[tuple[str, str], ...] = COMPARISONS, resamples: int = 1000,
                    seed: int = 0, chunk: int = 100) -> dict:
    """Paired bootstrap of ROC AUC differences between score sources, per pair type.

    Pairs are resampled with replacement (the same resample for both sources, so the difference
    is paired) and the 2.5th and 97.5th percentiles of the AUC difference give a 95% interval.
    The interval covers the sampling of pairs only: it says whether these pairs tell the two
    sources apart for this model, not whether another training run would rank them the same.
    Pairs that share images are treated as independent, so the interval is somewhat too narrow.

    Returns ``{"A-vs-B": {pair_type: {"auc_difference", "ci95": [low, high], "pairs", "resamples"}}}``
    for every comparison whose two sources are present.
    """
    issame = np.asarray(issame, bool)
    comparisons = tuple((a, b) for a, b in comparisons if a in scores and b in scores)
    needed = sorted({source for pair in comparisons for source in pair})
    result: dict = {f"{a}-vs-{b}": {} for a, b in comparisons}
    for pair_type in PAIR_TYPES:
        chosen = np.ones(len(issame), bool) if pair_type == "all" else np.asarray(types) == pair_type
        same = issame[chosen]
        if not chosen.any() or same.all() or not same.any():
            continue
        values = {source: np.asarray(scores[source], np.float64)[chosen] for source in needed}
        every = np.ones((1, len(same)))
        observed = {source: float(_bootstrap_auc(v, same, every)[0]) for source, v in values.items()}
        resampled: dict[str, list[np.ndarray]] = {source: [] for source in needed}
        rng = np.random.default_rng(seed)
        for start in range(0, resamples, chunk):  # one set of resamples, shared by every source
            rows = min(chunk, resamples - start)
            drawn = rng.integers(0, len(same), size=(rows, len(same)))
            offsets = (np.arange(rows)[:, None] * len(same) + drawn).ravel()
            counts = np.bincount(offsets, minlength=rows * len(same)).reshape(rows, len(same))
            for source, v in values.items():
                resampled[source].append(_bootstrap_auc(v, same, counts))
        for a, b in comparisons:
            low, high = np.nanpercentile(np.concatenate(resampled[a]) - np.concatenate(resampled[b]), [2.5, 97.5])
            result[f"{a}-vs-{b}"][pair_type] = {"auc_difference": observed[a] - observed[b],
                                                "ci95": [float(low), float(high)],
                                                "pairs": len(same), "resamples": resamples}
    return result


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

    from .data.images import tile_grid, to_image

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


def identification(model: OccFaceModel, gallery: Features, probe: Features, gallery_labels: np.ndarray,
                   probe_labels: np.ndarray, ranks: tuple[int, ...] = (1, 5), fusion_weight: FusionWeight = 0.5,
                   progress: bool = False, precision: str = "auto") -> dict:
    """Closed-set identification: for each probe, is its identity's gallery face among the top-k
    scores? ``{source: {"rank-1": .., "rank-5": .., "probes": n, "gallery": m}}``. QAConv scores come
    from the memory-bounded ``score_all``."""
    qaconv = cpu_matcher(model)
    dtype = matcher_dtype(qaconv, gallery.feature_map, precision)
    matrices = {
        "embedding": (probe.embedding @ gallery.embedding.T).numpy(),
        "qaconv": qaconv.score_all(probe.feature_map, gallery.feature_map, dtype=dtype, progress=progress).numpy(),
        "qaconv_weighted": qaconv.score_all(probe.feature_map, gallery.feature_map, probe.occlusion, gallery.occlusion,
                                            dtype=dtype, progress=progress).numpy(),
    }
    rule = strata_rule(model)
    strata = pair_kind(predicted_occluded(probe.occlusion, rule)[:, None],
                       predicted_occluded(gallery.occlusion, rule)[None, :])
    matrices["fused"] = fuse(matrices["embedding"], matrices["qaconv_weighted"],
                             fusion_normalization(matrices, strata, rule), fusion_weight, strata)
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
             progress: bool = True, faces: FaceReader | None = None, precision: str = "auto") -> dict:
    """The ``occface eval`` command: verification (and optionally identification) with every
    score source, written to ``out_dir`` (metrics.json, report.md, roc.png, histograms.png,
    visibility_grid.png). ``fusion_weight`` None: the model's calibrated weights per visibility
    stratum (:func:`choose_fusion_weights`), or the spec's 0.5 for a model without them. ``faces``:
    how the images of a pairs file are read (photos detected and aligned); default: all aligned."""
    from .data import OcclusionSynthesizer
    from .data.tools import open_dataset
    from .data.verification import ImageListDataset, read_bin, read_pairs_txt

    model = OccFaceModel.from_pretrained(model_dir)
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
              "fusion weight of the embedding": describe_fusion_weight(fusion_weight),
              "precision": describe_precision(precision, device)}
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
