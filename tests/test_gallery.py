"""The on-disk gallery: enrolment (idempotent, atomic), search, removal, the model check, the commands."""
import json

import numpy as np
import pytest

from occface.cli import main
from occface.data.errors import DataProblems
from occface.errors import InputError
from occface.gallery import Gallery, enrollment_items
from occface.models import ModelConfig, OccFaceModel

from conftest import write_png


def tiny_model(tmp_path, name="model", seed=0):
    import torch

    torch.manual_seed(seed)
    model = OccFaceModel(ModelConfig(arch="ir_18", width=0.125, feature_level="block4", occlusion_hidden_channels=8))
    return model.eval(), model.save_pretrained(tmp_path / name)


@pytest.fixture
def people(tmp_path):
    """4 identities x 3 distinct random faces, as identity folders."""
    rng = np.random.default_rng(0)
    root = tmp_path / "people"
    for identity in ("ann", "bob", "cid", "dee"):
        base = rng.integers(0, 256, (112, 112, 3))
        for k in range(3):
            noise = rng.integers(-20, 21, (112, 112, 3))
            write_png(root / identity / f"{k}.png", np.clip(base + noise, 0, 255).astype(np.uint8))
    return root


def test_enrol_search_remove(tmp_path, people):
    model, model_dir = tiny_model(tmp_path)
    gallery = Gallery.create(tmp_path / "g", model, model_dir)
    summary = gallery.enroll(enrollment_items([people]))
    assert (summary.added, summary.duplicates, summary.failed) == (12, 0, [])
    assert gallery.identities() == {"ann": 3, "bob": 3, "cid": 3, "dee": 3}
    again = Gallery.open(tmp_path / "g", model_dir=model_dir)
    assert again.enroll(enrollment_items([people])).duplicates == 12 and len(again) == 12
    maps = np.load(next((tmp_path / "g" / "shards").iterdir()) / "maps.npy", mmap_mode="r")
    assert maps.dtype == np.float16 and maps.shape[0] == 12
    # A query that is an enrolled image finds itself first, at cosine 1.
    [result] = again.search([people / "cid" / "1.png"], top=3, shortlist=8)
    assert result.candidates[0].identity == "cid" and result.candidates[0].scores["embedding"] == pytest.approx(1, abs=1e-4)
    assert len(result.candidates) == 3 and len({c.identity for c in result.candidates}) == 3
    assert result.ranked_by == "embedding"  # an uncalibrated model has no fused score
    assert set(result.candidates[0].scores) == {"embedding", "qaconv", "qaconv_weighted"}
    assert again.remove("cid") == 3
    assert "cid" not in Gallery.open(tmp_path / "g", load_model=False).identities()
    [result] = again.search([people / "cid" / "1.png"], top=4)
    assert "cid" not in {c.identity for c in result.candidates}
    with pytest.raises(InputError, match="no faces of identity 'cid'"):
        again.remove("cid")


def test_a_killed_write_leaves_the_gallery_as_it_was(tmp_path, people, monkeypatch):
    model, model_dir = tiny_model(tmp_path)
    gallery = Gallery.create(tmp_path / "g", model, model_dir)
    gallery.enroll(enrollment_items([people / "ann"], identity="ann"))
    before = (tmp_path / "g" / "manifest.json").read_text()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Gallery, "_commit", killed)
    with pytest.raises(KeyboardInterrupt):
        gallery.enroll(enrollment_items([people / "bob"], identity="bob"))
    monkeypatch.undo()
    reopened = Gallery.open(tmp_path / "g", model_dir=model_dir)
    assert (tmp_path / "g" / "manifest.json").read_text() == before
    assert reopened.identities() == {"ann": 3}
    reopened.enroll(enrollment_items([people / "bob"], identity="bob"))  # the orphaned shard is cleared
    assert len(list((tmp_path / "g" / "shards").iterdir())) == 2 and reopened.identities() == {"ann": 3, "bob": 3}


def test_a_gallery_refuses_another_model(tmp_path, people):
    model, model_dir = tiny_model(tmp_path)
    Gallery.create(tmp_path / "g", model, model_dir).enroll(enrollment_items([people]))
    _, other_dir = tiny_model(tmp_path, "other", seed=1)
    with pytest.raises(InputError, match="the gallery was built with the model at .*model.*other is another model"):
        Gallery.open(tmp_path / "g", model_dir=other_dir)
    with pytest.raises(InputError, match="a gallery exists here already"):
        Gallery.create(tmp_path / "g", model, model_dir)
    with pytest.raises(InputError, match="not a gallery"):
        Gallery.open(tmp_path / "nowhere")


