import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_png
from occface.cli import main
from occface.data import DataError, OcclusionDataset, ProceduralFaceDataset, ProceduralFaces
from occface.scoring import (choose_fusion_weights, choose_strata_rule, describe_fusion_weight, Features, fuse,
                             fusion_normalization, fusion_shares, pair_kind, predicted_occluded, strata_rule)
from occface.metrics import _bootstrap_auc, compare_sources, threshold_at_far, verification_metrics
from occface.reports import comparison_table
from occface.evaluate import identification, OcclusionPairs, parse_occlusion_specs
from occface.align import FaceReader
from occface.models.occface import ModelConfig, OccFaceModel


@pytest.fixture
def tiny_model_dir(tmp_path):
    torch.manual_seed(0)
    model = OccFaceModel(ModelConfig(arch="ir_18", width=0.125, occlusion_hidden_channels=8))
    model.config.calibration = {"embedding": {"far": 0.01, "threshold": 0.5}}
    return model.eval().save_pretrained(tmp_path / "model")


def test_verification_metrics_on_separable_scores():
    issame = np.array([True, False] * 50)
    scores = np.where(issame, 1.0, 0.0) + np.linspace(0, 0.1, 100)
    metrics = verification_metrics(scores, issame)
    assert metrics["accuracy"] == 1.0 and metrics["auc"] == 1.0 and metrics["eer"] == 0.0
    assert metrics["tar@far=1e-1"] == 1.0
    assert metrics["tar@far=1e-2"] is None and "tar@far=1e-2 not measurable with 50 negative pairs" in metrics["notes"]


def test_verification_accuracy_uses_thresholds_from_other_folds():
    rng = np.random.default_rng(0)
    issame = rng.random(600) < 0.5
    scores = issame + rng.normal(0, 0.5, 600)
    folds = np.repeat(np.arange(10), 60)
    metrics = verification_metrics(scores, issame, folds)
    best_possible = max(((scores >= t) == issame).mean() for t in np.unique(scores))
    assert 0.75 < metrics["accuracy"] <= best_possible
    assert metrics["pairs"] == 600 and 0.0 < metrics["eer"] < 0.4


def test_threshold_at_far_bounds_false_accepts():
    rng = np.random.default_rng(1)
    issame = rng.random(2000) < 0.5
    scores = rng.normal(size=2000) + issame
    threshold = threshold_at_far(scores, issame, 0.01)
    assert (scores[~issame] >= threshold).mean() <= 0.01


def test_occlusion_specs():
    assert parse_occlusion_specs(["none", "niqab:probe", "niqab:both"]) == (["none", "probe", "both"], ["niqab"])
    assert parse_occlusion_specs(["niqab+mask:probe"]) == (["probe"], ["niqab", "mask"])
    with pytest.raises(ValueError, match="expected none, KIND:probe or KIND:both"):
        parse_occlusion_specs(["niqab:left"])
    with pytest.raises(ValueError, match="same occluder kinds"):
        parse_occlusion_specs(["niqab:probe", "mask:both"])


def test_pairs_from_a_protocol_with_occlusion_sides():
    from occface.data import OcclusionSynthesizer

    base = ProceduralFaceDataset(ProceduralFaces(3, 2, seed=0))
    pairs = OcclusionPairs.from_pairs(base, np.array([[0, 1], [2, 4]]), np.array([True, False]), np.array([0, 1]),
                                      ["none", "probe", "both"], OcclusionSynthesizer(kinds=["niqab"]))
    assert pairs.pairs.shape == (6, 2) and pairs.folds.tolist() == [0, 1] * 3
    assert pairs.types.tolist() == ["clean-clean"] * 2 + ["occluded-clean"] * 2 + ["occluded-occluded"] * 2
    flags = [pairs.dataset[i].occluded for i in range(len(pairs.dataset))]
    assert len(flags) == 8  # 4 clean images + 1,4 occluded (probe) + 0,2 occluded (both)
    assert sum(flags) == 4


