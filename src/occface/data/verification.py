"""Verification pairs: InsightFace ``.bin`` files and LFW-style ``pairs.txt``."""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .datasets import FaceDataset, RawSample
from .errors import DataError
from .images import IMAGE_EXTENSIONS, read_image

ImageSource = Path | bytes | np.ndarray


@dataclass
class PairSet:
    """A verification protocol: unique images and the pairs between them.

    images: the sources (paths or encoded bytes), each listed once.
    pairs: int64 [N, 2] indices into ``images``.  issame: bool [N].
    folds: int64 [N] fold of each pair (the protocol's own, e.g. LFW's 10), or None.
    """

    name: str
    images: list[ImageSource]
    pairs: np.ndarray
    issame: np.ndarray
    folds: np.ndarray | None = None
    image_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.issame)


def read_bin(path: str | Path) -> PairSet:
    """InsightFace's ``.bin`` (``lfw.bin``, ``agedb_30.bin``, ``cfp_fp.bin``...): a pickle of
    ``(encoded images, issame list)`` with the images of pair i at 2i and 2i+1. The standard sets
    use 10 consecutive folds; they are assigned that way when the pair count divides by 10."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            blobs, issame = pickle.load(handle, encoding="bytes")
    except FileNotFoundError as error:
        raise DataError(f"{path}: file not found") from error
    except Exception as error:
        raise DataError(f"{path}: not an InsightFace verification .bin ({type(error).__name__}: {error})") from error
    issame = np.asarray(issame, dtype=bool)
    if len(blobs) != 2 * len(issame):
        raise DataError(f"{path}: {len(blobs)} images for {len(issame)} pairs (expected two per pair)")
    images = [bytes(b) if not isinstance(b, bytes) else b for b in blobs]
    pairs = np.arange(len(images), dtype=np.int64).reshape(-1, 2)
    folds = np.repeat(np.arange(10), len(issame) // 10) if len(issame) % 10 == 0 and len(issame) else None
    return PairSet(path.stem, images, pairs, issame, folds, [f"{path.name}#{i}" for i in range(len(images))])


def _find_image(root: Path, name: str, number: int) -> Path:
    stem = root / name / f"{name}_{number:04d}"
    for extension in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        candidate = stem.with_name(stem.name + extension)
        if candidate.is_file():
            return candidate
    raise DataError(f"{stem}.*: image not found (named by the pairs file)")


def read_pairs_txt(path: str | Path, root: str | Path) -> PairSet:
    """LFW-style ``pairs.txt``: an optional ``folds per_fold`` first line, then ``name i j`` for a
    same-person pair and ``name1 i name2 j`` for a different-person pair; images are
    ``<root>/<name>/<name>_<NNNN>.<any image extension>``. With the first line, fold k holds
    ``2 * per_fold`` consecutive pairs (LFW: 10 folds of 300 + 300)."""
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    header = None
    if lines and len(lines[0]) == 2 and all(t.isdigit() for t in lines[0]):
        header = (int(lines[0][0]), int(lines[0][1]))
        lines = lines[1:]
    index: dict[Path, int] = {}
    pairs, issame = [], []
    problems = []
    for number, tokens in enumerate(lines, start=2 if header else 1):
        try:
            if len(tokens) == 3:
                a, b, same = _find_image(root, tokens[0], int(tokens[1])), _find_image(root, tokens[0], int(tokens[2])), True
            elif len(tokens) == 4:
                a, b, same = _find_image(root, tokens[0], int(tokens[1])), _find_image(root, tokens[2], int(tokens[3])), False
            else:
                raise DataError(f"expected 'name i j' or 'name1 i name2 j', got {' '.join(tokens)!r}")
        except (DataError, ValueError) as error:
            problems.append(f"{path}:{number}: {error}")
            continue
        pairs.append((index.setdefault(a, len(index)), index.setdefault(b, len(index))))
        issame.append(same)
    if problems:
        from .errors import DataProblems

        raise DataProblems(str(path), problems)
    folds = None
    if header and header[0] * 2 * header[1] == len(pairs):
        folds = np.repeat(np.arange(header[0]), 2 * header[1])
    images = list(index)
    return PairSet(path.stem, images, np.asarray(pairs, np.int64).reshape(-1, 2), np.asarray(issame, bool), folds,
                   [str(p.relative_to(root)) for p in images])


class ImageListDataset(FaceDataset):
    """Plain images (paths, encoded bytes or decoded RGB uint8 arrays [H, W, 3]) with no labels, e.g.
    the unique images of a PairSet."""

    def __init__(self, images: list[ImageSource], **kwargs) -> None:
        super().__init__(**kwargs)
        self.images = images
        self.identities = []
        self.targets = [-1] * len(images)
        self.occluded_flags = [False] * len(images)

    def read(self, index: int) -> RawSample:
        image = self.images[index]
        return RawSample(image if isinstance(image, np.ndarray) else read_image(image), None, -1)
