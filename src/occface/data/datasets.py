"""Identity and occlusion datasets.

Every dataset yields :class:`FaceSample` items: the image ``[3, S, S]`` as RGB in [0, 1] (the model
applies its own input convention), the identity label (``-1`` where unknown), the ground-truth
visibility mask ``[1, S, S]`` at image resolution (all ones for a clean face) and whether the face
is occluded. Problems with the files are found when a dataset is opened (a validation pass) and
reported together, each naming its file.
"""
from __future__ import annotations

import abc
import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..models.backbone import INPUT_SIZES
from .errors import DataError, DataProblems
from .images import image_size, is_image_file, read_image, read_mask, resize_image, resize_mask, to_tensor
from .synth import without_occlusion

log = logging.getLogger(__name__)

# (image uint8 [H, W, 3], mask float32 [H, W], rng) -> (image, mask)
PairedTransform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


class FaceSample(NamedTuple):
    """image [3, S, S] float32 RGB in [0, 1]; label: identity index or -1; mask [1, S, S] in [0, 1]
    (1 = visible); occluded: whether any of the face is hidden; clean: the same face with the same
    augmentation but no synthesised occluder [3, S, S] (a distillation target), or an empty
    tensor [0] where the dataset was not asked for it; index: the sample's index in the dataset;
    view: with ``teacher_views``, which view of the stored face the clean face is (0 as stored,
    1 mirrored: what a cached teacher's targets are looked up by), else -1."""

    image: torch.Tensor
    label: int
    mask: torch.Tensor
    occluded: bool
    clean: torch.Tensor = torch.empty(0)
    index: int = -1
    view: int = -1


@dataclass(frozen=True)
class RawSample:
    """What a dataset reads before transforms: RGB uint8 [H, W, 3], mask float32 [H, W] or None."""

    image: np.ndarray
    mask: np.ndarray | None
    label: int


class FaceDataset(Dataset, abc.ABC):
    """Base class: reading, resizing, paired transforms and conversion to model input.

    Subclasses set ``identities`` (names), ``targets`` (label per index) and ``occluded_flags``
    (per index, whether the face has an occlusion mask) and implement :meth:`read`.
    Randomness in transforms comes from ``(seed, epoch, index)``, so a sample is reproducible
    whatever worker loads it; call :meth:`set_epoch` each epoch. With ``clean_targets`` each
    sample also carries the face without its synthesised occluder (:attr:`FaceSample.clean`);
    with ``teacher_views`` instead, which view of the stored face that is (:attr:`FaceSample.view`:
    the transforms may then only mirror the face besides synthesising occluders, so that a
    teacher's targets for each image and its mirror can be computed once and looked up).
    """

    identities: list[str]
    targets: list[int]
    occluded_flags: list[bool]

    def __init__(self, input_size: int = 112, transform: PairedTransform | None = None, seed: int = 0,
                 clean_targets: bool = False, teacher_views: bool = False) -> None:
        if input_size not in INPUT_SIZES:
            raise ValueError(f"input_size must be one of {INPUT_SIZES}, got {input_size!r}")
        self.input_size = input_size
        self.transform = transform
        self.seed = seed
        self.clean_targets = clean_targets
        self.teacher_views = teacher_views
        self.mirrors = True  # whether the transform may mirror faces (teacher_views: checked per sample)
        self.epoch = 0
        self._clean_transform: PairedTransform | None = None  # built on first use

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.targets)

    @abc.abstractmethod
    def read(self, index: int) -> RawSample:
        """Read sample ``index`` from disk (each dataset format implements this)."""

    def __getitem__(self, index: int) -> FaceSample:
        raw = self.read(index)
        source = resize_image(raw.image, self.input_size)
        source_mask = (np.ones(source.shape[:2], np.float32) if raw.mask is None
                       else resize_mask(raw.mask, self.input_size, self.input_size))
        image, mask, clean = source, source_mask, source
        needs_clean = self.clean_targets or (self.teacher_views and self.mirrors)
        if self.transform is not None:
            image, mask = self.transform(source, source_mask, np.random.default_rng((self.seed, self.epoch, index)))
            if needs_clean:  # the same random draws, the occluder left out
                if self._clean_transform is None:
                    self._clean_transform = without_occlusion(self.transform)
                clean, _ = self._clean_transform(source, source_mask, np.random.default_rng((self.seed, self.epoch, index)))
        mask_tensor = torch.from_numpy(np.array(mask, dtype=np.float32))[None]
        image_tensor = to_tensor(image)
        clean_tensor = torch.empty(0)
        if self.clean_targets:
            clean_tensor = image_tensor if clean is image else to_tensor(clean)
        view = self._view(clean, source, index) if self.teacher_views else -1
        return FaceSample(image_tensor, raw.label, mask_tensor, self.is_occluded(index, mask_tensor), clean_tensor,
                          index, view)

    def _view(self, clean: np.ndarray, source: np.ndarray, index: int) -> int:
        """0 when the clean face is the stored one, 1 when it is its mirror image; anything else is
        an error (a teacher cache cannot hold faces that other augmentations changed)."""
        if clean is source or np.array_equal(clean, source):
            return 0
        if np.array_equal(clean, source[:, ::-1]):
            return 1
        raise DataError(f"sample {index}: the augmentation changed the face beyond mirroring it; a cached teacher "
                        "needs data.crop, data.low_res and data.photometric at 0")

    def is_occluded(self, index: int, mask: torch.Tensor) -> bool:
        """Whether sample ``index`` counts as occluded: by default, when its mask hides pixels."""
        return bool((mask < 0.5).any())