def test_real_masks_and_occluded_lists_mark_faces_occluded(tmp_path):
    root = tmp_path / "occ"
    write_png(root / "a.png", np.zeros((112, 112, 3), np.uint8))
    write_png(root / "b.png", np.zeros((112, 112, 3), np.uint8))
    write_png(root / "c.png", np.zeros((112, 112, 3), np.uint8))
    mask = np.full((112, 112), 255, np.uint8)
    mask[60:] = 0
    write_png(root / "a_mask.png", mask)
    (root / "manifest.csv").write_text("image,mask,identity\na.png,a_mask.png,p\nb.png,,p\nc.png,,q\n")
    base = OcclusionDataset(root)
    pairs = OcclusionPairs.from_pairs(base, np.array([[0, 1], [1, 2]]), np.array([True, False]), None, ["none"],
                                      names=["a.png", "b.png", "c.png"], occluded_names={"c.png"})
    assert [pairs.dataset[i].occluded for i in range(3)] == [True, False, True]


def test_fusion_normalises_each_visibility_stratum_on_its_own():
    """An occluder that lifts every occluded pair's embedding score by the same amount (whoever
    wears it) must not move those pairs relative to clean ones in the fused score."""
    rng = np.random.default_rng(0)
    issame = np.tile([True, False], 200)
    clean = issame + rng.normal(0, 0.5, 400)
    occluded = issame + rng.normal(0, 0.5, 400)
    strata = np.array(["clean-clean"] * 400 + ["occluded-occluded"] * 400)
    scores = {"embedding": np.concatenate([clean, occluded + 5.0]), "qaconv_weighted": np.concatenate([clean, occluded])}
    stats = fusion_normalization(scores, strata)
    assert stats["embedding"]["occluded-occluded"][0] == pytest.approx(occluded.mean() + 5.0)
    assert "occluded-clean" not in stats["embedding"]  # no such pairs: those fall back to "all"
    fused = fuse(scores, stats, 0.5, strata)
    unshifted = {**scores, "embedding": np.concatenate([clean, occluded])}
    np.testing.assert_allclose(fused, fuse(unshifted, fusion_normalization(unshifted, strata), 0.5, strata), atol=1e-9)
    same = np.concatenate([issame, issame])
    single = verification_metrics(fused, same)["accuracy"]
    unstratified = fuse(scores, fusion_normalization(scores), 0.5)
    assert single > verification_metrics(unstratified, same)["accuracy"] + 0.05


def test_fusion_accepts_the_single_normalisation_of_older_models():
    old = {"embedding": [0.2, 0.5], "qaconv_weighted": [-1.0, 2.0]}
    strata = np.array(["clean-clean", "occluded-occluded"])
    scores = {"embedding": np.array([0.7, 0.2]), "qaconv_weighted": np.array([1.0, -1.0])}
    np.testing.assert_allclose(fuse(scores, old, 0.5, strata),
                               [0.5 * 1.0 + 0.5 * 1.0, 0.0])


def test_fusion_weights_count_only_what_qaconv_adds_to_the_embedding():
    """Two scores of one network share errors. A QAConv score that is the embedding's score plus
    noise adds nothing, and should get (almost) no weight, though on its own it separates the
    identities well; one with evidence of its own should get a share, and the fusion should then
    separate better than either source."""
    rng = np.random.default_rng(3)
    issame = np.tile([True, False], 1000)
    strata = np.full(len(issame), "occluded-clean")
    embedding = issame * 2.0 + rng.normal(0, 1, len(issame))
    echo = 0.8 * embedding + rng.normal(0, 0.5, len(issame))
    weights = choose_fusion_weights({"embedding": embedding, "qaconv_weighted": echo}, issame, strata)
    assert verification_metrics(echo, issame)["auc"] > 0.85
    assert weights["occluded-clean"]["embedding"] >= 0.9

    shared = rng.normal(0, 1, len(issame))  # an error both sources make
    embedding = issame * 2.0 + 0.7 * shared + rng.normal(0, 0.7, len(issame))
    own = issame * 1.5 + 0.7 * shared + rng.normal(0, 0.7, len(issame))
    scores = {"embedding": embedding, "qaconv_weighted": own}
    weights = choose_fusion_weights(scores, issame, strata)
    assert 0.5 < weights["occluded-clean"]["embedding"] < 0.9
    fused = fuse(scores, fusion_normalization(scores, strata), weights, strata)
    auc = {name: verification_metrics(values, issame)["auc"] for name, values in
           (("fused", fused), ("embedding", embedding), ("qaconv", own))}
    assert auc["fused"] > max(auc["embedding"], auc["qaconv"]) + 0.005


