"""Pairs to evaluate: images of a dataset with occluders synthesised on them (deterministic per item),
and verification pairs over them by pair type (occluded-occluded, occluded-clean, clean-clean)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.datasets import FaceDataset, RawSample
from ..data.images import resize_image, resize_mask
from ..errors import InputError


class VariantDataset(FaceDataset):
    """Images of a base dataset, each optionally with a synthesised occluder (deterministic per
    item): ``variants`` are (base index, occlude) with occlude False, True (a random kind of the
    synthesizer's) or a kind name (e.g. "niqab"). A face counts as occluded when an occluder was
    synthesised on it, when its ground-truth mask has occluded pixels, or when its name is in
    ``occluded_names``."""

    def __init__(self, base: FaceDataset, variants: list[tuple[int, bool | str]], synthesizer=None, seed: int = 0,
                 names: list[str] | None = None, occluded_names: set[str] | None = None) -> None:
        if synthesizer is None and any(occlude for _, occlude in variants):
            raise ValueError("occluded variants need an OcclusionSynthesizer")
        super().__init__(base.input_size, seed=seed)
        self.base, self.variants, self.synthesizer = base, variants, synthesizer
        self.names, self.occluded_names = names, occluded_names or set()
        self.identities = base.identities
        self.targets = [base.targets[index] for index, _ in variants]
        self.occluded_flags = [bool(occlude) for _, occlude in variants]

    def read(self, item: int) -> RawSample:
        index, occlude = self.variants[item]
        raw = self.base.read(index)
        if not occlude:
            return raw
        image = resize_image(raw.image, self.input_size)
        size = self.input_size
        mask = np.ones((size, size), np.float32) if raw.mask is None else resize_mask(raw.mask, size, size)
        kind = occlude if isinstance(occlude, str) else None
        image, visibility, _ = self.synthesizer(image, np.random.default_rng((self.seed, item)), kind)
        return RawSample(image, mask * visibility, raw.label)

    def is_occluded(self, item: int, mask: torch.Tensor) -> bool:
        index, occlude = self.variants[item]
        listed = self.names is not None and self.names[index] in self.occluded_names
        return bool(occlude or listed or super().is_occluded(item, mask))


OCCLUDE_SIDES = {"none": (False, False), "probe": (False, True), "both": (True, True)}


@dataclass
class OcclusionPairs:
    """Verification pairs over a :class:`VariantDataset` (each image variant once); ``pairs``
    index it. The first face of a pair is the gallery side, the second the probe side: an
    occluder "on the probe" goes on the second face, as in the LFW-with-niqab protocol."""

    dataset: VariantDataset
    pairs: np.ndarray
    issame: np.ndarray
    types: np.ndarray  # the intended pair type; the evaluated type comes from the faces' flags
    folds: np.ndarray | None = None

    @classmethod
    def build(cls, base, synthesizer, pairs_per_type: int, seed: int = 0,
              types: tuple[str, ...] = ("occluded-occluded", "occluded-clean", "clean-clean")) -> "OcclusionPairs":
        """Pairs drawn from an identity dataset: half same-identity, half different-identity of each
        type (fixed seed)."""
        rng = np.random.default_rng((seed, 7))
        targets = np.asarray(base.targets)
        by_label = {label: np.flatnonzero(targets == label) for label in np.unique(targets[targets >= 0])}
        multi = [label for label, members in by_label.items() if len(members) >= 2]
        labels = list(by_label)
        if not multi or len(labels) < 2:
            raise InputError("pairs need an identity with two images and at least two identities")
        base_pairs, issame = [], []
        for k in range(pairs_per_type):
            if k % 2 == 0:
                base_pairs.append(rng.choice(by_label[multi[rng.integers(len(multi))]], size=2, replace=False))
            else:
                first, second = rng.choice(len(labels), size=2, replace=False)
                base_pairs.append((rng.choice(by_label[labels[first]]), rng.choice(by_label[labels[second]])))
            issame.append(k % 2 == 0)
        sides = {"occluded-occluded": "both", "occluded-clean": "probe", "clean-clean": "none"}
        return cls.from_pairs(base, np.asarray(base_pairs, np.int64), np.asarray(issame, bool), None,
                              [sides[t] for t in types], synthesizer, seed)

    @classmethod
    def from_pairs(cls, base, pairs: np.ndarray, issame: np.ndarray, folds: np.ndarray | None,
                   sides: list[str], synthesizer=None, seed: int = 0, names: list[str] | None = None,
                   occluded_names: set[str] | None = None) -> "OcclusionPairs":
        """The given pairs once per entry of ``sides`` ("none", "probe" or "both")."""
        variants: dict[tuple[int, bool], int] = {}
        all_pairs, all_same, all_types, all_folds = [], [], [], []
        kind = {"none": "clean-clean", "probe": "occluded-clean", "both": "occluded-occluded"}
        for side in sides:
            if side not in OCCLUDE_SIDES:
                raise ValueError(f"unknown occlusion side {side!r}; expected one of {sorted(OCCLUDE_SIDES)}")
            first, second = OCCLUDE_SIDES[side]
            for a, b in pairs:
                all_pairs.append([variants.setdefault((int(a), first), len(variants)),
                                  variants.setdefault((int(b), second), len(variants))])
            all_same.append(issame)
            all_types += [kind[side]] * len(pairs)
            if folds is not None:
                all_folds.append(folds)
        dataset = VariantDataset(base, list(variants), synthesizer, seed, names, occluded_names)
        return cls(dataset, np.asarray(all_pairs, np.int64).reshape(-1, 2), np.concatenate(all_same),
                   np.asarray(all_types), np.concatenate(all_folds) if folds is not None else None)
