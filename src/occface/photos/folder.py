"""``occface align IN OUT``: detect and align every photo under a folder, mirroring its tree.

Writes ``OUT/<same relative folder>/<stem>.png`` (``<stem>_<k>.png`` per face with ``all_faces``),
``OUT/landmarks.csv`` (source, face, output, score, the five points in the photo, the photo-to-crop
matrix, which network gave the points and whether all five or the eyes alone aligned the face) and
``OUT/failures.csv`` (source, reason). A face image is written atomically before its
row, so a killed run loses nothing; re-running skips every source already in either file.
"""
from __future__ import annotations

import csv
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.errors import DataError
from ..data.images import is_image_file, read_image
from ..errors import InputError
from .alignment import LANDMARK_MODES, FaceAligner, landmark_refiner
from .detection import find_detector, verify_detector

LANDMARK_COLUMNS = ["source", "face", "output", "score", *(f"{axis}{i}" for i in range(1, 6) for axis in "xy"),
                    "m00", "m01", "m02", "m10", "m11", "m12", "landmarks", "points"]
FAILURE_COLUMNS = ["source", "reason"]


@dataclass
class AlignSummary:
    photos: int          # photos under IN
    skipped: int         # already done by an earlier run
    aligned: int         # photos with at least one face written this run
    faces: int           # faces written this run
    failed: int          # photos listed in failures.csv this run
    seconds: float

    @property
    def photos_per_second(self) -> float:
        done = self.aligned + self.failed
        return done / self.seconds if self.seconds > 0 else 0.0


def _write_png(image: np.ndarray, path: Path) -> None:
    """Write an RGB image atomically (a temporary file renamed into place)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
    os.close(handle)
    try:
        Image.fromarray(image).save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _done_sources(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    with path.open(newline="") as handle:
        return {row["source"] for row in csv.DictReader(handle)}


def _upgrade_header(path: Path, columns: list[str]) -> None:
    """Rewrite (atomically) a CSV written by an earlier version with fewer columns: its rows keep
    their values, the new columns stay empty."""
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or rows[0] == columns:
        return
    if rows[0] != columns[:len(rows[0])]:
        raise InputError(f"{path}: its columns {rows[0]} are not occface align's; write into another folder")
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".csv.tmp")
    with os.fdopen(handle, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows(row + [""] * (len(columns) - len(row)) for row in rows[1:])
    os.replace(temporary, path)


class _Appender:
    """Appends rows to a CSV file (header first when new), flushed per row."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        new = not path.is_file() or path.stat().st_size == 0
        if not new:
            _upgrade_header(path, columns)
        self.handle = path.open("a", newline="")
        self.writer = csv.writer(self.handle)
        if new:
            self.writer.writerow(columns)
            self.handle.flush()

    def write(self, row: list) -> None:
        self.writer.writerow(row)
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


# One aligner per worker process (OpenCV's detector cannot be pickled).
_worker_aligner: FaceAligner | None = None


def _init_worker(detector: str | None, size: int, min_face: int, landmarks: str = "auto",
                 threads: int | None = 1) -> None:
    import cv2

    global _worker_aligner
    if threads is not None:
        cv2.setNumThreads(threads)
    _worker_aligner = FaceAligner(detector, size, min_face, landmarks=landmarks)


def _align_one(task: tuple[str, str, str, bool]) -> tuple[str, list[list] | None, str | None]:
    """(source, landmark rows, failure reason) for one photo; face images written here."""
    source, photo, out_stem, all_faces = task
    try:
        image = read_image(photo)
    except DataError as error:
        return source, None, str(error).removeprefix(f"{photo}: ")
    result = _worker_aligner.align(image, all_faces=all_faces)
    if not result.faces:
        return source, None, result.reason
    rows = []
    for k, face in enumerate(result.faces):
        output = f"{out_stem}_{k}.png" if all_faces else f"{out_stem}.png"
        _write_png(face.image, Path(output))
        rows.append([k, output, f"{face.detection.score:.4f}",
                     *(f"{v:.2f}" for v in face.landmarks.reshape(-1)),
                     *(f"{v:.6f}" for v in face.matrix.reshape(-1)), face.landmark_source, face.points_used])
    return source, rows, None


def list_photos(root: Path) -> list[Path]:
    """Image files under ``root`` (recursively, sorted; hidden files and ``root``'s outputs left out)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p)
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def align_folder(source: str | Path, out: str | Path, *, size: int = 112, workers: int = 1, all_faces: bool = False,
                 min_face: int = 0, detector: str | Path | None = None, landmarks: str = "auto",
                 progress: bool = True) -> AlignSummary:
    """Align every photo under ``source`` into ``out`` (see the module's docstring); ``landmarks`` as
    :class:`occface.photos.alignment.FaceAligner` takes it."""
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise InputError(f"{source}: not a folder of photos")
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise InputError(f"{out}: the output folder must not be inside the input folder {source}")
    photos = list_photos(source)
    if not photos:
        raise InputError(f"{source}: no image files ({', '.join(('.jpg', '.png', '...'))}) found")
    detector = str(find_detector(detector))  # a missing or wrong file is an error here, not in a worker
    verify_detector(Path(detector))
    if landmarks not in LANDMARK_MODES:
        raise InputError(f"landmarks must be one of {LANDMARK_MODES}, got {landmarks!r}")
    if landmark_refiner(landmarks) is None:  # the one warning when the files are missing, or the error for "mesh"
        landmarks = "yunet"
    out.mkdir(parents=True, exist_ok=True)
    done = _done_sources(out / "landmarks.csv") | _done_sources(out / "failures.csv")
    tasks = []
    for photo in photos:
        relative = photo.relative_to(source)
        if relative.as_posix() in done:
            continue
        tasks.append((relative.as_posix(), str(photo), str(out / relative.with_suffix("")), all_faces))
    landmark_rows = _Appender(out / "landmarks.csv", LANDMARK_COLUMNS)
    failure_rows = _Appender(out / "failures.csv", FAILURE_COLUMNS)
    aligned = faces = failed = 0
    started = time.perf_counter()
    bar = None
    if progress:
        from ..progress import progress_bar

        bar = progress_bar(total=len(tasks), desc="align", unit="photo", dynamic_ncols=True)
    try:
        for name, rows, reason in _results(tasks, detector, size, min_face, landmarks, workers):
            if rows is None:
                failure_rows.write([name, reason])
                failed += 1
            else:
                for row in rows:
                    row[1] = Path(row[1]).relative_to(out).as_posix()
                    landmark_rows.write([name, *row])
                aligned += 1
                faces += len(rows)
            if bar is not None:
                bar.update(1)
    finally:
        landmark_rows.close()
        failure_rows.close()
        if bar is not None:
            bar.close()
    return AlignSummary(len(photos), len(photos) - len(tasks), aligned, faces, failed, time.perf_counter() - started)


def _results(tasks: list, detector: str | None, size: int, min_face: int, landmarks: str,
             workers: int) -> Iterator[tuple]:
    if not tasks:
        return
    if workers <= 1:
        _init_worker(detector, size, min_face, landmarks, threads=None)
        yield from map(_align_one, tasks)
        return
    import multiprocessing

    # Spawned (not forked) workers: OpenCV's thread pools do not survive a fork safely.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(detector, size, min_face, landmarks)) as pool:
        yield from pool.map(_align_one, tasks, chunksize=4)