def test_fusion_shares_go_to_the_qaconv_source_that_adds_evidence():
    """Plain and weighted QAConv are both candidates: the one with evidence beyond the embedding
    gets the share, the one that only echoes it (plus noise) gets none, whichever of the two it is;
    the fusion of the chosen ones separates better than any source alone."""
    rng = np.random.default_rng(5)
    issame = np.tile([True, False], 1500)
    strata = np.full(len(issame), "occluded-occluded")
    shared = rng.normal(0, 1, len(issame))
    embedding = issame * 2.0 + 0.7 * shared + rng.normal(0, 0.7, len(issame))
    useful = issame * 1.5 + 0.7 * shared + rng.normal(0, 0.7, len(issame))
    echo = useful + rng.normal(0, 1.0, len(issame))
    for good, bad in (("qaconv", "qaconv_weighted"), ("qaconv_weighted", "qaconv")):
        scores = {"embedding": embedding, good: useful, bad: echo}
        weights = choose_fusion_weights(scores, issame, strata)
        shares = weights["occluded-occluded"]
        assert shares[bad] <= 0.05 < 0.15 <= shares[good], (good, shares)
        assert sum(shares.values()) == pytest.approx(1.0)
        fused = fuse(scores, fusion_normalization(scores, strata), weights, strata)
        auc = {name: verification_metrics(values, issame)["auc"] for name, values in scores.items()}
        assert verification_metrics(fused, issame)["auc"] > max(auc.values()) + 0.005
    assert describe_fusion_weight(weights["occluded-occluded"]).startswith("embedding ")


def test_fusion_weights_name_their_sources_and_strata():
    assert fusion_shares(0.3) == {"all": {"embedding": 0.3, "qaconv": 0.0, "qaconv_weighted": pytest.approx(0.7)}}
    assert fusion_shares({"all": 0.5, "clean-clean": {"embedding": 1.0}})["clean-clean"] == {
        "embedding": 1.0, "qaconv": 0.0, "qaconv_weighted": 0.0}
    with pytest.raises(ValueError, match="qaconv_weigthed"):
        fusion_shares({"embedding": 0.5, "qaconv_weigthed": 0.5})
    with pytest.raises(ValueError, match="'all'"):
        fusion_shares({"clean-clean": 0.5})
    with pytest.raises(ValueError, match="occluded-clear"):
        fusion_shares({"all": 0.5, "occluded-clear": 0.5})
    with pytest.raises(ValueError, match="qaconv"):  # a share for scores that were not given
        fuse({"embedding": np.zeros(2), "qaconv_weighted": np.zeros(2)},
             {"embedding": [0, 1], "qaconv_weighted": [0, 1]}, {"embedding": 0.5, "qaconv": 0.5})


