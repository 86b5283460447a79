"""Detection and alignment: the geometry, the detector file, photos in, whole folders."""
import csv
import math

import cv2
import numpy as np
import pytest

from occface.align import (DETECTOR_SHA256, Detection, FaceAligner, FaceDetector, FaceReader, apply_transform, find_detector,
                           invert_transform, similarity_transform, template)
from occface.align_folder import align_folder
from occface.data.errors import DataError
from occface.data.images import read_image
from occface.errors import InputError

from conftest import write_png


def similarity(scale: float, degrees: float, shift: tuple[float, float]) -> np.ndarray:
    angle = math.radians(degrees)
    linear = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return np.hstack([linear, np.array(shift, float)[:, None]])


def test_similarity_transform_recovers_a_known_similarity():
    truth = similarity(2.3, 27.0, (140.0, -35.0))
    points = np.random.default_rng(0).uniform(0, 112, (5, 2))
    fitted = similarity_transform(points, apply_transform(truth, points))
    np.testing.assert_allclose(fitted, truth, atol=1e-9)
    np.testing.assert_allclose(invert_transform(fitted) @ np.vstack([truth, [0, 0, 1]]), np.hstack([np.eye(2), np.zeros((2, 1))]),
                               atol=1e-9)


def test_similarity_transform_never_reflects():
    mirrored = template() * np.array([-1.0, 1.0])  # the same face seen in a mirror
    fitted = similarity_transform(mirrored, template())
    assert np.linalg.det(fitted[:, :2]) > 0


def test_template_scales_with_the_crop():
    np.testing.assert_allclose(template(224), 2 * template(112))
    assert template()[0, 0] < template()[1, 0]  # the image-left eye first, as YuNet lists them


def test_missing_detector_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("OCCFACE_DETECTOR", raising=False)
    monkeypatch.setenv("OCCFACE_HOME", str(tmp_path / "home"))
    with pytest.raises(InputError) as error:
        find_detector()
    message = str(error.value)
    for text in (DETECTOR_SHA256, "opencv_zoo", str(tmp_path / "home" / "face_detection_yunet_2023mar.onnx"),
                 "--detector", "OCCFACE_DETECTOR"):
        assert text in message
    with pytest.raises(InputError, match=r"nope.onnx: face detector not found"):
        find_detector(tmp_path / "nope.onnx")


def test_detector_found_from_the_environment_and_checked_by_hash(tmp_path, monkeypatch):
    wrong = tmp_path / "face_detection_yunet_2023mar.onnx"
    wrong.write_bytes(b"not a detector")
    monkeypatch.setenv("OCCFACE_DETECTOR", str(wrong))
    assert find_detector() == wrong
    with pytest.raises(InputError, match=r"face_detection_yunet_2023mar.onnx: not the YuNet 2023mar face detector "
                                         r"\(truncated: 14 bytes"):
        FaceDetector()
    wrong.write_bytes(b"x" * 232_589)  # the right size, other bytes
    with pytest.raises(InputError, match=r"face_detection_yunet_2023mar.onnx: not the YuNet 2023mar face detector "
                                         r"\(not face_detection_yunet_2023mar.onnx: sha256 [0-9a-f]{64}, expected 8f23"):
        FaceDetector()


def test_reader_takes_model_sized_images_as_aligned(tmp_path):
    face = write_png(tmp_path / "face.png", np.full((112, 112, 3), 90, np.uint8))
    reader = FaceReader(112, "auto", detector=tmp_path / "absent.onnx")  # never needed for an aligned face
    image, alignment = reader.read(face)
    assert image.shape == (112, 112, 3) and alignment is None
    assert reader.counts == {"aligned": 1, "detected": 0}
    assert not reader.needs_detection([face])
    photo = write_png(tmp_path / "photo.png", np.full((300, 400, 3), 90, np.uint8))
    assert reader.needs_detection([face, photo])
    with pytest.raises(InputError, match="absent.onnx: face detector not found"):
        reader.read(photo)
    with pytest.raises(DataError, match=r"photo.png: expected a face aligned to the 112x112.*got 400x300"):
        FaceReader(112, "aligned").read(photo)


