"""A gallery's files: its manifest, and shards of arrays with one row a face.

Layout of a gallery folder ``G``::

    G/manifest.json          format, version, generation, the model it was built with, its shards (name, count)
    G/shards/<name>/         embeddings.npy  float32 [n, E]   (unit norm, flip-and-norm fused)
                             maps.npy        float16 [n, C, H, W]   (QAConv's feature maps)
                             visibility.npy  float16 [n, 1, H, W]   (predicted visibility)
                             entries.csv     one row a face: face_id, identity, source, sha256 of the
                                             source file, enrolled_at (UTC ISO 8601), occluded (0/1:
                                             the model saw it as partly hidden), visible (mean of its
                                             visibility map), landmarks (which points aligned it)

A shard is written under a temporary name and renamed into place; the manifest, replaced
atomically afterwards, is what makes it part of the gallery (a shard no manifest names is what a
killed write left, and is removed). ``generation`` counts the manifest's commits, so a process
sees that another one changed the gallery. Version 1 galleries (entries with identity, source and
sha256 only) are read as they are.
"""
from __future__ import annotations

import csv
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ..data.images import file_sha256
from ..errors import InputError
from ..models.occface import WEIGHTS_FILE

FORMAT, VERSION = "occface-gallery", 2
READABLE_VERSIONS = (1, 2)
ARRAYS = ("embeddings", "maps", "visibility")


def model_fingerprint(model, model_dir: str | Path) -> dict:
    """What a gallery records of its model: where it was, its shape, and its weights' sha256."""
    model_dir = Path(model_dir)
    config = model.config
    return {"path": str(model_dir.resolve()), "arch": config.arch, "feature_level": config.feature_level,
            "weights_sha256": file_sha256(model_dir / WEIGHTS_FILE)}


@dataclass
class Entry:
    """One enrolled face (a row of a shard's ``entries.csv``)."""

    identity: str
    source: str
    sha256: str
    face_id: str = ""
    enrolled_at: str = ""
    occluded: int = 0
    visible: float = 1.0
    landmarks: str = ""

    @classmethod
    def from_row(cls, row: dict) -> "Entry":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in row.items() if k in known and v not in (None, "")}
        entry = cls(**values)
        entry.occluded, entry.visible = int(entry.occluded), float(entry.visible)
        if not entry.face_id:  # a version 1 gallery: the same face always gets the same id
            entry.face_id = f"v1-{entry.sha256[:24]}"
        return entry


def new_face_id() -> str:
    return uuid.uuid4().hex


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class NpyRows:
    """Rows of an ``.npy`` file, read on demand with ``pread``. A search reads a hundred rows
    scattered over the shards; a memory map would keep every page it touched, and the large folios
    the kernel maps around each, resident in the searching process (at 1M faces, 50 queries: 3.9 GB
    of mapped file pages for 0.25 GB of rows). Read this way the rows stay in the page cache only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            self.shape, fortran, self.dtype = read_header(handle)
            self.offset = handle.tell()
        if fortran:
            raise InputError(f"{path}: a Fortran-ordered array; occface writes C order")
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._handle = open(path, "rb", buffering=0)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._handle.fileno(), 0, 0, os.POSIX_FADV_RANDOM)

    def __len__(self) -> int:
        return self.shape[0]

    def row(self, index: int) -> np.ndarray:
        """Row ``index`` [*shape[1:]] (a copy)."""
        start = self.offset + int(index) * self.row_bytes
        if hasattr(os, "pread"):
            data = os.pread(self._handle.fileno(), self.row_bytes, start)
        else:  # no pread (Windows): seek and read
            self._handle.seek(start)
            data = self._handle.read(self.row_bytes)
        if len(data) != self.row_bytes:
            raise InputError(f"{self.path}: truncated (row {index} of {self.shape[0]} cannot be read)")
        return np.frombuffer(data, self.dtype).reshape(self.shape[1:])

    def read(self) -> np.ndarray:
        """The whole array, read into memory."""
        return np.load(self.path)

    def close(self) -> None:
        self._handle.close()


def write_json_atomically(data: dict, path: Path) -> None:
    """Write JSON to a temporary file beside ``path``, flush it to disk, and rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(temporary, "w") as handle:
        handle.write(json.dumps(data, indent=2))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the OS allows opening a folder)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def read_manifest(path: Path) -> dict:
    """The manifest of the gallery at ``path`` (checked), or an InputError naming the problem."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{path}: not a gallery (no manifest.json; `occface enroll` makes one)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{manifest_path}: corrupt gallery manifest ({error})") from error
    if manifest.get("format") != FORMAT:
        raise InputError(f"{manifest_path}: not an occface gallery manifest")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise InputError(f"{manifest_path}: gallery format version {manifest.get('version')}, this occface reads "
                         f"{list(READABLE_VERSIONS)}")
    manifest.setdefault("generation", 0)
    return manifest


def read_entries(folder: Path) -> list[Entry]:
    with (folder / "entries.csv").open(newline="") as handle:
        return [Entry.from_row(row) for row in csv.DictReader(handle)]


def write_shard(shards: Path, entries: list[Entry], embeddings: np.ndarray, maps: np.ndarray,
                visibility: np.ndarray) -> dict:
    """A new shard under ``shards`` (written under a temporary name, flushed, renamed into place):
    ``{"name", "count"}`` for the manifest."""
    name = f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"
    temporary = shards / f".{name}.tmp"
    temporary.mkdir(parents=True)
    arrays = {"embeddings": embeddings.astype(np.float32), "maps": maps.astype(np.float16),
              "visibility": visibility.astype(np.float16)}
    for key, array in arrays.items():
        with open(temporary / f"{key}.npy", "wb") as handle:
            np.save(handle, array)
            handle.flush()
            os.fsync(handle.fileno())
    with (temporary / "entries.csv").open("w", newline="") as handle:
        columns = [f.name for f in fields(Entry)]
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(asdict(e) for e in entries)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, shards / name)
    _sync_folder(shards)
    return {"name": name, "count": len(entries)}
