"""The 1:N re-rank fitted on validation searches; a model so calibrated still scores pairs as before."""
import numpy as np
import pytest

from occface.galleries import Gallery, enrollment_items
from occface.galleries.search import fusion_for_search
from occface.match import match
from occface.models import OccFaceModel
from occface.scoring import pair_kind
from occface.training.search_calibration import fit_search_calibration, rank_one

from test_gallery import people, tiny_model  # noqa: F401 - the fixture


def synthetic_searches(seed: int = 0, people_count: int = 20, faces: int = 6):
    """Score matrices of searches where, for occluded probes, the embedding is weak and QAConv
    strong, and for clean probes the embedding is strong and QAConv mostly noise."""
    rng = np.random.default_rng(seed)
    gallery_labels = np.repeat(np.arange(people_count), faces)
    count = len(gallery_labels)
    probe_labels = np.concatenate([gallery_labels, gallery_labels])
    occluded = np.repeat([False, True], count)
    same = probe_labels[:, None] == gallery_labels[None, :]
    noise = lambda scale: rng.normal(0, scale, same.shape)  # noqa: E731
    embedding = np.where(occluded[:, None], 0.25 * same + noise(0.2), 1.0 * same + noise(0.2))
    qaconv = np.where(occluded[:, None], 1.0 * same + noise(0.25), 0.15 * same + noise(0.6))
    scores = {"embedding": embedding, "qaconv": qaconv, "qaconv_weighted": qaconv + noise(0.5)}
    own = np.concatenate([np.arange(count), np.arange(count)])
    allowed = own[:, None] != np.arange(count)[None, :]
    strata = pair_kind(occluded[:, None], np.zeros(count, bool)[None, :])
    return scores, probe_labels, gallery_labels, allowed, strata


def test_the_fusion_is_kept_only_where_it_ranks_better_than_the_embedding():
    scores, probes, gallery, allowed, strata = synthetic_searches()
    calibration = fit_search_calibration(scores, probes, gallery, allowed, strata, {"hidden_below": 0.2,
                                                                                     "hidden_share": 0.25})
    report, shares = calibration["validation"], calibration["fusion_weight"]
    assert report["occluded-clean"]["fusion_kept"] and shares["occluded-clean"]["qaconv"] > 0.3
    assert report["occluded-clean"]["rank1_fused"] > report["occluded-clean"]["rank1_embedding"]
    assert not report["clean-clean"]["fusion_kept"] or report["clean-clean"]["rank1_fused"] > \
        report["clean-clean"]["rank1_embedding"]
    if not report["clean-clean"]["fusion_kept"]:
        assert shares["clean-clean"] == {"embedding": 1.0, "qaconv": 0.0, "qaconv_weighted": 0.0}
    assert shares["all"] == {"embedding": 1.0, "qaconv": 0.0, "qaconv_weighted": 0.0}
    # Never below the embedding alone on the searches it was fitted on, per stratum.
    from occface.scoring import fuse

    fused = fuse(scores, calibration["normalization"], shares, strata)
    for stratum in ("clean-clean", "occluded-clean"):
        rows = strata[:, 0] == stratum
        assert rank_one(fused, probes, gallery, allowed)[rows].mean() >= \
            rank_one(scores["embedding"], probes, gallery, allowed)[rows].mean()


def test_the_open_set_threshold_is_met_by_the_chosen_share_of_non_mated_searches():
    scores, probes, gallery, allowed, strata = synthetic_searches(seed=1)
    calibration = fit_search_calibration(scores, probes, gallery, allowed, strata, {}, fpir=0.05)
    from occface.scoring import fuse

    fused = fuse(scores, calibration["normalization"], calibration["fusion_weight"], strata)
    same = probes[:, None] == gallery[None, :]
    best_non_mated = np.where(allowed & ~same, fused, -np.inf).max(1)
    thresholds = calibration["threshold"]  # per stratum of the probe: their fused scores differ in scale
    assert set(thresholds) == {"all", "clean-clean", "occluded-clean"}
    assert abs((best_non_mated > thresholds["all"]).mean() - 0.05) < 0.01
    for stratum in ("clean-clean", "occluded-clean"):
        rows = strata[:, 0] == stratum
        assert abs((best_non_mated[rows] > thresholds[stratum]).mean() - 0.05) < 0.01


def test_clean_probes_keep_the_embedding_where_qaconv_adds_nothing():
    scores, probes, gallery, allowed, strata = synthetic_searches(seed=2)
    scores["qaconv"] = np.random.default_rng(5).normal(size=scores["qaconv"].shape)  # pure noise
    scores["qaconv_weighted"] = np.random.default_rng(6).normal(size=scores["qaconv"].shape)
    calibration = fit_search_calibration(scores, probes, gallery, allowed, strata, {})
    for stratum in ("clean-clean", "occluded-clean"):
        assert calibration["fusion_weight"][stratum]["embedding"] >= 0.9, calibration["fusion_weight"]