def test_enrolment_inputs(tmp_path, people):
    csv_file = tmp_path / "faces.csv"
    csv_file.write_text("path,identity\npeople/ann/0.png,Ann A.\npeople/bob/1.png,Bob B.\n")
    assert [(p.name, i) for p, i in enrollment_items([csv_file])] == [("0.png", "Ann A."), ("1.png", "Bob B.")]
    (tmp_path / "bad.csv").write_text("file,name\nx.png,x\n")
    with pytest.raises(DataProblems) as error:
        enrollment_items([people / "ann" / "0.png", tmp_path / "bad.csv", tmp_path / "missing"])
    text = str(error.value)
    assert "0.png: a single image needs --identity" in text and "needs 'path' and 'identity' columns" in text
    assert "missing: not found" in text


def test_enrol_search_and_gallery_commands(tmp_path, people, capsys):
    _, model_dir = tiny_model(tmp_path)
    gallery = tmp_path / "g"
    assert main(["enroll", str(people), "--model", str(model_dir), "--gallery", str(gallery)]) == 0
    assert "enrolled 12 faces (0 already in the gallery" in capsys.readouterr().out
    assert main(["search", str(people / "bob" / "2.png"), "--model", str(model_dir), "--gallery", str(gallery),
                 "--top", "2", "--json"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["decision"] == "bob" and len(result["candidates"]) == 2
    assert main(["gallery", "list", "--gallery", str(gallery)]) == 0
    assert capsys.readouterr().out.splitlines() == ["ann\t3", "bob\t3", "cid\t3", "dee\t3"]
    assert main(["gallery", "remove", "dee", "--gallery", str(gallery)]) == 0
    assert main(["gallery", "stats", "--gallery", str(gallery)]) == 0
    stats = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert stats["faces"] == 9 and stats["identities"] == 3
    _, other_dir = tiny_model(tmp_path, "other", seed=1)
    assert main(["search", str(people / "bob" / "2.png"), "--model", str(other_dir), "--gallery", str(gallery)]) == 2
    assert "occface search: error: " in capsys.readouterr().err


def test_rows_read_from_disk(tmp_path):
    """NpyRows reads single rows of an .npy file (as search does) and says when the file is short."""
    from occface.gallery import NpyRows

    array = np.arange(5 * 3 * 2 * 2, dtype=np.float16).reshape(5, 3, 2, 2)
    np.save(tmp_path / "maps.npy", array)
    rows = NpyRows(tmp_path / "maps.npy")
    assert len(rows) == 5 and rows.dtype == np.float16
    for index in (0, 3, 4):
        np.testing.assert_array_equal(rows.row(index), array[index])
    np.testing.assert_array_equal(rows.read(), array)
    rows.close()
    data = (tmp_path / "maps.npy").read_bytes()
    (tmp_path / "maps.npy").write_bytes(data[: len(data) - 10])
    with pytest.raises(InputError, match=r"maps.npy: truncated \(row 4 of 5"):
        NpyRows(tmp_path / "maps.npy").row(4)


def test_search_and_match_fuse_the_sources_the_calibration_names(tmp_path, people):
    """A model calibrated to fuse with plain QAConv (where the visibility weighting costs QAConv)
    ranks a gallery and scores a pair by plain QAConv's z-score, not weighted QAConv's."""
    from occface.data.images import read_image
    from occface.match import match

    model, _ = tiny_model(tmp_path)
    model.config.calibration = {
        "normalization": {"hidden_below": 0.2, "hidden_share": 0.25, "embedding": [0.0, 1.0],
                          "qaconv": [0.5, 2.0], "qaconv_weighted": [0.0, 1.0]},
        "fusion_weight": {"all": {"qaconv": 1.0}},
    }
    model_dir = model.save_pretrained(tmp_path / "plain_fused")
    gallery = Gallery.create(tmp_path / "g", model, model_dir)
    gallery.enroll(enrollment_items([people]))
    [result] = gallery.search([people / "bob" / "2.png"], top=4, shortlist=12)
    assert result.ranked_by == "fused"
    for candidate in result.candidates:
        assert candidate.scores["fused"] == pytest.approx((candidate.scores["qaconv"] - 0.5) / 2.0, abs=1e-5)
    assert [c.scores["fused"] for c in result.candidates] == sorted((c.scores["fused"] for c in result.candidates),
                                                                    reverse=True)
    scores = match(model, read_image(people / "ann" / "0.png"), read_image(people / "bob" / "0.png"))["scores"]
    assert scores["fused"] == pytest.approx((scores["qaconv"] - 0.5) / 2.0, abs=1e-5)