def test_fusion_weights_follow_each_strata_separation():
    """Where the embedding is noise (an occluded stratum) the fusion should all but drop it; where
    both sources separate identities equally it should weigh them alike; a stratum with too
    few pairs falls back to the weight chosen on all pairs."""
    rng = np.random.default_rng(1)
    issame = np.tile([True, False], 300)
    informative = lambda: issame * 1.5 + rng.normal(0, 1, 600)  # noqa: E731  d' = 1.5
    strata = np.array(["occluded-clean"] * 600 + ["clean-clean"] * 600 + ["occluded-occluded"] * 10)
    same = np.concatenate([issame, issame, issame[:10]])
    scores = {"embedding": np.concatenate([rng.normal(0, 1, 600), informative(), rng.normal(0, 1, 10)]),
              "qaconv_weighted": np.concatenate([informative(), informative(), rng.normal(0, 1, 10)])}
    weights = choose_fusion_weights(scores, same, strata)
    assert weights["occluded-clean"]["embedding"] <= 0.1
    assert 0.4 <= weights["clean-clean"]["embedding"] <= 0.6
    assert "occluded-occluded" not in weights and 0.1 < weights["all"]["embedding"] < 0.5
    normalization = fusion_normalization(scores, strata)
    fused = fuse(scores, normalization, weights, strata)
    for stratum, weight in (("occluded-clean", weights["occluded-clean"]), ("occluded-occluded", weights["all"])):
        chosen = strata == stratum
        alone = fuse({k: v[chosen] for k, v in scores.items()}, normalization, weight, strata[chosen])
        np.testing.assert_allclose(fused[chosen], alone)
    occluded = strata == "occluded-clean"
    spec = fuse(scores, normalization, 0.5, strata)
    assert (verification_metrics(fused[occluded], same[occluded])["auc"]
            > verification_metrics(spec[occluded], same[occluded])["auc"] + 0.05)
    assert describe_fusion_weight(0.5) == "embedding 0.5 + weighted QAConv 0.5"
    assert describe_fusion_weight(weights).endswith(
        f"otherwise: embedding {weights['all']['embedding']:g} + weighted QAConv {weights['all']['qaconv_weighted']:g}")


def test_bootstrap_auc_is_the_roc_auc_with_ties_and_multiplicities():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    issame = rng.random(300) < 0.4
    scores = np.round(issame + rng.normal(0, 1, 300), 1)  # rounding makes many ties
    counts = rng.integers(0, 3, (4, 300))
    expected = [roc_auc_score(np.repeat(issame, c), np.repeat(scores, c)) for c in counts]
    np.testing.assert_allclose(_bootstrap_auc(scores, issame, counts), expected, rtol=1e-12)


def test_compare_sources_tells_a_better_source_from_an_equal_one():
    """A source with d' = 1.5 against noise: a clearly positive difference. Two draws of the same
    quality on the occluded-clean pairs: an interval around 0. A source against itself: exactly 0."""
    rng = np.random.default_rng(3)
    issame = np.tile([True, False], 400)
    types = np.array(["occluded-clean"] * 400 + ["clean-clean"] * 400)
    informative = issame * 1.5 + rng.normal(0, 1, 800)
    other = issame * 1.5 + rng.normal(0, 1, 800)
    noise = rng.normal(0, 1, 800)
    scores = {"qaconv_weighted": informative,
              "qaconv": np.where(types == "clean-clean", noise, other),
              "fused": informative.copy()}
    result = compare_sources(scores, issame, types, resamples=400)
    assert set(result) == {"qaconv_weighted-vs-qaconv", "fused-vs-qaconv_weighted"}  # no embedding scores
    clean = result["qaconv_weighted-vs-qaconv"]["clean-clean"]
    assert clean["ci95"][0] > 0.2 and clean["pairs"] == 400 and clean["resamples"] == 400
    occluded = result["qaconv_weighted-vs-qaconv"]["occluded-clean"]
    assert occluded["ci95"][0] < occluded["auc_difference"] < occluded["ci95"][1]
    assert occluded["ci95"][0] < 0 < occluded["ci95"][1]
    assert result["fused-vs-qaconv_weighted"]["all"] == {"auc_difference": 0.0, "ci95": [0.0, 0.0], "pairs": 800,
                                                         "resamples": 400}
    table = comparison_table(result)
    assert "| qaconv_weighted − qaconv | ≈" in table and "> +0." in table


def test_predicted_pair_types_need_a_confidently_hidden_region():
    maps = torch.ones(3, 1, 7, 7)
    maps[1, :, 4:] = 0.05  # a niqab: the lower 3 of 7 rows hidden
    maps[2] = 0.45  # unsure everywhere, nothing confidently hidden
    hidden = predicted_occluded(maps)
    assert hidden.tolist() == [False, True, False]
    assert predicted_occluded(maps, {"hidden_below": 0.5}).tolist() == [False, True, True]
    assert pair_kind(hidden[[0, 1, 1]], hidden[[2, 2, 1]]).tolist() == [
        "clean-clean", "occluded-clean", "occluded-occluded"]