# ---------------------------------------------------------------- with the real detector
def scene_with(face: np.ndarray, transform: np.ndarray, size=(480, 360), shade=120) -> np.ndarray:
    """``face`` (112x112) pasted into a plain scene by ``transform`` (crop -> scene)."""
    scene = np.full((size[1], size[0], 3), shade, np.uint8)
    warped = cv2.warpAffine(face, transform, size)
    inside = cv2.warpAffine(np.ones((112, 112), np.float32), transform, size)[..., None]
    return (scene * (1 - inside) + warped * inside).astype(np.uint8)


@pytest.fixture
def real_face(shared_data) -> np.ndarray:
    return read_image(sorted((shared_data / "faces112").glob("*/*.png"))[0])


@pytest.mark.parametrize("degrees", [0.0, 25.0, -25.0])
def test_a_face_in_a_photo_is_found_and_aligned(yunet_file, real_face, degrees):
    paste = similarity(1.6, degrees, (150.0, 60.0))
    photo = scene_with(real_face, paste)
    result = FaceAligner(yunet_file).align(photo)
    assert result.found == 1 and result.reason is None
    face = result.faces[0]
    assert face.image.shape == (112, 112, 3)
    # The detected eyes, taken back to the original crop, lie where the crop's eyes are (the data
    # set's own alignment leaves them within ~3 px of the template).
    eyes = apply_transform(invert_transform(paste), face.detection.landmarks[:2])
    assert np.linalg.norm(eyes - template()[:2], axis=1).max() < 6.0
    # ... and the crop composed with the paste is nearly the identity.
    composed = face.matrix[:, :2] @ paste[:, :2]
    assert abs(np.linalg.det(composed) - 1) < 0.15 and abs(composed[1, 0]) < 0.1
    # The aligned crop looks like the original face.
    difference = np.abs(face.image.astype(float) - real_face.astype(float)).mean()
    assert difference < 25, difference


def test_refinement_recovers_landmarks_that_drifted_by_a_fifth_of_the_face(yunet_file, real_face):
    # What YuNet gives on a face tilted by 25-30 degrees or under a mask: the face found, its five
    # points shifted together. The upright view then shows the face off its centre; refinement must
    # still take it (a gate of an eighth of the face, as before, kept the drifted points).
    paste = similarity(1.6, 0.0, (150.0, 60.0))
    photo = scene_with(real_face, paste)
    detector = FaceDetector(yunet_file)
    found = detector.detect(photo)[0]
    face_size = 1.6 * 112  # the 112 crop's side in the photo
    drifted = Detection(found.box, found.landmarks + np.array([0.2 * face_size, 0.0]), found.score)
    refined = detector.refine(photo, drifted)
    eyes = apply_transform(invert_transform(paste), refined.landmarks[:2])
    assert np.linalg.norm(eyes - template()[:2], axis=1).max() < 6.0
    assert detector.refine(photo, drifted, near=1 / 8).landmarks is drifted.landmarks  # the old gate: unchanged


def test_a_photo_without_a_face_gives_the_reason(yunet_file, tmp_path):
    blank = write_png(tmp_path / "wall.png", np.full((240, 320, 3), 200, np.uint8))
    result = FaceAligner(yunet_file).align(read_image(blank))
    assert result.faces == [] and "no face found" in result.reason
    with pytest.raises(DataError, match=r"wall.png: no face found"):
        FaceReader(112, "detect", yunet_file).read(blank)


def test_small_faces_are_left_out_on_request(yunet_file, real_face):
    photo = scene_with(real_face, similarity(1.0, 0.0, (200.0, 100.0)))
    assert FaceAligner(yunet_file).align(photo).faces
    result = FaceAligner(yunet_file, min_face=400).align(photo)
    assert result.faces == [] and "face too small" in result.reason and "400 px" in result.reason


