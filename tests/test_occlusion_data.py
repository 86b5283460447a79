import csv
import logging

import numpy as np
import pytest
import torch

from conftest import write_png
from occface.data import DataError, DataProblems, OcclusionDataset, downsample_mask
from occface.data.transforms import ColorJitter, LowResolution, RandomCropPaste, RandomHorizontalFlip, adaface_augmentation


def face(seed=0, size=112):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def lower_half_hidden(size=112):
    mask = np.full((size, size), 255, np.uint8)
    mask[size // 2 :] = 0
    return mask


@pytest.fixture
def kept_faces(tmp_path):
    root = tmp_path / "niqab"
    for name in ("a", "b", "c"):
        write_png(root / "kept_faces" / f"{name}.jpg".replace(".jpg", ".png"), face())
        write_png(root / "masks" / f"{name}_mask.png", lower_half_hidden())
    return root


# ---------------------------------------------------------------- layouts
def test_kept_faces_layout(kept_faces):
    dataset = OcclusionDataset(kept_faces)
    assert len(dataset) == 3 and dataset.num_classes == 0 and dataset.targets == [-1, -1, -1]
    sample = dataset[0]
    assert sample.mask.shape == (1, 112, 112) and sample.occluded and sample.label == -1
    assert torch.all(sample.mask[0, :56] == 1) and torch.all(sample.mask[0, 56:] == 0)


def test_manifest_layout_with_identities_and_clean_rows(tmp_path):
    root = tmp_path / "real"
    write_png(root / "img" / "p1.png", face(1))
    write_png(root / "img" / "p2.png", face(2))
    write_png(root / "img" / "q1.png", face(3))
    write_png(root / "m" / "p1.png", lower_half_hidden())
    with (root / "manifest.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["image", "mask", "identity"], ["img/p1.png", "m/p1.png", "pat"],
                                      ["img/p2.png", "", "pat"], ["img/q1.png", "", "quinn"]])
    dataset = OcclusionDataset(root)
    assert dataset.identities == ["pat", "quinn"] and dataset.targets == [0, 0, 1]
    assert dataset.occluded_flags == [True, False, False]
    assert dataset[0].occluded and not dataset[1].occluded and torch.all(dataset[1].mask == 1)


def test_every_bad_input_is_listed_with_its_file(kept_faces):
    (kept_faces / "masks" / "a_mask.png").unlink()
    (kept_faces / "masks" / "b_mask.png").write_bytes(b"garbage")
    write_png(kept_faces / "masks" / "c_mask.png", np.zeros((112, 60), np.uint8))
    (kept_faces / "kept_faces" / "d.png").write_bytes(b"garbage")
    with pytest.raises(DataProblems) as error:
        OcclusionDataset(kept_faces)
    text = str(error.value)
    assert len(error.value.problems) == 5  # d.png is corrupt and has no mask either
    assert "a.png: no mask (expected" in text and "a_mask.png" in text and "d.png: no mask" in text
    assert "b_mask.png: unreadable or corrupt mask" in text
    assert "c_mask.png: mask is 60x112 but its image c.png is 112x112 (different aspect ratio)" in text
    assert "d.png: unreadable or corrupt image" in text


def test_mask_at_another_resolution_is_resized_with_a_warning(kept_faces, caplog):
    write_png(kept_faces / "masks" / "b_mask.png", lower_half_hidden(224))
    with caplog.at_level(logging.WARNING):
        dataset = OcclusionDataset(kept_faces)
    assert "1 mask(s) differ in resolution" in caplog.text
    assert dataset[1].mask.shape == (1, 112, 112)
    assert dataset[1].mask[0, :50].min() > 0.99 and dataset[1].mask[0, 60:].max() < 0.01