def test_a_model_calibrated_for_search_scores_pairs_as_before(tmp_path, people):  # noqa: F811
    from occface.data.images import read_image

    model, model_dir = tiny_model(tmp_path)
    pairs_only = {
        "normalization": {"hidden_below": 0.2, "hidden_share": 0.25, "embedding": [0.0, 1.0], "qaconv": [0.5, 2.0],
                          "qaconv_weighted": [0.0, 1.0]},
        "fusion_weight": {"all": {"embedding": 0.5, "qaconv": 0.5}},
        "fused": {"far": 0.01, "threshold": 0.3}, "embedding": {"far": 0.01, "threshold": 0.5},
    }
    model.config.calibration = dict(pairs_only)
    first, second = read_image(people / "ann" / "0.png"), read_image(people / "bob" / "0.png")
    before = match(model, first, second, precision="fp32")
    model.config.calibration["search"] = {
        "normalization": {"hidden_below": 0.2, "hidden_share": 0.25, "embedding": [0.1, 0.5], "qaconv": [0.0, 1.0],
                          "qaconv_weighted": [0.0, 1.0]},
        "fusion_weight": {"all": {"embedding": 1.0}}, "threshold": 0.9, "fpir": 0.01}
    model.config.calibration["precision"] = "fp32"
    saved = model.save_pretrained(tmp_path / "searching")
    loaded = OccFaceModel.from_pretrained(saved)
    after = match(loaded, first, second, precision="fp32")
    assert after["scores"] == pytest.approx(before["scores"]) and after["decisions"] == before["decisions"]
    assert fusion_for_search(loaded.config.calibration)[3] == "search"
    gallery = Gallery.create(tmp_path / "g", loaded, saved)
    gallery.enroll(enrollment_items([people]))
    [result] = gallery.search([people / "cid" / "1.png"], top=2)
    assert result.calibration == "search" and result.threshold == 0.9
    for candidate in result.candidates:  # ranked by the search fusion: the embedding's z-score
        assert candidate.scores["fused"] == pytest.approx((candidate.scores["embedding"] - 0.1) / 0.5, abs=1e-5)
    assert result.decision == "cid"  # itself, at z = 1.8 above the threshold


def test_a_clean_probe_is_ranked_and_thresholded_in_its_own_stratum(tmp_path, people, monkeypatch):  # noqa: F811
    """With the embedding alone for clean probes, a clean probe's candidates come in the embedding's
    order even where the model sees some gallery faces as occluded: every candidate of one probe is
    fused with the probe's stratum, so none is scored on another stratum's scale; the open-set
    threshold is that stratum's too."""
    import occface.galleries.search as search

    model, _ = tiny_model(tmp_path)
    stats = {"all": [0.0, 1.0], "clean-clean": [0.0, 1.0], "occluded-clean": [-5.0, 0.01]}  # another scale entirely
    model.config.calibration = {"search": {
        "normalization": {"hidden_below": 0.2, "hidden_share": 0.25, "embedding": stats, "qaconv": stats,
                          "qaconv_weighted": stats},
        "fusion_weight": {"all": {"embedding": 1.0}, "clean-clean": {"embedding": 1.0, "qaconv": 0.0, "qaconv_weighted": 0.0},
                          "occluded-clean": {"embedding": 0.5, "qaconv": 0.5, "qaconv_weighted": 0.0}},
        "threshold": {"all": 50.0, "clean-clean": -50.0, "occluded-clean": 50.0}}}
    model_dir = model.save_pretrained(tmp_path / "search_calibrated")
    gallery = Gallery.create(tmp_path / "g", model, model_dir)
    gallery.enroll(enrollment_items([people]))
    # The probe (one map) is clean; of several maps (gallery faces), every other one is occluded.
    monkeypatch.setattr(search, "predicted_occluded",
                        lambda occlusion, rule=None: np.arange(len(occlusion)) % 2 == 1 if len(occlusion) > 1
                        else np.zeros(len(occlusion), bool))
    [result] = gallery.search([people / "dee" / "1.png"], top=4, shortlist=12)
    assert result.ranked_by == "fused" and result.calibration == "search"
    embeddings = [c.scores["embedding"] for c in result.candidates]
    assert embeddings == sorted(embeddings, reverse=True)
    for candidate in result.candidates:
        assert candidate.scores["fused"] == pytest.approx(candidate.scores["embedding"], abs=1e-5)
    # The open-set threshold is the probe's stratum's, not one for scores of every scale.
    assert result.threshold == -50.0 and result.decision == result.candidates[0].identity