def test_a_tight_crop_is_found_when_detection_is_forced(yunet_file, real_face, tmp_path):
    path = write_png(tmp_path / "crop.png", real_face)
    image, alignment = FaceReader(112, "detect", yunet_file).read(path)
    assert alignment is not None and image.shape == (112, 112, 3)
    assert np.linalg.norm(alignment.detection.landmarks[:2] - template()[:2], axis=1).max() < 6.0


def test_the_largest_of_several_faces_with_a_warning(yunet_file, real_face, tmp_path, caplog):
    photo = scene_with(real_face, similarity(1.0, 0.0, (20.0, 120.0)), size=(560, 360))
    bigger = scene_with(real_face, similarity(1.7, 0.0, (300.0, 80.0)), size=(560, 360))
    inside = cv2.warpAffine(np.ones((112, 112), np.float32), similarity(1.7, 0.0, (300.0, 80.0)), (560, 360)) > 0
    photo[inside] = bigger[inside]
    path = write_png(tmp_path / "two.png", photo)
    image, alignment = FaceReader(112, "auto", yunet_file).read(path)
    assert alignment.detection.box[0] > 250  # the bigger face, on the right
    assert "2 faces found; using the largest" in caplog.text
    assert len(FaceAligner(yunet_file).align(photo, all_faces=True).faces) == 2


def test_align_folder_mirrors_the_tree_and_resumes(yunet_file, real_face, tmp_path):
    photos = tmp_path / "photos"
    write_png(photos / "ann" / "a.png", scene_with(real_face, similarity(1.5, 10.0, (120.0, 70.0))))
    write_png(photos / "ann" / "b.jpg", scene_with(real_face, similarity(1.2, -15.0, (200.0, 90.0))))
    write_png(photos / "bob" / "wall.png", np.full((200, 200, 3), 60, np.uint8))
    (photos / "bob" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "aligned"
    summary = align_folder(photos, out, detector=yunet_file, progress=False)
    assert (summary.photos, summary.aligned, summary.faces, summary.failed, summary.skipped) == (4, 2, 2, 2, 0)
    assert read_image(out / "ann" / "a.png").shape == (112, 112, 3) and (out / "ann" / "b.png").is_file()
    with (out / "landmarks.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["source"] for r in rows] == ["ann/a.png", "ann/b.jpg"] and rows[0]["output"] == "ann/a.png"
    assert float(rows[0]["score"]) > 0.5 and float(rows[0]["x1"]) < float(rows[0]["x2"])
    with (out / "failures.csv").open() as handle:
        failures = {r["source"]: r["reason"] for r in csv.DictReader(handle)}
    assert "no face found" in failures["bob/wall.png"] and "unreadable or corrupt" in failures["bob/broken.jpg"]
    again = align_folder(photos, out, detector=yunet_file, progress=False)
    assert (again.skipped, again.aligned, again.failed) == (4, 0, 0)
    # A photo added later is the only one done on the next run; two worker processes give the same rows.
    write_png(photos / "cid" / "c.png", scene_with(real_face, similarity(1.3, 0.0, (100.0, 100.0))))
    third = align_folder(photos, out, detector=yunet_file, workers=2, progress=False)
    assert (third.skipped, third.aligned) == (4, 1)
    with (out / "landmarks.csv").open() as handle:
        assert [r["source"] for r in csv.DictReader(handle)] == ["ann/a.png", "ann/b.jpg", "cid/c.png"]


def test_align_folder_refuses_its_own_input_as_output(tmp_path, yunet_file):
    write_png(tmp_path / "photos" / "a.png", np.zeros((50, 50, 3), np.uint8))
    with pytest.raises(InputError, match="must not be inside the input folder"):
        align_folder(tmp_path / "photos", tmp_path / "photos" / "out", detector=yunet_file, progress=False)
    with pytest.raises(InputError, match="not a folder of photos"):
        align_folder(tmp_path / "nothing", tmp_path / "out", detector=yunet_file, progress=False)
