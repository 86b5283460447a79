"""Dataset tools behind ``occface synth``, ``occface check-data`` and ``occface show-data``."""
from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .datasets import FaceDataset, ImageFolderDataset, OcclusionDataset
from .errors import DataError, DataProblems
from .images import read_image, read_mask, resize_image, resize_mask, tile_grid
from .recordio import RecordIODataset
from .synth import DEFAULT_KINDS, OcclusionSynthesizer
from .verification import read_bin

LAYOUTS = ("occlusion-manifest", "occlusion-kept-faces", "recordio", "verification-bin", "image-folder")


def synthesize_dataset(faces: str | Path, out: str | Path, occluders: str | Path | None = None,
                       kinds: Sequence[str] = DEFAULT_KINDS, per_face: int = 1, seed: int = 0,
                       identities: Sequence[str] | None = None) -> tuple[Path, int, float]:
    """Composite occluders onto every face of an identity folder and write an occlusion dataset in
    the manifest layout: ``out/images/<identity>/<stem>_<k>.png``, ``out/masks/...`` (8-bit, 255 =
    visible) and ``out/manifest.csv`` (image, mask, identity, occluder). Returns (manifest path,
    images written, images per second)."""
    source = ImageFolderDataset(faces, identities=identities)
    synthesizer = OcclusionSynthesizer.from_directory(occluders, kinds)
    out = Path(out)
    rows = []
    start = time.perf_counter()
    for index, path in enumerate(source.paths):
        identity = source.identities[source.targets[index]]
        face = read_image(path)
        for k in range(per_face):
            rng = np.random.default_rng((seed, index, k))
            image, visibility, occluder = synthesizer(face, rng)
            image_rel = Path("images") / identity / f"{path.stem}_{k}.png"
            mask_rel = Path("masks") / identity / f"{path.stem}_{k}_mask.png"
            for rel in (image_rel, mask_rel):
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(out / image_rel, compress_level=1)
            Image.fromarray((visibility * 255).round().astype(np.uint8), "L").save(out / mask_rel, compress_level=1)
            rows.append((image_rel.as_posix(), mask_rel.as_posix(), identity, occluder))
    elapsed = time.perf_counter() - start
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "mask", "identity", "occluder"])
        writer.writerows(rows)
    return manifest, len(rows), len(rows) / max(elapsed, 1e-9)


def detect_layout(path: Path) -> str:
    """Which supported layout ``path`` is (see ``LAYOUTS``); DataError if none."""
    if path.is_file():
        if path.suffix == ".rec":
            return "recordio"
        if path.suffix == ".bin":
            return "verification-bin"
        raise DataError(f"{path}: not a dataset (expected a directory, a .rec or a .bin file)")
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    if (path / "manifest.csv").is_file():
        return "occlusion-manifest"
    if (path / "kept_faces").is_dir():
        return "occlusion-kept-faces"
    if (path / "train.rec").is_file():
        return "recordio"
    if any(p.is_dir() for p in path.iterdir()):
        return "image-folder"
    raise DataError(f"{path}: no supported dataset layout (image folder, occlusion manifest or kept_faces/masks, "
                    "RecordIO, .bin)")


def open_dataset(path: str | Path, **kwargs) -> FaceDataset:
    """Open any supported face dataset by its layout (validating it)."""
    path = Path(path)
    layout = detect_layout(path)
    if layout.startswith("occlusion"):
        return OcclusionDataset(path, **kwargs)
    if layout == "recordio":
        return RecordIODataset(path if path.is_file() else path / "train.rec", **kwargs)
    if layout == "image-folder":
        nested = any(q.is_dir() for p in path.iterdir() if p.is_dir() for q in p.iterdir())
        return ImageFolderDataset(path, recursive=nested, **kwargs)  # nested: e.g. CFP's frontal/, profile/
    raise DataError(f"{path}: a verification set, not a face dataset")


@dataclass
class DataReport:
    path: str
    layout: str = "unknown"
    summary: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.path}: {self.layout}"]
        out += [f"  {key}: {value}" for key, value in self.summary.items()]
        if self.problems:
            out.append(f"  {len(self.problems)} problem(s):")
            out += [f"    - {problem}" for problem in self.problems]
        else:
            out.append("  no problems found")
        return out


def check_data(path: str | Path, decode_limit: int | None = None) -> DataReport:
    """Validate a dataset of any supported layout and summarise it. Every problem found is listed
    in the report (never raised), each naming its file."""
    path = Path(path)
    report = DataReport(str(path))
    try:
        report.layout = detect_layout(path)
        if report.layout == "verification-bin":
            pairs = read_bin(path)
            report.summary = {"pairs": len(pairs), "same-identity pairs": int(pairs.issame.sum()),
                              "images": len(pairs.images)}
            sources = pairs.images
        else:
            dataset = open_dataset(path)
            report.summary = {"identities": dataset.num_classes, "images": len(dataset)}
            sources = None
            if isinstance(dataset, OcclusionDataset):
                masks = [m for m in dataset.mask_paths if m is not None]
                report.summary["masks"] = len(masks)
                report.summary["unlabelled images"] = sum(t < 0 for t in dataset.targets)
                if masks:
                    visibility = [float(read_mask(m).mean()) for m in masks]
                    report.summary["mean visibility (masked faces)"] = f"{np.mean(visibility):.3f}"
            if isinstance(dataset, RecordIODataset):
                limit = len(dataset) if decode_limit is None else min(decode_limit, len(dataset))
                for index in range(limit):
                    try:
                        dataset.read(index)
                    except DataError as error:
                        report.problems.append(str(error))
                report.summary["records decoded"] = limit
        if sources is not None:
            for number, blob in enumerate(sources[: decode_limit or len(sources)]):
                try:
                    read_image(blob)
                except DataError as error:
                    report.problems.append(f"{path}: image {number}: {error}")
    except DataProblems as error:
        report.problems += error.problems
    except DataError as error:
        report.problems.append(str(error))
    return report


def contact_sheet(path: str | Path, out: str | Path, count: int = 48, columns: int = 8, seed: int = 0) -> Path:
    """A PNG grid of ``count`` random faces from a dataset, each shown beside itself with its
    occluded area (mask < 0.5) tinted red and the mask's outline drawn, so a person can see in one
    look that masks and images line up."""
    dataset = open_dataset(path)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(dataset), size=min(count, len(dataset)), replace=False)
    tiles = []
    for index in sorted(picks):
        raw = dataset.read(int(index))
        image = resize_image(raw.image, 112)
        mask = np.ones((112, 112), np.float32) if raw.mask is None else resize_mask(raw.mask, 112, 112)
        overlay = image.astype(np.float32)
        hidden = (1.0 - mask)[:, :, None]
        overlay = overlay * (1 - 0.6 * hidden) + np.array([255, 0, 0], np.float32) * 0.6 * hidden
        edge = np.zeros_like(mask, bool)
        binary = mask >= 0.5
        edge[1:, :] |= binary[1:, :] != binary[:-1, :]
        edge[:, 1:] |= binary[:, 1:] != binary[:, :-1]
        overlay[edge] = (255, 255, 0)
        tiles.append(np.concatenate([image, overlay.clip(0, 255).astype(np.uint8)], axis=1))
    sheet = tile_grid(tiles, columns)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(out)
    return out
