import numpy as np
import pytest

from occface.cli import main
from occface.data import OcclusionDataset, OcclusionSynthesizer, ProceduralFaceDataset, ProceduralFaces, load_overlays
from occface.data.synth import LEFT_EYE, MOUTH_LEFT, MOUTH_RIGHT, RIGHT_EYE, SynthesizeOcclusion, find_eye_slit
from occface.data.tools import check_data, contact_sheet, synthesize_dataset

EYES = [(round(LEFT_EYE[1]), round(LEFT_EYE[0])), (round(RIGHT_EYE[1]), round(RIGHT_EYE[0]))]
MOUTH = [(round(MOUTH_LEFT[1]), round(MOUTH_LEFT[0]) + 5), (round(MOUTH_RIGHT[1]), round(MOUTH_RIGHT[0]) - 5)]
EXPECTED = {  # kind: (eyes visible, mouth visible)
    "niqab": (True, False),
    "mask": (True, False),
    "sunglasses": (False, True),
}


def assert_exact_mask(synthesizer, kind, size=112, seed=0):
    """Compositing the same occluder over black and over white faces: the difference is 255 times
    the visibility, so the returned mask is exactly 1 - alpha."""
    black, white = np.zeros((size, size, 3), np.uint8), np.full((size, size, 3), 255, np.uint8)
    on_black, visibility, _ = synthesizer(black, np.random.default_rng(seed), kind)
    on_white, visibility_again, _ = synthesizer(white, np.random.default_rng(seed), kind)
    assert np.array_equal(visibility, visibility_again)
    difference = on_white.astype(np.float32) - on_black.astype(np.float32)
    assert np.abs(difference - 255 * visibility[:, :, None]).max() <= 1.001  # two uint8 roundings
    return visibility


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_procedural_occluders_cover_the_right_parts(kind):
    synthesizer = OcclusionSynthesizer(kinds=[kind])
    for seed in range(5):
        visibility = assert_exact_mask(synthesizer, kind, seed=seed)
        eyes_visible, mouth_visible = EXPECTED[kind]
        assert all((visibility[y, x] > 0.5) == eyes_visible for y, x in EYES), (kind, seed)
        assert all((visibility[y, x] > 0.5) == mouth_visible for y, x in MOUTH), (kind, seed)


@pytest.mark.parametrize("kind", ["hand", "bar"])
def test_other_procedural_occluders(kind):
    visibility = assert_exact_mask(OcclusionSynthesizer(kinds=[kind]), kind)
    assert 0.02 < 1 - visibility.mean() < 0.6


def test_224_faces_are_scaled():
    visibility = assert_exact_mask(OcclusionSynthesizer(kinds=["niqab"]), "niqab", size=224)
    assert all(visibility[2 * y, 2 * x] > 0.5 for y, x in EYES)


def test_eye_slit_is_the_hole_inside_the_cloth():
    alpha = np.zeros((100, 200), np.uint8)
    alpha[10:90, 20:180] = 255
    alpha[40:55, 60:140] = 0  # the slit
    cx, cy, width, height = find_eye_slit(alpha)
    assert (cx, cy, width, height) == (99.5, 47.0, 80, 15)


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_real_overlays_cover_the_right_parts(shared_data, kind):
    synthesizer = OcclusionSynthesizer(load_overlays(shared_data / "occluders", [kind]), kinds=[kind], procedural=False)
    for seed in range(6):
        visibility = assert_exact_mask(synthesizer, kind, seed=seed)
        eyes_visible, mouth_visible = EXPECTED[kind]
        assert all((visibility[y, x] > 0.5) == eyes_visible for y, x in EYES), (kind, seed)
        assert all((visibility[y, x] > 0.5) == mouth_visible for y, x in MOUTH), (kind, seed)


def test_real_niqab_slit_and_eye_band(shared_data):
    overlay = load_overlays(shared_data / "occluders", ["niqab"])[0]
    # The data's README: the slit spans about x 184-318, y 112-145 of the 500x500 image.
    cx, cy, width, height = find_eye_slit(np.asarray(__import__("PIL.Image").Image.open(shared_data / "occluders" / "niqab.png"))[..., 3])
    assert 240 < cx < 262 and 120 < cy < 137 and 120 < width < 150 and 25 < height < 45
    visibility = assert_exact_mask(OcclusionSynthesizer([overlay], kinds=["niqab"]), "niqab")
    band_rows = np.flatnonzero(visibility[:, 40:72].mean(axis=1) > 0.5)
    assert 8 <= len(band_rows) <= 24 and 40 <= band_rows.mean() <= 60