def test_missing_files_in_a_manifest_and_empty_folders(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    (root / "manifest.csv").write_text("image,mask,identity\nx.png,x_mask.png,p\n")
    with pytest.raises(DataProblems, match=r"x.png: image listed in manifest.csv:2 not found"):
        OcclusionDataset(root)
    (root / "manifest.csv").write_text("picture,identity\n")
    with pytest.raises(DataError, match="needs the columns image, mask"):
        OcclusionDataset(root)
    (tmp_path / "e" / "kept_faces").mkdir(parents=True)
    with pytest.raises(DataError, match="the occlusion dataset is empty"):
        OcclusionDataset(tmp_path / "e")
    with pytest.raises(DataError, match="not an occlusion dataset"):
        OcclusionDataset(tmp_path)


# ---------------------------------------------------------------- mask downsampling
def test_area_downsampling_gives_the_visible_fraction_of_each_cell():
    mask = torch.ones(2, 1, 112, 112)
    mask[:, :, 56:] = 0  # lower half hidden: rows 0-2 of 7 visible, row 3 half, rows 4-6 hidden
    mask[:, :, 48:56] = 1  # ...the boundary row 3 (pixels 48-63) is half visible
    small = downsample_mask(mask, 7)
    assert small.shape == (2, 1, 7, 7)
    assert torch.all(small[:, :, :3] == 1) and torch.all(small[:, :, 3] == 0.5) and torch.all(small[:, :, 4:] == 0)
    fine = downsample_mask(mask[0, 0], 14)
    assert fine.shape == (14, 14) and torch.all(fine[:7] == 1) and torch.all(fine[7:] == 0)


def test_bilinear_downsampling_and_bad_shapes():
    mask = torch.zeros(1, 112, 112)
    mask[:, :, :56] = 1  # left half visible
    small = downsample_mask(mask, 7, mode="bilinear")
    assert small.shape == (1, 7, 7)
    assert torch.all(small[0, :, :3] > 0.95) and torch.all(small[0, :, 4:] < 0.05) and 0.4 < small[0, 0, 3] < 0.6
    assert torch.equal(downsample_mask(torch.full((1, 1, 7, 7), 1.5), 7), torch.ones(1, 1, 7, 7))
    with pytest.raises(ValueError, match="masks must be"):
        downsample_mask(torch.ones(2, 3, 112, 112), 7)
    with pytest.raises(ValueError, match="mode"):
        downsample_mask(mask, 7, mode="nearest")


# ---------------------------------------------------------------- paired transforms
def test_flip_moves_image_and_mask_together():
    image, mask = face(), np.ones((112, 112), np.float32)
    mask[:, :30] = 0  # the left edge hidden
    image[:, :30] = 0
    rng = np.random.default_rng(0)
    flipped_image, flipped_mask = RandomHorizontalFlip(p=1.0)(image, mask, rng)
    assert np.all(flipped_mask[:, -30:] == 0) and np.all(flipped_mask[:, :-30] == 1)
    assert np.all(flipped_image[:, -30:] == 0)
    assert np.array_equal(flipped_image[:, ::-1], image)
    same_image, same_mask = RandomHorizontalFlip(p=0.0)(image, mask, rng)
    assert same_image is image and same_mask is mask


def test_flip_never_touches_one_without_the_other():
    transform = adaface_augmentation(flip=0.5, crop=0.0, low_res=0.0, photometric=0.0)
    image = face()
    mask = np.ones((112, 112), np.float32)
    mask[:, :20] = 0
    for seed in range(20):
        out_image, out_mask = transform(image, mask, np.random.default_rng(seed))
        flipped = bool(np.all(out_mask[:, -20:] == 0))
        assert np.array_equal(out_image, image[:, ::-1] if flipped else image)


def test_crop_paste_blacks_out_image_and_mask_outside_the_box():
    image, mask = np.full((112, 112, 3), 200, np.uint8), np.ones((112, 112), np.float32)
    out_image, out_mask = RandomCropPaste(p=1.0, scale=(0.3, 0.5))(image, mask, np.random.default_rng(3))
    kept = out_mask > 0
    assert 0.25 < kept.mean() < 0.55
    assert np.all(out_image[kept] == 200) and np.all(out_image[~kept] == 0)


def test_photometric_transforms_leave_the_mask_alone():
    image, mask = face(), np.random.default_rng(1).random((112, 112)).astype(np.float32)
    for transform in (LowResolution(p=1.0), ColorJitter(p=1.0)):
        out_image, out_mask = transform(image, mask, np.random.default_rng(0))
        assert out_mask is mask and out_image.shape == image.shape and out_image.dtype == np.uint8
        assert not np.array_equal(out_image, image)


def test_dataset_transforms_are_reproducible_per_epoch_and_index(kept_faces):
    dataset = OcclusionDataset(kept_faces, transform=adaface_augmentation(flip=0.5, crop=0.5, low_res=0.5, photometric=0.5))
    first, again = dataset[1], dataset[1]
    assert torch.equal(first.image, again.image) and torch.equal(first.mask, again.mask)
    outcomes = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        outcomes.add(dataset[1].image.sum().item())
    assert len(outcomes) > 1
