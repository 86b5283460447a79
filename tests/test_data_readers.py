import io
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_png
from occface.data import (DataError, DataProblems, ImageFolderDataset, ImageListDataset, RecordIODataset, read_bin,
                          read_pairs_txt, to_image, to_tensor)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- image folders and colour order
def test_image_folder_classes_come_from_the_data(face_folder):
    dataset = ImageFolderDataset(face_folder)
    assert dataset.identities == ["alice", "bob", "carol"] and dataset.num_classes == 3
    assert len(dataset) == 12 and sorted(set(dataset.targets)) == [0, 1, 2]
    sample = dataset[5]
    assert sample.image.shape == (3, 112, 112) and sample.label == 1
    assert torch.all(sample.mask == 1) and not sample.occluded
    assert sample.image.min() >= 0 and sample.image.max() <= 1 and sample.clean.numel() == 0
    only = ImageFolderDataset(face_folder, identities=["carol", "bob"])
    assert only.identities == ["bob", "carol"]


def test_data_is_rgb_in_unit_range():
    """Data never normalises: every image reaches the model as RGB in [0, 1]."""
    image = np.zeros((2, 2, 3), np.uint8)
    image[..., 0] = 255  # pure red
    tensor = to_tensor(image)
    assert torch.all(tensor[0] == 1) and torch.all(tensor[1:] == 0)
    assert np.array_equal(to_image(tensor), image)


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "person").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        ImageFolderDataset(tmp_path / "empty")