def test_strata_rule_is_chosen_on_labelled_faces():
    """Masks hide far less of the map than niqabs: the chosen share must catch both and spare
    clean faces whose maps have a few unsure cells; the model stores it and evaluation reads it."""
    maps = torch.ones(30, 1, 14, 14)
    maps[:10].view(10, -1)[:, :8] = 0.1  # clean faces, 8 of 196 cells (4%) unsure
    maps[10:20].view(10, -1)[:, :30] = 0.05  # masks: 15% hidden
    maps[20:].view(10, -1)[:, :110] = 0.05  # niqabs: 56% hidden
    occluded = np.arange(30) >= 10
    rule = choose_strata_rule(maps, occluded)
    assert 8 / 196 < rule["hidden_share"] <= 30 / 196 and rule["hidden_below"] == 0.2
    assert predicted_occluded(maps, rule).tolist() == occluded.tolist()
    assert predicted_occluded(maps).sum() == 10  # the niqab-sized default misses the masks
    assert choose_strata_rule(maps[10:], occluded[10:])["hidden_share"] == 0.25  # no clean faces: the default
    scores = {"embedding": np.zeros(4), "qaconv_weighted": np.ones(4)}
    model = OccFaceModel(ModelConfig(arch="ir_18", width=0.125, occlusion_hidden_channels=8))
    assert strata_rule(model) is None
    model.config.calibration = {"normalization": fusion_normalization(scores, None, rule)}
    assert strata_rule(model) == rule


def test_identification_ranks():
    torch.manual_seed(0)
    model = OccFaceModel(ModelConfig(arch="ir_18", width=0.125, occlusion_hidden_channels=8)).eval()
    maps = torch.randn(4, 64, 7, 7)
    embedding = torch.nn.functional.normalize(torch.randn(4, 512), dim=1)
    gallery = Features(embedding, maps, torch.ones(4, 1, 7, 7), torch.zeros(4, dtype=torch.bool))
    noisy = torch.nn.functional.normalize(embedding + 0.05 * torch.randn(4, 512), dim=1)
    probe = Features(noisy, maps + 0.05 * torch.randn_like(maps), torch.ones(4, 1, 7, 7), torch.zeros(4, dtype=torch.bool))
    result = identification(model, gallery, probe, np.arange(4), np.arange(4), ranks=(1, 3))
    assert result["embedding"]["rank-1"] == 1.0 and result["qaconv"]["rank-3"] == 1.0
    assert result["embedding"]["probes"] == 4 and result["embedding"]["gallery"] == 4


