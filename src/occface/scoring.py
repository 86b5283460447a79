"""One scoring path, shared by evaluation, matching and training's validation: features -> QAConv
scores -> fusion.

Score sources: ``embedding`` (cosine of flip-and-norm fused embeddings, as AdaFace evaluates),
``qaconv`` (QAConv without visibility maps), ``qaconv_weighted`` (with the predicted maps) and
``fused``: a weighted sum of the first three, each z-scored with the mean and std of its scores over
the pairs of the same visibility stratum (clean-clean, occluded-clean or occluded-occluded, as the
model's predicted maps say). The shares are one number (the embedding's, the rest going to weighted
QAConv: the spec's 0.5 is the default) or, per stratum, a share for each source, as
:func:`choose_fusion_weights` picks them on validation pairs when a model is trained; a model stores
its shares with its calibration.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data.datasets import FaceSample
from .models.occface import OccFaceModel
from .precision import compute_dtype

SOURCES = ("embedding", "qaconv", "qaconv_weighted", "fused")


PAIR_KINDS = ("occluded-occluded", "occluded-clean", "clean-clean")


# The sources a fused score may combine.
FUSED_SOURCES = ("embedding", "qaconv", "qaconv_weighted")

# Shares of the fused score: the embedding's share as one number (the rest to weighted QAConv), or
# {source: share}, or {stratum or "all": either of those}.
FusionWeight = Union[float, dict]


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
                     keep_masks: bool = False, progress: bool = False, precision: str = "auto",
                     keep_maps: bool = True) -> Features:
    """Run the model over a dataset of :class:`FaceSample`. Embeddings are fused with those of the
    mirrored images weighted by their norms (AdaFace's flip-and-norm fusion). ``precision``
    (:mod:`occface.precision`): the network may run in bf16; everything kept is fp32.
    ``keep_maps=False``: feature maps are not kept (``feature_map`` is [0, C, H, W]), for scoring
    embeddings alone (7,701 faces of 7x7x512 maps are 0.8 GB)."""
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
        images = network_input(batch.image, device)
        if chosen is None:
            chosen = network_precision(model, images, precision, network_key(model), device)
            check_cpu_bf16(compute_dtype(chosen, device), device, "extract_features")
        with autocast(chosen, device):
            out = model(images)
            parts["embedding"].append(model.fused_embedding(images, out).cpu())
        maps = out.feature_map
        parts["feature_map"].append(maps.float().cpu() if keep_maps else torch.empty(0, *maps.shape[1:]))
        parts["occlusion"].append(out.occlusion.float().cpu())
        parts["occluded"].append(batch.occluded)
        if keep_masks:
            parts["mask"].append(batch.mask)
    return Features(*(torch.cat(parts[k]) for k in ("embedding", "feature_map", "occlusion", "occluded")),
                    torch.cat(parts["mask"]) if keep_masks else None)


def network_input(images: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """Faces [B, 3, S, S] on ``device`` for inference; on the CPU in channels-last memory, which
    oneDNN's convolutions run faster (batch 64, 2 cores: MobileFaceNet 1.4x, IR-18 1.2x), with the
    weights left as they are."""
    images = images.to(device)
    return images.contiguous(memory_format=torch.channels_last) if images.device.type == "cpu" else images


def network_key(model: OccFaceModel) -> tuple:
    """What :func:`occface.precision.network_precision` measures once per process."""
    config = model.config
    return ("network", config.arch, config.width, config.feature_level)


def matcher_dtype(qaconv, feature_map: torch.Tensor, precision: str) -> torch.dtype:
    """The dtype of QAConv's correlations for ``precision`` on the CPU: "auto" times a block of 64
    pair scores of maps like ``feature_map`` [N, C, H, W] (repeated when N is smaller: a pair or two
    is too little work to time) in fp32 and in bf16."""
    block = feature_map[torch.arange(64) % len(feature_map)]
    key = ("qaconv", *block.shape[1:])
    return compute_dtype(precision, "cpu", key=key,
                         fp32_run=lambda: qaconv.score_pairs(block, block.flip(0), dtype=torch.float32),
                         bf16_run=lambda: qaconv.score_pairs(block, block.flip(0), dtype=torch.bfloat16))


PAIR_CHUNK = 2048  # pairs scored together by pair_scores


def embedding_scores(features: Features, pairs: np.ndarray) -> np.ndarray:
    """Cosine of the (unit) embeddings of pairs [N, 2] of feature indices -> [N]."""
    left, right = torch.as_tensor(pairs[:, 0]), torch.as_tensor(pairs[:, 1])
    return (features.embedding[left] * features.embedding[right]).sum(1).numpy()


def pair_scores(model: OccFaceModel, features: Features, pairs: np.ndarray, fusion_weight: FusionWeight = 0.5,
                normalization: dict | None = None, precision: str = "auto") -> dict[str, np.ndarray]:
    """Scores of every source for pairs [N, 2] of feature indices. ``fused`` z-scores the
    sources it combines per visibility stratum (:func:`pair_strata`, with the
    model's stored rule) with ``normalization`` (from :func:`fusion_normalization`) if given,
    otherwise with their mean and std over these pairs. ``precision``: of QAConv's correlations
    (:mod:`occface.precision`); scores are fp32."""
    left, right = torch.as_tensor(pairs[:, 0]), torch.as_tensor(pairs[:, 1])
    qaconv = cpu_matcher(model)
    if len(features.feature_map) != len(features.embedding):
        raise ValueError(f"pair_scores needs the feature maps of all {len(features.embedding)} faces, got "
                         f"{len(features.feature_map)} (extracted with keep_maps=False?); embedding_scores "
                         "scores embeddings alone")
    dtype = matcher_dtype(qaconv, features.feature_map, precision)
    maps, occlusion = features.feature_map, features.occlusion
    plain, weighted = [], []
    # Pairs in chunks, so only one chunk's gathered feature maps exist at a time (12,000 pairs of
    # 7x7x512 maps gathered at once would be 2.4 GB).
    for i, j in zip(left.split(PAIR_CHUNK), right.split(PAIR_CHUNK)):
        plain.append(qaconv.score_pairs(maps[i], maps[j], dtype=dtype))
        weighted.append(qaconv.score_pairs(maps[i], maps[j], occlusion[i], occlusion[j], dtype=dtype))
    scores = {
        "embedding": embedding_scores(features, pairs),
        "qaconv": torch.cat(plain).numpy() if plain else np.zeros(0, np.float32),
        "qaconv_weighted": torch.cat(weighted).numpy() if weighted else np.zeros(0, np.float32),
    }
    rule = normalization or strata_rule(model)
    strata = pair_strata(features, pairs, rule)
    stats = normalization or fusion_normalization(scores, strata, rule)
    scores["fused"] = fuse(scores, stats, fusion_weight, strata)
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


def pair_types(occluded: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Pair type of each pair [N, 2] from the per-image occluded flags [num_images]."""
    return pair_kind(occluded[pairs[:, 0]], occluded[pairs[:, 1]])


def pair_strata(features: Features, pairs: np.ndarray, rule: dict | None = None) -> np.ndarray:
    """[N] pair type the model predicts for pairs [N, 2] of feature indices, from its maps
    (``rule``: see :func:`predicted_occluded`)."""
    return pair_types(predicted_occluded(features.occlusion, rule), pairs)


def fusion_normalization(scores: dict[str, np.ndarray], strata: np.ndarray | None = None,
                         rule: dict | None = None) -> dict:
    """Mean and std of each source a fusion may combine (those of ``FUSED_SOURCES`` in ``scores``)
    over a score set, per visibility stratum and over
    all pairs, with the rule that gave the strata (``rule``; None: the defaults):
    ``{"hidden_below": b, "hidden_share": s, source: {stratum or "all": [mean, std]}}``.

    An occluder shifts a global descriptor's scores for all pairs alike (two faces in the same
    niqab look alike whoever wears it), so one normalisation for every pair type would put
    occluded pairs on another scale than clean ones; each stratum gets its own."""
    rule = rule or {}
    result: dict = {"hidden_below": rule.get("hidden_below", HIDDEN_BELOW),
                    "hidden_share": rule.get("hidden_share", HIDDEN_SHARE)}
    for source in (s for s in FUSED_SOURCES if s in scores):
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


def fusion_shares(weight: FusionWeight) -> dict[str, dict[str, float]]:
    """Any form of :data:`FusionWeight` -> ``{stratum or "all": {source: share}}`` over
    ``FUSED_SOURCES``. A number ``w`` is the embedding's share, ``1 - w`` weighted QAConv's (the
    spec's fusion; models stored before plain QAConv could take a share). An unknown source or
    stratum is an error, not a share of 0."""

    def one(value, where: str) -> dict[str, float]:
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(FUSED_SOURCES))
            if unknown:
                raise ValueError(f"fusion weights{where}: unknown source(s) {unknown}; expected some of {list(FUSED_SOURCES)}")
            return {source: float(value.get(source, 0.0)) for source in FUSED_SOURCES}
        return {"embedding": float(value), "qaconv": 0.0, "qaconv_weighted": 1.0 - float(value)}

    if not isinstance(weight, dict) or set(weight) <= set(FUSED_SOURCES):
        return {"all": one(weight, "")}
    unknown = sorted(set(weight) - {"all", *PAIR_KINDS})
    if unknown or "all" not in weight:
        raise ValueError(f"fusion weights per stratum need an 'all' entry and only {list(PAIR_KINDS)} besides; "
                         f"got {sorted(weight)}")
    return {stratum: one(value, f" for {stratum}") for stratum, value in weight.items()}


def fuse(scores: dict[str, np.ndarray], normalization: dict, weight: FusionWeight = 0.5,
         strata: np.ndarray | None = None) -> np.ndarray:
    """Sum over sources of share * z(score), z-scored with the statistics of each pair's visibility
    stratum (``strata``, same shape as the scores; statistics over all pairs where it is None or
    the stratum has none). ``scores``: {source: scores} with at least the sources that have a
    share in some stratum; ``weight``: see :func:`fusion_shares`. Older models store one
    [mean, std] per source. The result has the broadcast shape of the scores and ``strata`` (one
    pair's scalars with a [1] stratum: [1])."""
    shares = fusion_shares(weight)
    needed = [source for source in FUSED_SOURCES if any(share[source] != 0 for share in shares.values())]
    missing = [source for source in needed if source not in scores or source not in normalization]
    if missing:
        raise ValueError(f"the fusion gives {missing} a share, but no scores or normalisation were given for it")
    shape = np.broadcast_shapes(*(np.shape(scores[s]) for s in needed), np.shape(strata) if strata is not None else ())
    fused = np.zeros(shape, np.float64)
    for source in needed:
        share = per_stratum({k: v[source] for k, v in shares.items()}, shape, strata)
        stats = normalization[source]
        stats = stats if isinstance(stats, dict) else {"all": stats}
        mean = per_stratum({k: v[0] for k, v in stats.items()}, shape, strata)
        std = per_stratum({k: v[1] for k, v in stats.items()}, shape, strata)
        fused += share * (np.asarray(scores[source], np.float64) - mean) / std
    return fused


def calibrated_fusion_weight(model: OccFaceModel) -> FusionWeight:
    """The fusion shares stored with a model (per stratum, chosen on its validation pairs), or the
    spec's 0.5 for a model without one."""
    return model.config.calibration.get("fusion_weight", 0.5)


def calibrated_fused(model: OccFaceModel, scores: dict[str, np.ndarray], first_occlusion: torch.Tensor,
                     second_occlusion: torch.Tensor) -> np.ndarray | None:
    """The fused score with the normalisation, strata rule and shares stored with the model (from
    its validation pairs), for ``scores`` {source: scores} of faces with visibility maps
    [N1, 1, H, W] and [N2, 1, H, W] (the scores' shape broadcasts with [N1] against [N2]); None for
    a model stored without them."""
    normalization = model.config.calibration.get("normalization", {})
    if not normalization:
        return None
    strata = pair_kind(predicted_occluded(first_occlusion, normalization),
                       predicted_occluded(second_occlusion, normalization))
    return fuse(scores, normalization, calibrated_fusion_weight(model), strata)


SOURCE_NAMES = {"embedding": "embedding", "qaconv": "QAConv", "qaconv_weighted": "weighted QAConv"}


def describe_fusion_weight(weight: FusionWeight) -> str:
    """Fusion shares in words, e.g. ``embedding 0.5 + weighted QAConv 0.5`` or, per stratum,
    ``occluded-occluded: embedding 0.5 + QAConv 0.5; ...; otherwise: embedding 1``."""
    shares = fusion_shares(weight)

    def words(share: dict[str, float]) -> str:
        return " + ".join(f"{SOURCE_NAMES[k]} {v:g}" for k, v in share.items() if v != 0) or "nothing"

    if list(shares) == ["all"]:
        return words(shares["all"])
    parts = [f"{k}: {words(shares[k])}" for k in PAIR_KINDS if k in shares]
    return "; ".join(parts + [f"otherwise: {words(shares['all'])}"])


def discriminant_shares(values: np.ndarray, issame: np.ndarray) -> np.ndarray:
    """Shares of K score sources [N, K] from Fisher's linear discriminant on labelled pairs [N]:
    ``w ∝ S⁻¹ (μ_same − μ_different)`` on the z-scored sources (z over all N pairs, as :func:`fuse`
    scores them), ``S`` the mean of the two classes' covariances. A source whose part comes out
    negative (it only repeats the others' errors) is dropped and the rest solved again, the most
    negative first; no source separating the classes gives equal shares. -> [K], summing to 1."""
    values = np.asarray(values, np.float64)
    values = (values - values.mean(0)) / (values.std(0) + 1e-12)
    same = np.asarray(issame, bool)
    kept = list(range(values.shape[1]))
    while True:
        chosen = values[:, kept]
        gap = chosen[same].mean(0) - chosen[~same].mean(0)
        spread = 0.5 * (np.atleast_2d(np.cov(chosen[same].T)) + np.atleast_2d(np.cov(chosen[~same].T)))
        spread = spread + 1e-6 * np.eye(len(kept))
        direction = np.linalg.solve(spread, gap)
        if (direction >= 0).all() or len(kept) == 1:
            break
        kept.pop(int(np.argmin(direction)))
    shares = np.zeros(values.shape[1])
    shares[kept] = np.clip(direction, 0.0, None)
    return shares / shares.sum() if shares.sum() > 0 else np.full(values.shape[1], 1.0 / values.shape[1])


def rounded_shares(shares: np.ndarray, sources: tuple[str, ...]) -> dict[str, float]:
    """Shares [K] -> {source: share} rounded to 0.01, still summing to 1 (the largest takes the
    rounding), so that every stratum's fused scores stay on one scale."""
    rounded = np.round(shares, 2)
    rounded[int(np.argmax(rounded))] += 1.0 - rounded.sum()
    return {source: round(float(v), 2) for source, v in zip(sources, rounded)}


def choose_fusion_weights(scores: dict[str, np.ndarray], issame: np.ndarray, strata: np.ndarray,
                          min_pairs: int = 20, sources: tuple[str, ...] | None = None) -> dict:
    """Each source's share in the fused score per visibility stratum from labelled (validation)
    pairs (:func:`discriminant_shares` of ``sources``; default: those of ``FUSED_SOURCES`` in
    ``scores``); ``"all"`` (for strata without enough pairs)
    comes from all pairs. A stratum needs ``min_pairs`` same and ``min_pairs`` different pairs.
    -> ``{"all": {source: share}, stratum: {source: share}, ...}``, rounded to 0.01.

    An occluder can leave the embedding near chance while QAConv still separates identities, so
    the spec's 0.5 for every pair type lets the weaker source drag the fusion below its better
    part. The sources come from one network and their errors are correlated (within same-identity
    validation pairs of a fine-tuned MobileFaceNet, r = 0.5-0.6): a weighting by each source's own
    separation (d' ratio, which assumes independent sources) gives a weaker QAConv a third of the
    fusion and put the fused score below the embedding alone on LFW; the discriminant counts only
    what a source adds beyond the others. Plain and weighted QAConv are both candidates: which of
    them adds more depends on the model (on MobileFaceNet's 7x7 block-4 maps the weighting costs
    QAConv, on its 14x14 block-3 maps it helps)."""
    issame = np.asarray(issame, bool)
    sources = sources or tuple(source for source in FUSED_SOURCES if source in scores)
    missing = [source for source in sources if source not in scores]
    if missing:
        raise ValueError(f"choose_fusion_weights: no scores for {missing}")

    def shares(chosen: np.ndarray) -> dict[str, float] | None:
        same = issame[chosen]
        if same.sum() < min_pairs or (~same).sum() < min_pairs:
            return None
        values = np.stack([np.asarray(scores[source])[chosen] for source in sources], 1)
        return rounded_shares(discriminant_shares(values, same), sources)

    overall = shares(np.ones(len(issame), bool))
    weights = {"all": overall if overall is not None else 0.5}
    for stratum in PAIR_KINDS:
        chosen = shares(strata == stratum)
        if chosen is not None:
            weights[stratum] = chosen
    return weights


def source_scores(model: OccFaceModel, probe: Features, gallery_embedding: torch.Tensor, gallery_maps: torch.Tensor,
                  gallery_occlusion: torch.Tensor, precision: str = "auto",
                  progress: bool = False) -> dict[str, np.ndarray]:
    """The three sources' scores of each probe against each gallery face -> {source: [P, G] float64}:
    embedding cosine, plain and occlusion-weighted QAConv (the memory-bounded ``score_all``).
    Gallery: embeddings [G, D], maps [G, C, H, W], visibility [G, 1, H, W]."""
    qaconv = cpu_matcher(model)
    dtype = matcher_dtype(qaconv, gallery_maps, precision)
    scores = {
        "embedding": probe.embedding @ gallery_embedding.T,
        "qaconv": qaconv.score_all(probe.feature_map, gallery_maps, dtype=dtype, progress=progress),
        "qaconv_weighted": qaconv.score_all(probe.feature_map, gallery_maps, probe.occlusion, gallery_occlusion,
                                            dtype=dtype, progress=progress),
    }
    return {source: values.numpy().astype(np.float64) for source, values in scores.items()}


def score_matrix(model: OccFaceModel, probe: Features, gallery: Features, fusion_weight: FusionWeight = 0.5,
                 precision: str = "auto", progress: bool = False) -> dict[str, np.ndarray]:
    """Every source's scores of each probe against each gallery face -> {source: [P, G]}. QAConv
    scores come from the memory-bounded ``score_all``; ``fused`` normalises per visibility stratum
    over these scores (the model's stored rule decides the strata)."""
    matrices = source_scores(model, probe, gallery.embedding, gallery.feature_map, gallery.occlusion, precision,
                             progress)
    rule = strata_rule(model)
    strata = pair_kind(predicted_occluded(probe.occlusion, rule)[:, None],
                       predicted_occluded(gallery.occlusion, rule)[None, :])
    matrices["fused"] = fuse(matrices, fusion_normalization(matrices, strata, rule), fusion_weight, strata)
    return matrices
