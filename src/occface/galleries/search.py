"""1:N search of a gallery: a FAISS shortlist on the embedding, re-ranked by the model's fusion of
the embedding with plain and occlusion-weighted QAConv (:mod:`occface.scoring`).

Index: exact inner product (``IndexFlatIP``) up to a million faces; above, an inverted file
(``IVF<sqrt(4n)>,Flat``, 32 lists probed) trained on the gallery's embeddings. Identities are
ranked by their best face. The fusion and the open-set threshold are the model's search
calibration where it has one (fitted on shortlist-like candidates of validation searches:
:mod:`occface.search_calibration`), else its pair calibration; a model with neither is ranked by
the embedding. All of a probe's candidates are fused alike, with the statistics and shares of the
probe's own stratum (clean or occluded) against a clean enrolment, as the search calibration is
fitted: fused with each pair's own stratum, a candidate the model sees as occluded would be scored
on another scale than its neighbours (on LFW that cost clean probes 0.1 point of rank-1 against the
embedding alone). The answer is ``unknown`` when the best score is below the threshold (the search
calibration's for the probe's stratum).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..scoring import Features, cpu_matcher, fuse, matcher_dtype, pair_kind, predicted_occluded


@dataclass
class Candidate:
    """One gallery identity for a query: its best-scoring entry and every source's score of it."""

    identity: str
    source: str
    scores: dict[str, float]
    face_id: str = ""


@dataclass
class SearchResult:
    query: str
    candidates: list[Candidate]     # best first, one per identity
    decision: str                   # the best identity, or "unknown" below the model's threshold
    ranked_by: str                  # "fused" for a calibrated model, else "embedding"
    threshold: float | None         # the open-set threshold applied (the probe's stratum's)
    calibration: str = "none"       # "search" (fitted for 1:N), "pairs" (fitted on pairs) or "none"


class SearchIndex:
    """FAISS over every enrolled embedding; shards appended later are added without a rebuild."""

    def __init__(self, index, exact: bool) -> None:
        self.index, self.exact = index, exact

    @classmethod
    def build(cls, arrays: list[dict], exact_up_to: int, probes: int) -> "SearchIndex":
        import faiss

        embeddings = np.ascontiguousarray(np.concatenate([a["embeddings"].read() for a in arrays]), dtype=np.float32)
        dimension = embeddings.shape[1]
        if len(embeddings) <= exact_up_to:
            index = faiss.IndexFlatIP(dimension)
        else:
            lists = int(4 * math.sqrt(len(embeddings)))
            index = faiss.index_factory(dimension, f"IVF{lists},Flat", faiss.METRIC_INNER_PRODUCT)
            sample = embeddings[np.random.default_rng(0).choice(len(embeddings), min(len(embeddings), 64 * lists),
                                                                replace=False)]
            index.train(sample)
            index.nprobe = probes
        index.add(embeddings)
        return cls(index, len(embeddings) <= exact_up_to)

    def add_shards(self, arrays: list[dict]) -> None:
        for shard in arrays:
            self.index.add(np.ascontiguousarray(shard["embeddings"].read(), dtype=np.float32))

    def search(self, embeddings: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(embeddings, dtype=np.float32), count)

    @property
    def size(self) -> int:
        return self.index.ntotal


def fusion_for_search(calibration: dict) -> tuple[dict, object, float | dict | None, str]:
    """(normalization, fusion shares, threshold, which calibration) a search fuses with: the
    model's ``search`` calibration where it has one, else its pair calibration."""
    search = calibration.get("search")
    if isinstance(search, dict) and search.get("normalization"):
        return search["normalization"], search["fusion_weight"], search.get("threshold"), "search"
    normalization = calibration.get("normalization") or {}
    if not normalization:
        return {}, None, None, "none"
    stored = calibration.get("fused")
    threshold = stored.get("threshold") if isinstance(stored, dict) else None
    return normalization, calibration.get("fusion_weight", 0.5), threshold, "pairs"


def stratum_threshold(threshold: float | dict | None, stratum: str) -> float | None:
    """The open-set threshold for a probe of ``stratum``: a search calibration stores one per
    stratum (``"all"`` for the others), a pair calibration one number."""
    if isinstance(threshold, dict):
        return threshold.get(stratum, threshold.get("all"))
    return threshold


def search_features(gallery, probe: Features, names: list[str], top: int = 10, shortlist: int = 100,
                    precision: str = "fp32", only: set[str] | None = None) -> list[SearchResult]:
    """Rank ``gallery``'s identities for probes already through its model (``Features`` of N faces);
    ``only``: rank just these identities (every face of theirs, no shortlist)."""
    model = gallery.model
    entries = gallery.entries()
    if only is not None:
        rows = np.array([i for i, e in enumerate(entries) if e.identity in only], dtype=np.int64)
        embeddings = gallery.embeddings(rows)
        similarities = probe.embedding.numpy() @ embeddings.T if len(rows) else np.zeros((len(names), 0))
        neighbours = np.broadcast_to(rows, similarities.shape)
    else:
        similarities, neighbours = gallery.index().search(probe.embedding.numpy(), min(shortlist, len(gallery)))
    qaconv = cpu_matcher(model)
    dtype = matcher_dtype(qaconv, probe.feature_map, precision)
    normalization, weight, threshold, which = fusion_for_search(model.config.calibration)
    results = []
    for q, name in enumerate(names):
        stratum = "all"
        found = neighbours[q] >= 0
        rows, embedding = neighbours[q][found], similarities[q][found].astype(np.float64)
        candidates: list[Candidate] = []
        ranked_by = "fused" if normalization else "embedding"
        if len(rows):
            maps, visibility, chosen = gallery.rows(rows)
            maps_t, visibility_t = torch.from_numpy(maps), torch.from_numpy(visibility)
            plain = qaconv.score_all(probe.feature_map[q:q + 1], maps_t, dtype=dtype)[0].numpy()
            weighted = qaconv.score_all(probe.feature_map[q:q + 1], maps_t, probe.occlusion[q:q + 1], visibility_t,
                                        dtype=dtype)[0].numpy()
            scores = {"embedding": embedding, "qaconv": plain, "qaconv_weighted": weighted}
            if normalization:  # one stratum for all of a probe's candidates: its own against a clean enrolment
                probe_hidden = predicted_occluded(probe.occlusion[q:q + 1], normalization)
                stratum = str(pair_kind(probe_hidden, np.zeros(1, bool))[0])
                scores["fused"] = fuse(scores, normalization, weight, np.full(embedding.shape, stratum))
            key = scores[ranked_by]
            best: dict[str, Candidate] = {}
            for i in np.argsort(-key, kind="stable"):
                entry = chosen[i]
                if entry.identity not in best:
                    best[entry.identity] = Candidate(entry.identity, entry.source,
                                                     {k: float(v[i]) for k, v in scores.items()}, entry.face_id)
            candidates = list(best.values())[:top]
        decision = candidates[0].identity if candidates else "unknown"
        applied = stratum_threshold(threshold, stratum) if ranked_by == "fused" else None
        if candidates and applied is not None and candidates[0].scores["fused"] < applied:
            decision = "unknown"
        results.append(SearchResult(name, candidates, decision, ranked_by, applied,
                                    which if ranked_by == "fused" else "none"))
    return results