def test_eval_command_on_an_lfw_style_protocol(tmp_path, tiny_model_dir, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / "lfw"
    for name, count in (("Ann_Lee", 3), ("Bo_Kim", 2), ("Cy_Ng", 2)):
        for number in range(1, count + 1):
            path = root / name / f"{name}_{number:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(path)
    (tmp_path / "pairs.txt").write_text("2 2\nAnn_Lee 1 2\nBo_Kim 1 2\nAnn_Lee 1 Bo_Kim 1\nCy_Ng 1 Ann_Lee 3\n"
                                        "Ann_Lee 2 3\nCy_Ng 1 2\nBo_Kim 2 Cy_Ng 2\nAnn_Lee 3 Cy_Ng 1\n")
    out = tmp_path / "report"
    assert main(["eval", "--model", str(tiny_model_dir), "--pairs", str(tmp_path / "pairs.txt"), "--root", str(root),
                 "--occlude", "none", "--occlude", "niqab:probe", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["embedding"]["clean-clean"]["pairs"] == 8 and metrics["fused"]["occluded-clean"]["pairs"] == 8
    assert "occluded-occluded" not in metrics["qaconv"]
    for name in ("report.md", "roc.png", "histograms.png", "visibility_grid.png"):
        assert (out / name).is_file()
    assert "| qaconv_weighted |" in capsys.readouterr().out
    assert metrics["comparisons"]["qaconv_weighted-vs-qaconv"]["occluded-clean"]["pairs"] == 8
    assert "| qaconv_weighted − qaconv |" in (out / "report.md").read_text()


def test_eval_command_with_identification_on_a_folder(tmp_path, tiny_model_dir, capsys):
    ProceduralFaces(4, 3, seed=1).write(tmp_path / "faces")
    assert main(["eval", "--model", str(tiny_model_dir), "--folder", str(tmp_path / "faces"), "--occlude",
                 "mask:probe", "--pairs-per-type", "10", "--identification", "--out", str(tmp_path / "r")]) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["identification"]["fused"]["probes"] == 8 and metrics["identification"]["fused"]["gallery"] == 4
    assert "rank-1" in capsys.readouterr().out


def test_match_command(tmp_path, tiny_model_dir, capsys):
    ProceduralFaces(2, 2, seed=2).write(tmp_path / "faces")
    first, second = tmp_path / "faces" / "id_0000" / "0000.png", tmp_path / "faces" / "id_0001" / "0001.png"
    assert main(["match", str(first), str(second), "--model", str(tiny_model_dir), "--out", str(tmp_path / "m.png")]) == 0
    out = capsys.readouterr().out
    assert "embedding" in out and "threshold 0.500 at FAR 0.01" in out and "decision (embedding)" in out
    assert "pair type seen: " in out
    assert Image.open(tmp_path / "m.png").size[0] > 224


def test_match_rejects_unaligned_images(tmp_path):
    write_png(tmp_path / "big.png", np.zeros((250, 250, 3), np.uint8))
    with pytest.raises(DataError, match=r"big.png: expected a face aligned to the 112x112 ArcFace template.*got 250x250"):
        FaceReader(112, "aligned")(tmp_path / "big.png")


def test_pair_scores_in_chunks_equal_each_pair_scored_alone(monkeypatch):
    import occface.scoring as scoring

    model = OccFaceModel(ModelConfig(arch="ir_18", width=0.125, occlusion_hidden_channels=8)).eval()
    generator = torch.Generator().manual_seed(0)
    count = 9
    features = Features(torch.nn.functional.normalize(torch.randn(count, 512, generator=generator), dim=1),
                        torch.randn(count, model.qaconv.num_features, 7, 7, generator=generator),
                        torch.rand(count, 1, 7, 7, generator=generator),
                        torch.zeros(count, dtype=torch.bool))
    pairs = np.array([[0, 1], [2, 3], [4, 5], [6, 7], [8, 0], [1, 8], [3, 3]])
    monkeypatch.setattr(scoring, "PAIR_CHUNK", 3)
    chunked = scoring.pair_scores(model, features, pairs, precision="fp32")
    qaconv = scoring.cpu_matcher(model)
    for k, (i, j) in enumerate(pairs):
        plain = qaconv.score_pairs(features.feature_map[[i]], features.feature_map[[j]])
        weighted = qaconv.score_pairs(features.feature_map[[i]], features.feature_map[[j]],
                                      features.occlusion[[i]], features.occlusion[[j]])
        assert chunked["qaconv"][k] == pytest.approx(plain.item(), abs=1e-5)
        assert chunked["qaconv_weighted"][k] == pytest.approx(weighted.item(), abs=1e-5)
    assert len(chunked["fused"]) == len(pairs)


def test_features_without_maps_keep_the_same_embeddings():
    from occface.scoring import embedding_scores, extract_features, pair_scores

    model = OccFaceModel(ModelConfig(arch="ir_18", width=0.125, occlusion_hidden_channels=8))
    dataset = ProceduralFaceDataset(ProceduralFaces(3, 2, seed=0))
    full = extract_features(model, dataset, 4, precision="fp32")
    lean = extract_features(model, dataset, 4, precision="fp32", keep_maps=False)
    assert lean.feature_map.shape == (0, *full.feature_map.shape[1:])
    torch.testing.assert_close(lean.embedding, full.embedding)
    pairs = np.array([[0, 1], [2, 5]])
    np.testing.assert_allclose(embedding_scores(lean, pairs), (full.embedding[[0, 2]] * full.embedding[[1, 5]]).sum(1).numpy(),
                               rtol=1e-6)
    with pytest.raises(ValueError, match=r"feature maps of all 6 faces, got 0 \(extracted with keep_maps=False\?\)"):
        pair_scores(model, lean, pairs, precision="fp32")
