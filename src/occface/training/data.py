"""What a run trains and validates on: the training dataset (occlusion synthesis, augmentation),
the identities held out for validation and the validation pairs drawn from them."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path


from ..config import Config, ConfigError, DataSection
from ..data import (ConcatFaceDataset, FaceDataset, ImageFolderDataset, OcclusionDataset,
                   OcclusionSynthesizer, ProceduralFaceDataset, ProceduralFaces, RecordIODataset, SynthesizeOcclusion,
                   adaface_augmentation)
from ..data.transforms import Compose
from ..evaluation.run import OcclusionPairs
from .teacher_cache import cache_fits


log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    """The training dataset, the held-out identities (if any), the validation pairs drawn from
    them, and the occlusion synthesizer both use."""

    train: FaceDataset
    holdout: FaceDataset | None
    validation: OcclusionPairs | None
    synthesizer: OcclusionSynthesizer


def build_data(config: Config) -> DataBundle:
    """Training dataset (with occlusion synthesis and AdaFace augmentation) and validation pairs."""
    data, train = config.data, config.train
    synthesizer = OcclusionSynthesizer.from_directory(data.occluders, data.occlusion_kinds)
    augment = adaface_augmentation(data.flip, data.crop, data.low_res, data.photometric)
    transform = Compose([SynthesizeOcclusion(synthesizer, data.occlusion_probability), augment])  # clean faces
    common = dict(input_size=config.model.input_size, seed=train.seed)
    cached = config.loss.distills and config.loss.teacher_cache
    if cached and (changing := cache_fits(data.crop, data.low_res, data.photometric)):
        raise ConfigError(f"loss.teacher_cache: {', '.join(changing)} change the clean faces the teacher sees; "
                          "set them to 0 or loss.teacher_cache=false")
    clean = dict(clean_targets=config.loss.distills and not cached, teacher_views=cached)
    holdout: FaceDataset | None = None
    if data.extra_val_identities and not (data.source == "folder" and data.extra_paths):
        raise ConfigError("data.extra_val_identities holds identities of data.extra_paths out of training; "
                          "it needs data.source=folder and data.extra_paths")
    if data.source == "procedural":
        faces = ProceduralFaces(data.procedural_identities, data.procedural_images, data.procedural_seed, config.model.input_size)
        split = data.procedural_identities - train.val_identities
        if split < 2:
            raise ConfigError(f"data.procedural_identities={data.procedural_identities} leaves {split} training identities")
        dataset: FaceDataset = ProceduralFaceDataset(faces, list(range(split)), transform=transform, **common, **clean)
        if train.val_identities:
            holdout = ProceduralFaceDataset(faces, list(range(split, data.procedural_identities)), **common)
    elif data.source == "folder":
        if data.path is None:
            raise ConfigError("data.source=folder needs data.path")
        names, held_out = data.identities, None
        if data.split_file:
            split = json.loads(Path(data.split_file).read_text())
            names, held_out = split["train"], split.get("test")
        if names is None:
            names = identity_names(data.path, data.recursive)
        if train.val_identities or held_out is None:
            names, held_out = hold_out_last(names, train.val_identities, f"{data.path}: train.val_identities")
        dataset = ImageFolderDataset(data.path, identities=names, transform=transform,
                                     recursive=data.recursive, **common, **clean)
        if held_out:
            holdout = ImageFolderDataset(data.path, identities=held_out, recursive=data.recursive, **common)
        if data.extra_paths:
            extra, extra_held = extra_folders(data, transform, common, clean)
            paths = [data.path, *data.extra_paths]
            if len({str(Path(p).resolve()) for p in paths}) < len(paths):
                raise ConfigError(f"data.path and data.extra_paths name a folder twice: {paths}")

            def concat(parts: list[tuple[FaceDataset, str]]) -> ConcatFaceDataset:  # (dataset, its folder)
                return ConcatFaceDataset([d for d, _ in parts], None if data.merge_identities else [p for _, p in parts])

            dataset = concat([(dataset, data.path), *zip(extra, data.extra_paths)])
            if extra_held:
                own = [(holdout, data.path)] if holdout is not None else []
                holdout = concat([*own, *zip(extra_held, data.extra_paths)])
    elif data.source == "recordio":
        if data.path is None:
            raise ConfigError("data.source=recordio needs data.path (the .rec file)")
        dataset = RecordIODataset(data.path, transform=transform, **common, **clean)
    elif data.source == "occlusion":
        if data.path is None:
            raise ConfigError("data.source=occlusion needs data.path")
        dataset = OcclusionDataset(data.path, transform=augment, **common, **clean)  # real masks: no synthesis
    else:
        raise ValueError(f"unknown data.source {data.source!r}; expected procedural, folder, recordio or occlusion")
    if data.extra_occlusion_path:
        extra = OcclusionDataset(data.extra_occlusion_path, transform=augment, **common, **clean)
        dataset = ConcatFaceDataset([dataset, extra])
    dataset.mirrors = data.flip > 0
    validation = None
    if holdout is not None and (both := sorted(set(dataset.identities) & set(holdout.identities))):
        raise ConfigError(f"{len(both)} validation identities also train ({', '.join(both[:3])}): same-named "
                          "identity folders are one person; data.merge_identities=false keeps folders apart")
    if holdout is not None:
        validation = OcclusionPairs.build(holdout, synthesizer, train.val_pairs, seed=train.seed + 1)
    return DataBundle(dataset, holdout, validation, synthesizer)


def identity_names(root: str | Path, recursive: bool) -> list[str]:
    """The identity folders of ``root`` that hold images, by name (folders of other files, such as
    CFP's Protocol/, are not identities)."""
    return sorted(ImageFolderDataset(root, validate=False, recursive=recursive).identities)


def hold_out_last(names: list[str], count: int, where: str) -> tuple[list[str], list[str]]:
    """Identity names -> (those that train, the last ``count`` held out for validation); at least
    one must train."""
    if not 0 <= count < len(names):
        raise ConfigError(f"{where}={count}: expected 0 or more, leaving at least one of the {len(names)} "
                          f"identities to train on")
    return names[:len(names) - count], names[len(names) - count:]


def extra_folders(data: DataSection, transform, common: dict, clean: dict) -> tuple[list[FaceDataset], list[FaceDataset]]:
    """``data.extra_paths`` as training datasets and, with ``data.extra_val_identities`` = N, the last N
    identity folders (by name) of each as validation datasets, held out of training."""
    train_sets, held_sets = [], []
    for path in data.extra_paths:
        names = None  # every identity folder
        if data.extra_val_identities:
            names, held = hold_out_last(identity_names(path, data.recursive), data.extra_val_identities,
                                        f"{path}: data.extra_val_identities")
            held_sets.append(ImageFolderDataset(path, identities=held, recursive=data.recursive, **common))
        train_sets.append(ImageFolderDataset(path, identities=names, transform=transform, recursive=data.recursive,
                                             **common, **clean))
    return train_sets, held_sets
