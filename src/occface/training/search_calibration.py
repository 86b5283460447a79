"""The re-rank for 1:N search, fitted on searches of the validation people rather than on pairs.

A model's pair calibration fuses the embedding with QAConv by statistics of random pairs. A search
re-ranks something else: the hundred candidates most like the probe by embedding, whose scores
crowd the top of every source's range. Fitted on pairs, the fusion cost clean probes of LFW 5.4
points of rank-1 against the embedding alone. Here, on the validation people:

1. every image is enrolled clean (the gallery) and searched for clean and with an occluder drawn
   as in training (the probes), each search leaving the probe's own image out;
2. each probe's candidates are shortlist-like: its best mated faces and its best non-mated faces by
   embedding (``mated`` and ``non_mated`` of each);
3. per stratum of the probe (clean or occluded; the gallery is clean), each source is z-scored over
   those candidates and the shares come from Fisher's discriminant of mated against non-mated
   (:func:`occface.scoring.choose_fusion_weights`);
4. a stratum keeps the fusion only where it ranks the validation searches better than the embedding
   alone (rank-1, ties to the embedding), else the embedding alone: the re-rank never goes below
   the embedding on the searches it was fitted on, clean ones included;
5. the open-set threshold, per stratum of the probe (the strata's fused scores have scales of their
   own), is the fused score that a fraction ``fpir`` of its non-mated searches (the same searches
   without the probe's person) reaches at rank 1; ``"all"`` over every search, for other strata.

The result is stored as ``calibration["search"]`` and used by :mod:`occface.galleries.search`.
"""
from __future__ import annotations

import logging

import numpy as np

from ..scoring import choose_fusion_weights, describe_fusion_weight, fuse, pair_kind, predicted_occluded, source_scores

log = logging.getLogger(__name__)
SOURCES = ("embedding", "qaconv", "qaconv_weighted")


def rank_one(scores: np.ndarray, probe_labels: np.ndarray, gallery_labels: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """[P] bool: the best allowed gallery face of each probe is of its identity (scores [P, G],
    ``allowed`` [P, G] bool)."""
    masked = np.where(allowed, scores, -np.inf)
    return gallery_labels[masked.argmax(1)] == probe_labels


def fit_search_calibration(scores: dict[str, np.ndarray], probe_labels: np.ndarray, gallery_labels: np.ndarray,
                           allowed: np.ndarray, strata: np.ndarray, rule: dict, mated: int = 5, non_mated: int = 20,
                           fpir: float = 0.01) -> dict:
    """The search calibration (see the module's docstring) from score matrices {source: [P, G]}, the
    identities of probes [P] and gallery faces [G], which pairs a search may use (``allowed`` [P, G]:
    not the probe's own image) and each pair's stratum [P, G]. Returns ``calibration["search"]``."""
    same = probe_labels[:, None] == gallery_labels[None, :]
    embedding = np.where(allowed, scores["embedding"], -np.inf)
    chosen = np.zeros_like(allowed)
    for p in range(len(probe_labels)):  # the shortlist a search would re-rank: its best faces of each kind
        for kind, count in ((same[p], mated), (~same[p], non_mated)):
            candidates = np.flatnonzero(kind & allowed[p])
            if len(candidates):
                chosen[p, candidates[np.argsort(-embedding[p, candidates])[:count]]] = True
    picked = {s: v[chosen] for s, v in scores.items()}
    picked_strata, picked_same = strata[chosen], same[chosen]
    normalization: dict = dict(rule)
    for source in SOURCES:
        values = picked[source]
        normalization[source] = {"all": [float(values.mean()), float(values.std() + 1e-12)]}
        for stratum in np.unique(picked_strata):
            part = values[picked_strata == stratum]
            if len(part) >= 2:
                normalization[source][str(stratum)] = [float(part.mean()), float(part.std() + 1e-12)]
    weights = choose_fusion_weights(picked, picked_same, picked_strata)
    fused = fuse(scores, normalization, weights, strata)
    probe_strata = strata[:, 0]
    report, final = {}, dict(weights)
    embedding_first = rank_one(scores["embedding"], probe_labels, gallery_labels, allowed)
    fused_first = rank_one(fused, probe_labels, gallery_labels, allowed)
    for stratum in np.unique(probe_strata):
        rows = probe_strata == stratum
        by_embedding, by_fusion = float(embedding_first[rows].mean()), float(fused_first[rows].mean())
        kept = by_fusion > by_embedding
        if not kept:
            final[str(stratum)] = {"embedding": 1.0, "qaconv": 0.0, "qaconv_weighted": 0.0}
        report[str(stratum)] = {"probes": int(rows.sum()), "rank1_embedding": round(by_embedding, 4),
                                "rank1_fused": round(by_fusion, 4), "fusion_kept": bool(kept)}
    final["all"] = {"embedding": 1.0, "qaconv": 0.0, "qaconv_weighted": 0.0}  # strata not validated: the embedding
    fused = fuse(scores, normalization, final, strata)
    non_mated_best = np.where(allowed & ~same, fused, -np.inf).max(1)
    finite = np.isfinite(non_mated_best)
    threshold = {"all": float(np.quantile(non_mated_best[finite], 1.0 - fpir))}
    for stratum in np.unique(probe_strata):  # each stratum's fused scores have their own scale
        rows = finite & (probe_strata == stratum)
        if rows.any():
            threshold[str(stratum)] = float(np.quantile(non_mated_best[rows], 1.0 - fpir))
    log.info("search calibration: %s; thresholds %s at FPIR %g", describe_fusion_weight(final),
             ", ".join(f"{k} {v:.3f}" for k, v in threshold.items()), fpir)
    return {"normalization": normalization, "fusion_weight": final, "threshold": threshold, "fpir": fpir,
            "validation": report, "candidates": {"mated": mated, "non_mated": non_mated}}


def calibrate_search(model, holdout, synthesizer, seed: int = 0, precision: str = "fp32", device="cpu",
                     fpir: float = 0.01) -> dict | None:
    """Fit the search calibration on a model's validation people (``holdout``: an identity dataset
    of people never trained on; ``synthesizer``: training's occluders). None without two people."""
    from ..evaluation.run import VariantDataset
    from ..scoring import extract_features

    labels = np.asarray(holdout.targets)
    if len(np.unique(labels[labels >= 0])) < 2:
        return None
    count = len(labels)
    gallery_set = VariantDataset(holdout, [(i, False) for i in range(count)])
    probe_set = VariantDataset(holdout, [(i, False) for i in range(count)] + [(i, True) for i in range(count)],
                               synthesizer, seed)
    gallery = extract_features(model, gallery_set, device=device, precision=precision)
    probe = extract_features(model, probe_set, device=device, precision=precision)
    scores = source_scores(model, probe, gallery.embedding, gallery.feature_map, gallery.occlusion, precision)
    normalization = model.config.calibration.get("normalization") or {}
    rule = {k: normalization[k] for k in ("hidden_below", "hidden_share") if k in normalization}
    probe_labels = np.concatenate([labels, labels])
    own = np.concatenate([np.arange(count), np.arange(count)])
    allowed = own[:, None] != np.arange(count)[None, :]
    probe_hidden = predicted_occluded(probe.occlusion, rule or None)  # the probe's stratum; the gallery is clean
    strata = np.broadcast_to(pair_kind(probe_hidden, np.zeros_like(probe_hidden))[:, None], (len(probe_hidden), count))
    return fit_search_calibration(scores, probe_labels, labels, allowed, strata,
                                  rule or {"hidden_below": 0.2, "hidden_share": 0.25}, fpir=fpir)