def _identity_index(names: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    identities = sorted(set(names))
    return identities, {name: i for i, name in enumerate(identities)}


def _log_shared_names(per_dataset: Sequence[Sequence[str]]) -> None:
    """Say how many identity names two or more datasets share: they become one person each."""
    seen: set[str] = set()
    shared: set[str] = set()
    for names in per_dataset:
        unique = set(names)
        shared |= seen & unique
        seen |= unique
    if shared:
        log.info("%d identity names occur in more than one dataset and are merged into one person each "
                 "(e.g. %s)", len(shared), ", ".join(sorted(shared)[:3]))


class ImageFolderDataset(FaceDataset):
    """``<root>/<identity>/<image>``: one folder per identity; the class count is the number of
    identity folders that hold images. ``identities`` restricts to (and orders by) a given list;
    ``recursive`` also takes images in sub-folders of an identity (e.g. CFP's frontal/ and profile/)."""

    def __init__(self, root: str | Path, *, identities: Sequence[str] | None = None,
                 validate: bool = True, recursive: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a directory")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if identities is not None:
            wanted = set(identities)
            absent = sorted(wanted - {p.name for p in folders})
            if absent:
                raise DataError(f"{self.root}: no folder for identities {absent[:10]}")
            folders = [p for p in folders if p.name in wanted]
        self.paths: list[Path] = []
        labels: list[str] = []
        for folder in folders:
            candidates = folder.rglob("*") if recursive else folder.iterdir()
            files = sorted(p for p in candidates if p.is_file() and is_image_file(p))
            self.paths += files
            labels += [folder.name] * len(files)
        if not self.paths:
            raise DataError(f"{self.root}: no images found (expected <root>/<identity>/<image>)")
        self.identities, index = _identity_index(labels)
        self.targets = [index[name] for name in labels]
        self.occluded_flags = [False] * len(self.paths)
        if validate:
            problems = []
            for path in self.paths:
                try:
                    image_size(path)
                except DataError as error:
                    problems.append(str(error))
            if problems:
                raise DataProblems(str(self.root), problems)

    def read(self, index: int) -> RawSample:
        return RawSample(read_image(self.paths[index]), None, self.targets[index])


class OcclusionDataset(FaceDataset):
    """Faces with ground-truth visibility masks (255 = visible, 0 = occluded; binary or
    continuous; at image resolution), in either layout:

    * ``<root>/manifest.csv`` with columns ``image, mask, identity`` (paths relative to the
      manifest; ``mask`` may be empty for a clean face; ``identity`` may be empty: label -1);
    * ``<root>/kept_faces/NAME.ext`` with ``<root>/masks/NAME_mask.png`` (no identities).

    Opening validates every file: a missing mask, an unreadable image or mask, or a mask whose
    aspect ratio differs from its image's is a :class:`DataProblems` error listing all of them;
    a mask at another resolution with the same aspect is resized (with a warning).
    """

    def __init__(self, root: str | Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        entries, problems = read_occlusion_layout(self.root)
        resized = []
        for image_path, mask_path, _ in entries:
            try:
                width, height = image_size(image_path)
            except DataError as error:
                problems.append(str(error))
                continue
            if mask_path is None or not mask_path.is_file():
                continue  # clean face, or a missing mask already reported
            try:
                mask_width, mask_height = image_size(mask_path, "mask")
            except DataError as error:
                problems.append(str(error))
                continue
            if abs(mask_width / mask_height - width / height) > 0.01:
                problems.append(f"{mask_path}: mask is {mask_width}x{mask_height} but its image {image_path.name} "
                                f"is {width}x{height} (different aspect ratio)")
            elif (mask_width, mask_height) != (width, height):
                resized.append(str(mask_path))
        if problems:
            raise DataProblems(str(self.root), problems)
        if resized:
            log.warning("%s: %d mask(s) differ in resolution from their images and will be resized, e.g. %s",
                        self.root, len(resized), resized[0])
        self.image_paths = [e[0] for e in entries]
        self.mask_paths = [e[1] for e in entries]
        named = [e[2] for e in entries if e[2]]
        self.identities, index = _identity_index(named)
        self.targets = [index[e[2]] if e[2] else -1 for e in entries]
        self.occluded_flags = [e[1] is not None for e in entries]

    def read(self, index: int) -> RawSample:
        image = read_image(self.image_paths[index])
        mask_path = self.mask_paths[index]
        mask = None
        if mask_path is not None:
            mask = resize_mask(read_mask(mask_path), image.shape[1], image.shape[0])
        return RawSample(image, mask, self.targets[index])


def read_occlusion_layout(root: Path) -> tuple[list[tuple[Path, Path | None, str]], list[str]]:
    """List (image, mask or None, identity or "") entries of an occlusion dataset and the
    problems found in its listing (missing files). Raises :class:`DataError` for an unknown layout."""
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    manifest = root / "manifest.csv"
    entries: list[tuple[Path, Path | None, str]] = []
    problems: list[str] = []
    if manifest.is_file():
        with manifest.open(newline="") as handle:
            reader = csv.DictReader(handle)
            columns = set(reader.fieldnames or [])
            if not {"image", "mask"} <= columns:
                raise DataError(f"{manifest}: needs the columns image, mask[, identity]; found {sorted(columns)}")
            for line, row in enumerate(reader, start=2):
                if not row.get("image"):
                    problems.append(f"{manifest}:{line}: empty image path")
                    continue
                image = root / row["image"]
                mask = root / row["mask"] if row.get("mask") else None
                if not image.is_file():
                    problems.append(f"{image}: image listed in {manifest.name}:{line} not found")
                if mask is not None and not mask.is_file():
                    problems.append(f"{mask}: mask listed in {manifest.name}:{line} not found")
                entries.append((image, mask, (row.get("identity") or "").strip()))
    elif (root / "kept_faces").is_dir():
        masks_dir = root / "masks"
        for image in sorted(p for p in (root / "kept_faces").iterdir() if is_image_file(p)):
            mask = masks_dir / f"{image.stem}_mask.png"
            if not mask.is_file():
                problems.append(f"{image}: no mask (expected {mask})")
            entries.append((image, mask, ""))
    else:
        raise DataError(f"{root}: not an occlusion dataset (expected manifest.csv, or kept_faces/ with masks/)")
    if not entries and not problems:
        raise DataError(f"{root}: the occlusion dataset is empty")
    return entries, problems


class ConcatFaceDataset(FaceDataset):
    """Several face datasets as one. Identities are merged by name (e.g. real occluded faces from a
    manifest beside clean faces of the same people from an image folder); with ``namespaces`` (one
    name a dataset) each dataset's people stay its own, as ``<namespace>/<identity>``."""

    def __init__(self, datasets: Sequence[FaceDataset], namespaces: Sequence[str] | None = None) -> None:
        if not datasets:
            raise ValueError("ConcatFaceDataset needs at least one dataset")
        if namespaces is not None and len(set(namespaces)) != len(datasets):
            raise ValueError(f"ConcatFaceDataset needs one distinct namespace a dataset, got {list(namespaces)} "
                             f"for {len(datasets)} datasets")
        first = datasets[0]
        for other in datasets[1:]:
            if (other.input_size, other.clean_targets) != (first.input_size, first.clean_targets):
                raise ValueError("datasets to concatenate must share input_size and clean_targets")
        super().__init__(first.input_size, None, first.seed, first.clean_targets)
        self.datasets = list(datasets)
        prefixes = [f"{n}/" for n in namespaces] if namespaces is not None else [""] * len(datasets)
        per_dataset = [[prefix + name for name in d.identities] for d, prefix in zip(datasets, prefixes)]
        if namespaces is None:
            _log_shared_names(per_dataset)
        names = [named[t] for d, named in zip(datasets, per_dataset) for t in d.targets if t >= 0]
        self.identities, index = _identity_index(names)
        self.targets = [index[named[t]] if t >= 0 else -1 for d, named in zip(datasets, per_dataset) for t in d.targets]
        self.occluded_flags = [flag for d in datasets for flag in d.occluded_flags]
        self.offsets = np.cumsum([0] + [len(d) for d in datasets])

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        for dataset in self.datasets:
            dataset.set_epoch(epoch)

    def _locate(self, index: int) -> tuple[FaceDataset, int]:
        which = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.datasets[which], index - int(self.offsets[which])

    def read(self, index: int) -> RawSample:
        dataset, local = self._locate(index)
        raw = dataset.read(local)
        return RawSample(raw.image, raw.mask, self.targets[index])

    def __getitem__(self, index: int) -> FaceSample:
        dataset, local = self._locate(index)
        return dataset[local]._replace(label=self.targets[index], index=index)

    @property
    def teacher_views(self) -> bool:
        return all(d.teacher_views for d in getattr(self, "datasets", ()))

    @teacher_views.setter
    def teacher_views(self, value: bool) -> None:
        for dataset in getattr(self, "datasets", ()):
            dataset.teacher_views = value

    @property
    def mirrors(self) -> bool:
        return any(d.mirrors for d in getattr(self, "datasets", ()))

    @mirrors.setter
    def mirrors(self, value: bool) -> None:
        for dataset in getattr(self, "datasets", ()):
            dataset.mirrors = value
