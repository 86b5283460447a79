"""Verification metrics and comparisons between score sources.

Metrics per (source, pair type): 10-fold accuracy (the threshold chosen on nine folds), ROC AUC,
EER, and TAR at FAR 1e-1 / 1e-2 / 1e-3 / 1e-4 where there are enough negative pairs to measure
it (at least 1/FAR; otherwise the entry is None and ``notes`` says why). Between sources, per pair
type: the ROC AUC difference with a 95% paired-bootstrap interval (:func:`compare_sources`).
Pair types: ``occluded-occluded``, ``occluded-clean``, ``clean-clean`` and ``all``.
"""
from __future__ import annotations

import numpy as np

from ..scoring import PAIR_KINDS

PAIR_TYPES = (*PAIR_KINDS, "all")


FARS = (1e-1, 1e-2, 1e-3, 1e-4)


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


def threshold_at_far(scores: np.ndarray, issame: np.ndarray, far: float) -> float:
    """The lowest threshold whose false-accept rate on these pairs is at most ``far``."""
    negatives = np.sort(np.asarray(scores)[~np.asarray(issame, bool)])[::-1]
    if len(negatives) == 0:
        raise ValueError("calibration needs different-identity pairs")
    allowed = int(np.floor(far * len(negatives)))
    return float(np.nextafter(negatives[allowed], np.inf)) if allowed < len(negatives) else float(negatives[-1])