def test_corrupt_images_are_all_listed_at_open(face_folder):
    (face_folder / "bob" / "0001.png").write_bytes(b"not a png")
    (face_folder / "carol" / "0003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataProblems) as error:
        ImageFolderDataset(face_folder)
    assert len(error.value.problems) == 2
    assert "bob/0001.png: unreadable or corrupt image" in str(error.value)
    assert "carol/0003.png" in str(error.value)


# ---------------------------------------------------------------- RecordIO, written here byte by byte
MAGIC = 0xCED7230A


def record(payload: bytes) -> bytes:
    pad = (4 - len(payload) % 4) % 4
    return struct.pack("<II", MAGIC, len(payload)) + payload + b"\0" * pad


def image_payload(label, image: bytes) -> bytes:
    if isinstance(label, (list, tuple)):
        return struct.pack("<IfQQ", len(label), 0.0, 0, 0) + struct.pack(f"<{len(label)}f", *label) + image
    return struct.pack("<IfQQ", 0, float(label), 0, 0) + image


def write_rec(path, payloads: dict[int, bytes]):
    offsets, blob = {}, b""
    for key, payload in payloads.items():
        offsets[key] = len(blob)
        blob += record(payload)
    path.write_bytes(blob)
    path.with_suffix(".idx").write_text("".join(f"{k}\t{o}\n" for k, o in offsets.items()))


def faces(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(n)]


def test_insightface_recordio_with_header_and_identity_records(tmp_path):
    images = faces(5)
    labels = [0, 0, 1, 1, 1]
    payloads = {0: image_payload([6.0, 8.0], b"")}  # images at keys 1..5, identities at 6..7
    for key, (image, label) in enumerate(zip(images, labels), start=1):
        payloads[key] = image_payload(float(label), png_bytes(image))
    payloads[6] = image_payload([1.0, 3.0], b"")
    payloads[7] = image_payload([3.0, 6.0], b"")
    write_rec(tmp_path / "train.rec", payloads)
    dataset = RecordIODataset(tmp_path / "train.rec")
    assert len(dataset) == 5 and dataset.num_classes == 2
    assert dataset.targets == labels
    assert np.array_equal(dataset.read(3).image, images[3])
    assert dataset[4].label == 1 and dataset[4].image.shape == (3, 112, 112)


def test_recordio_without_header_and_with_vector_labels(tmp_path):
    images = faces(3, seed=1)
    payloads = {k: image_payload([float(label), 7.0], png_bytes(img)) for k, (img, label) in enumerate(zip(images, [10, 2, 10]))}
    write_rec(tmp_path / "data.rec", payloads)
    dataset = RecordIODataset(tmp_path / "data.rec")
    assert dataset.identities == ["2", "10"]  # numeric order
    assert dataset.targets == [1, 0, 1]
    assert np.array_equal(dataset.read(1).image, images[1])


def test_recordio_errors_name_the_file(tmp_path):
    write_rec(tmp_path / "train.rec", {0: image_payload(0.0, png_bytes(faces(1)[0])), 1: image_payload(0.0, b"junk")})
    dataset = RecordIODataset(tmp_path / "train.rec")
    with pytest.raises(DataError, match=r"train.rec: record 1: .*unreadable or corrupt image"):
        dataset.read(1)
    (tmp_path / "train.idx").write_text("0\t0\n1\t999999\n")
    with pytest.raises(DataError, match=r"train.idx:2: offset 999999 lies outside"):
        RecordIODataset(tmp_path / "train.rec")
    (tmp_path / "train.idx").write_text("0\t4\n")
    with pytest.raises(DataError, match="bad magic number"):
        RecordIODataset(tmp_path / "train.rec")
    with pytest.raises(DataError, match="missing.idx: file not found"):
        RecordIODataset(tmp_path / "train.rec", tmp_path / "missing.idx")


# ---------------------------------------------------------------- verification pairs
def test_insightface_bin(tmp_path):
    images = faces(40, seed=2)
    issame = [i % 2 == 0 for i in range(20)]
    with (tmp_path / "lfw.bin").open("wb") as handle:
        pickle.dump(([png_bytes(i) for i in images], issame), handle)
    pairs = read_bin(tmp_path / "lfw.bin")
    assert len(pairs) == 20 and pairs.issame.tolist() == issame
    assert pairs.pairs[3].tolist() == [6, 7] and pairs.folds.tolist() == [k for k in range(10) for _ in range(2)]
    dataset = ImageListDataset(pairs.images)
    assert torch.equal(dataset[7].image, to_tensor(images[7]))
    with (tmp_path / "bad.bin").open("wb") as handle:
        pickle.dump(([png_bytes(images[0])], [True, False]), handle)
    with pytest.raises(DataError, match="bad.bin: 1 images for 2 pairs"):
        read_bin(tmp_path / "bad.bin")


def test_lfw_style_pairs_txt_with_any_extension(tmp_path):
    root = tmp_path / "lfw"
    for name, count, ext in (("Ann_Lee", 2, "jpg"), ("Bo_Kim", 1, "png")):
        for number in range(1, count + 1):
            path = root / name / f"{name}_{number:04d}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(faces(1)[0]).save(path)
    (tmp_path / "pairs.txt").write_text("1 1\nAnn_Lee\t1\t2\nAnn_Lee\t2\tBo_Kim\t1\n")
    pairs = read_pairs_txt(tmp_path / "pairs.txt", root)
    assert pairs.issame.tolist() == [True, False]
    assert pairs.folds.tolist() == [0, 0]
    assert pairs.image_names == ["Ann_Lee/Ann_Lee_0001.jpg", "Ann_Lee/Ann_Lee_0002.jpg", "Bo_Kim/Bo_Kim_0001.png"]
    assert pairs.pairs.tolist() == [[0, 1], [1, 2]]
    (tmp_path / "broken.txt").write_text("Ann_Lee 1 3\nAnn_Lee 1\n")
    with pytest.raises(DataProblems) as error:
        read_pairs_txt(tmp_path / "broken.txt", root)
    assert "broken.txt:1:" in str(error.value) and "Ann_Lee_0003.*: image not found" in str(error.value)
    assert "broken.txt:2: expected 'name i j'" in str(error.value)


def test_nested_identity_folders(tmp_path):
    from occface.data.tools import check_data

    rng = np.random.default_rng(3)
    for person in ("001", "002"):
        for pose in ("frontal", "profile"):
            write_png(tmp_path / "cfp" / person / pose / "01.jpg".replace(".jpg", ".png"),
                      rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    (tmp_path / "cfp" / "Protocol").mkdir()
    (tmp_path / "cfp" / "Protocol" / "pairs.txt").write_text("1 2\n")
    assert len(ImageFolderDataset(tmp_path / "cfp", recursive=True)) == 4
    report = check_data(tmp_path / "cfp")
    assert report.summary == {"identities": 2, "images": 4} and not report.problems