def test_synthesize_occlusion_transform_multiplies_masks():
    transform = SynthesizeOcclusion(OcclusionSynthesizer(kinds=["mask"]), p=1.0)
    mask = np.ones((112, 112), np.float32)
    mask[:, :10] = 0
    _, out = transform(np.zeros((112, 112, 3), np.uint8), mask, np.random.default_rng(0))
    assert np.all(out[:, :10] == 0) and out[100, 56] < 0.5 and out[50, 56] == 1


def test_missing_overlay_files_are_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="no overlay image for \\['sunglasses'\\]"):
        load_overlays(tmp_path, ["sunglasses"])


# ---------------------------------------------------------------- procedural faces
def test_procedural_faces_are_deterministic_and_identities_differ_in_the_eye_band():
    faces = ProceduralFaces(num_identities=6, images_per_identity=6, seed=3)
    assert np.array_equal(faces.render(2, 4), ProceduralFaces(6, 6, seed=3).render(2, 4))
    assert not np.array_equal(faces.render(2, 4), faces.render(2, 5))
    band = slice(38, 64)  # what a niqab's slit leaves

    def eye_band(identity, index):
        return faces.render(identity, index)[band, 24:88].astype(np.float32)

    within = np.mean([np.abs(eye_band(i, 0) - eye_band(i, j)).mean() for i in range(6) for j in (1, 2)])
    between = np.mean([np.abs(eye_band(i, 0) - eye_band(k, 1)).mean() for i in range(6) for k in range(6) if k != i])
    assert between > 1.3 * within


def test_procedural_dataset():
    dataset = ProceduralFaceDataset(ProceduralFaces(4, 3, seed=0), identities=[1, 3])
    assert len(dataset) == 6 and dataset.identities == ["id_0001", "id_0003"] and dataset.targets == [0, 0, 0, 1, 1, 1]
    assert dataset[4].image.shape == (3, 112, 112) and dataset[4].label == 1


# ---------------------------------------------------------------- tools and CLI
def test_synth_check_and_show_end_to_end(tmp_path, capsys):
    ProceduralFaces(3, 2, seed=0).write(tmp_path / "faces")
    assert main(["synth", "--faces", str(tmp_path / "faces"), "--out", str(tmp_path / "occ"),
                 "--kinds", "niqab,mask", "--per-face", "2"]) == 0
    assert "wrote 12 occluded faces" in capsys.readouterr().out
    dataset = OcclusionDataset(tmp_path / "occ")
    assert len(dataset) == 12 and dataset.num_classes == 3 and all(dataset.occluded_flags)
    assert main(["check-data", str(tmp_path / "occ")]) == 0
    out = capsys.readouterr().out
    assert "identities: 3" in out and "masks: 12" in out and "mean visibility" in out and "no problems found" in out
    sheet = contact_sheet(tmp_path / "occ", tmp_path / "sheet.png", count=6, columns=3)
    assert sheet.is_file()
    # Break two files: check-data lists both and exits 2 (bad input).
    manifest_rows = (tmp_path / "occ" / "manifest.csv").read_text().splitlines()
    first_mask = manifest_rows[1].split(",")[1]
    (tmp_path / "occ" / first_mask).unlink()
    second_image = manifest_rows[2].split(",")[0]
    (tmp_path / "occ" / second_image).write_bytes(b"broken")
    assert main(["check-data", str(tmp_path / "occ")]) == 2
    out = capsys.readouterr().out
    assert "2 problem(s)" in out and first_mask in out and second_image in out


def test_check_data_on_an_image_folder_and_on_nothing(tmp_path, face_folder):
    report = check_data(face_folder)
    assert report.layout == "image-folder" and report.summary == {"identities": 3, "images": 12} and not report.problems
    report = check_data(tmp_path / "nowhere")
    assert report.problems == [f"{tmp_path / 'nowhere'}: no such file or directory"]


def test_synthesis_on_real_faces(shared_data, tmp_path):
    manifest, count, _ = synthesize_dataset(shared_data / "faces112", tmp_path / "occ", shared_data / "occluders",
                                            identities=["barack_obama"])
    assert count == len(list((shared_data / "faces112" / "barack_obama").iterdir()))
    report = check_data(tmp_path / "occ")
    assert not report.problems and report.summary["identities"] == 1
    assert 0.3 < float(report.summary["mean visibility (masked faces)"]) < 0.95
