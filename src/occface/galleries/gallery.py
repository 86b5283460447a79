"""A gallery of enrolled faces on disk (:mod:`occface.galleries.shards` gives the layout).

Only the embeddings are read whole (into the FAISS index, :mod:`occface.galleries.search`); the
maps and visibility of a query's shortlist are read from disk row by row. The same file (by
content) is enrolled once. A gallery refuses a model other than the one it was built with (the
sha256 of its weights).

Writers, in this process or another, take the gallery's lock (``G/.lock``, an exclusive
``flock``), read the manifest again, write a shard and commit the manifest; readers notice a new
``generation`` and load what changed (appended shards are added to the index, anything else
rebuilds it), so several server workers can share one gallery.
"""
from __future__ import annotations

import contextlib
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.errors import DataError
from ..data.images import file_sha256
from ..data.verification import ImageListDataset
from ..errors import InputError
from ..models.occface import WEIGHTS_FILE
from ..runtimes.onnx_model import FaceModel, load_face_model
from ..photos import FaceReader
from ..scoring import Features, extract_features, predicted_occluded
from .search import SearchIndex, SearchResult, search_features
from .shards import (ARRAYS, FORMAT, VERSION, Entry, NpyRows, model_fingerprint, new_face_id, now_utc, read_entries,
                     read_manifest, write_json_atomically, write_shard)

EXACT_UP_TO = 1_000_000
IVF_PROBES = 32


@dataclass
class EnrollSummary:
    added: int
    duplicates: int
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    entries: list[Entry] = field(default_factory=list)  # the faces added, with their ids


class Gallery:
    """An on-disk gallery (see the module's docstring). ``Gallery.create`` or ``Gallery.open``."""

    def __init__(self, path: Path, manifest: dict, model: FaceModel | None = None, runtime: str = "torch",
                 onnx_path: str | Path | None = None) -> None:
        self.path, self.manifest, self._model = path, manifest, model
        self._runtime, self._onnx_path = runtime, onnx_path
        self._index: SearchIndex | None = None
        self._arrays: list[dict] | None = None
        self._entries: list[Entry] | None = None
        self._guard = threading.RLock()

    # ------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: str | Path, model: FaceModel, model_dir: str | Path) -> "Gallery":
        path = Path(path)
        if (path / "manifest.json").is_file():
            raise InputError(f"{path}: a gallery exists here already")
        (path / "shards").mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "version": VERSION, "generation": 0,
                    "model": model_fingerprint(model, model_dir), "shards": []}
        write_json_atomically(manifest, path / "manifest.json")
        return cls(path, manifest, model)

    @classmethod
    def open(cls, path: str | Path, model: FaceModel | None = None, model_dir: str | Path | None = None,
             load_model: bool = True, runtime: str = "torch", onnx_path: str | Path | None = None) -> "Gallery":
        """Open a gallery; with ``model_dir`` check that it is the model the gallery was built with;
        with neither, load the model the gallery records (``load_model=False``: when first needed).
        ``runtime``, ``onnx_path``: how a model loaded here runs its network (:func:`load_face_model`)."""
        path = Path(path)
        manifest = read_manifest(path)
        recorded = manifest["model"]
        if model is None and (load_model or model_dir is not None):
            model_dir = model_dir or recorded["path"]
            model = load_face_model(model_dir, runtime, onnx_path)
        if model_dir is not None:
            found = file_sha256(Path(model_dir) / WEIGHTS_FILE)
            if found != recorded["weights_sha256"]:
                raise InputError(f"{path}: the gallery was built with the model at {recorded['path']} (weights sha256 "
                                 f"{recorded['weights_sha256'][:16]}...); {model_dir} is another model ({found[:16]}...): "
                                 "enrol again with this model into a new gallery")
        return cls(path, manifest, model, runtime, onnx_path)

    @property
    def model(self) -> FaceModel:
        if self._model is None:
            self._model = load_face_model(self.manifest["model"]["path"], self._runtime, self._onnx_path)
        return self._model

    @property
    def generation(self) -> int:
        return int(self.manifest.get("generation", 0))

    # ------------------------------------------------------------ contents
    def _shard_dir(self, name: str) -> Path:
        return self.path / "shards" / name

    def refresh(self) -> bool:
        """Load what another process committed since this one last looked; True when it changed."""
        with self._guard:
            on_disk = read_manifest(self.path)
            if on_disk.get("generation") == self.generation and on_disk["shards"] == self.manifest["shards"]:
                return False
            old = [s["name"] for s in self.manifest["shards"]]
            new = [s["name"] for s in on_disk["shards"]]
            appended = new[:len(old)] == old
            self.manifest = on_disk
            self._entries = None
            if appended and self._arrays is not None:
                self._arrays += [self._open_arrays(s["name"]) for s in on_disk["shards"][len(old):]]
                if self._index is not None:
                    self._index.add_shards(self._arrays[len(old):])
            else:
                self._close_arrays()
                self._index = None
            return True

    def entries(self) -> list[Entry]:
        """Every enrolled face, in index order."""
        with self._guard:
            if self._entries is None:
                self._entries = [e for shard in self.manifest["shards"] for e in read_entries(self._shard_dir(shard["name"]))]
            return self._entries

    def __len__(self) -> int:
        return sum(shard["count"] for shard in self.manifest["shards"])

    def identities(self) -> dict[str, int]:
        """{identity: enrolled faces}, sorted by identity."""
        counts: dict[str, int] = {}
        for entry in self.entries():
            counts[entry.identity] = counts.get(entry.identity, 0) + 1
        return dict(sorted(counts.items()))

    def stats(self) -> dict:
        """Faces, identities, shards, bytes on disk, the model it was built with, the index kind."""
        size = sum(f.stat().st_size for f in (self.path / "shards").rglob("*") if f.is_file())
        return {"faces": len(self), "identities": len(self.identities()), "shards": len(self.manifest["shards"]),
                "bytes_on_disk": size, "model": self.manifest["model"], "version": self.manifest["version"],
                "index": "exact inner product (IndexFlatIP)" if len(self) <= EXACT_UP_TO else "IVF (approximate)"}

    def _open_arrays(self, name: str) -> dict:
        return {key: NpyRows(self._shard_dir(name) / f"{key}.npy") for key in ARRAYS}

    def _close_arrays(self) -> None:
        for arrays in self._arrays or []:
            for rows in arrays.values():
                rows.close()
        self._arrays = None

    def _load_arrays(self) -> list[dict]:
        if self._arrays is None:
            self._arrays = [self._open_arrays(shard["name"]) for shard in self.manifest["shards"]]
        return self._arrays

    # ------------------------------------------------------------ writing
    @contextlib.contextmanager
    def writing(self):
        """The gallery's write lock (this process's threads and other processes), with the manifest
        read again inside it, so a write starts from every commit before it."""
        import fcntl

        with self._guard:
            with open(self.path / ".lock", "a+") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    self.refresh()
                    yield self
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def _commit(self, shards: list[dict], drop: list[str] = ()) -> None:
        appended = [s for s in shards if s not in self.manifest["shards"]]
        is_append = shards[:len(self.manifest["shards"])] == self.manifest["shards"]
        self.manifest = {**self.manifest, "version": VERSION, "generation": self.generation + 1, "shards": shards}
        write_json_atomically(self.manifest, self.path / "manifest.json")
        for name in drop:
            shutil.rmtree(self._shard_dir(name), ignore_errors=True)
        self._entries = None
        if is_append and self._arrays is not None:
            opened = [self._open_arrays(s["name"]) for s in appended]
            self._arrays += opened
            if self._index is not None:
                self._index.add_shards(opened)
        else:
            self._close_arrays()
            self._index = None
        self._clean_orphans()

    def _clean_orphans(self) -> None:
        """Shard folders no manifest names: what a killed write left."""
        known = {shard["name"] for shard in self.manifest["shards"]}
        for folder in (self.path / "shards").iterdir():
            if folder.name not in known:
                shutil.rmtree(folder, ignore_errors=True)

    def enroll(self, items: list[tuple[str | Path, str]], reader: FaceReader | None = None, batch_size: int = 64,
               precision: str = "fp32", progress: bool = False, after_commit=None) -> EnrollSummary:
        """Add faces: ``items`` (source image, identity). A file already in the gallery (by content)
        is skipped; a file without a usable face is listed in ``failed`` and skipped.
        ``after_commit(entries)``: see :meth:`add`."""
        started = time.perf_counter()
        reader = reader or FaceReader(self.model.config.input_size)
        known = {entry.sha256 for entry in self.entries()}
        entries, faces, failed, duplicates = [], [], [], 0
        for source, identity in items:
            digest = file_sha256(source)
            if digest in known:
                duplicates += 1
                continue
            try:
                face, alignment = reader.read(source)
            except DataError as error:
                failed.append(str(error))
                continue
            known.add(digest)
            faces.append(face)
            landmarks = "aligned" if alignment is None else f"{alignment.landmark_source}/{alignment.points_used}"
            entries.append(Entry(str(identity), str(source), digest, landmarks=landmarks))
        added = self.enroll_faces(faces, entries, batch_size, precision, progress, after_commit=after_commit) if entries else []
        return EnrollSummary(len(added), duplicates, failed, time.perf_counter() - started, added)

    def enroll_faces(self, faces: list[np.ndarray], entries: list[Entry], batch_size: int = 64,
                     precision: str = "fp32", progress: bool = False, before_commit=None,
                     after_commit=None) -> list[Entry]:
        """Add aligned faces (RGB uint8 [S, S, 3]) with their entries; each entry gets a new
        ``face_id``, its enrolment time and what the model saw (``occluded``, ``visible``).
        ``before_commit()`` and ``after_commit(entries)`` run under the gallery's lock just before
        and after the commit (:meth:`add`). Returns the entries as stored."""
        dataset = ImageListDataset(faces, input_size=self.model.config.input_size)
        features = extract_features(self.model, dataset, batch_size, precision=precision, progress=progress)
        rule = self.model.config.calibration.get("normalization") or None
        occluded = predicted_occluded(features.occlusion, rule)
        stamp = now_utc()
        for entry, hidden, visibility in zip(entries, occluded, features.occlusion.flatten(1).mean(1).tolist()):
            entry.face_id = entry.face_id or new_face_id()
            entry.enrolled_at = entry.enrolled_at or stamp
            entry.occluded, entry.visible = int(hidden), round(float(visibility), 4)
        self.add(entries, features, before_commit, after_commit)
        return entries

    def add(self, entries: list[Entry], features: Features, before_commit=None, after_commit=None) -> None:
        """Append faces already through the model (one shard, committed atomically). Under the
        gallery's lock, ``before_commit()`` runs just before the commit (raising there writes
        nothing) and ``after_commit(entries)`` just after it (a database's rows: written after the
        shard, so a crash between the two leaves faces without rows, which reconciling adds)."""
        if len(entries) != len(features.embedding):
            raise ValueError(f"{len(entries)} entries for {len(features.embedding)} faces")
        for entry in entries:
            entry.face_id = entry.face_id or new_face_id()
        with self.writing():
            shard = write_shard(self.path / "shards", entries, features.embedding.numpy(), features.feature_map.numpy(),
                                features.occlusion.numpy())
            try:
                if before_commit is not None:
                    before_commit()
            except BaseException:
                shutil.rmtree(self._shard_dir(shard["name"]), ignore_errors=True)
                raise
            self._commit([*self.manifest["shards"], shard])
            if after_commit is not None:
                after_commit(entries)

    def remove(self, identity: str) -> int:
        """Remove every face of ``identity``; returns how many. Shards holding it are rewritten."""
        return len(self.remove_where(lambda entry: entry.identity == identity, f"identity {identity!r}"))

    def remove_where(self, chosen, what: str = "the chosen faces", after_commit=None) -> list[Entry]:
        """Remove every face whose entry ``chosen(entry)`` is true; returns their entries. Shards
        holding one are rewritten, and the manifest committed once; ``after_commit(removed)`` runs
        under the lock after the commit."""
        with self.writing():
            kept_shards, dropped, removed = [], [], []
            for shard, arrays in zip(self.manifest["shards"], self._load_arrays()):
                entries = read_entries(self._shard_dir(shard["name"]))
                keep = [i for i, e in enumerate(entries) if not chosen(e)]
                if len(keep) == len(entries):
                    kept_shards.append(shard)
                    continue
                removed += [e for e in entries if chosen(e)]
                dropped.append(shard["name"])
                if keep:
                    data = [arrays[k].read()[keep] for k in ARRAYS]
                    kept_shards.append(write_shard(self.path / "shards", [entries[i] for i in keep], *data))
            if not removed:
                raise InputError(f"{self.path}: no faces of {what} in the gallery")
            self._close_arrays()
            self._commit(kept_shards, dropped)
            if after_commit is not None:
                after_commit(removed)
        return removed

    # ------------------------------------------------------------ search
    def index(self) -> SearchIndex:
        """The FAISS index of every enrolled embedding (built on first use)."""
        with self._guard:
            if self._index is None:
                arrays = self._load_arrays()
                if not arrays:
                    raise InputError(f"{self.path}: the gallery is empty (enrol faces first)")
                self._index = SearchIndex.build(arrays, EXACT_UP_TO, IVF_PROBES)
            return self._index

    def _read(self, indices: np.ndarray, key: str) -> list[np.ndarray]:
        """Row ``key`` ("embeddings", "maps" or "visibility") of each global row, from the shards."""
        arrays = self._load_arrays()
        starts = np.cumsum([0] + [shard["count"] for shard in self.manifest["shards"]])
        shards = np.searchsorted(starts, indices, side="right") - 1
        return [arrays[int(shard)][key].row(int(row) - starts[shard]) for row, shard in zip(indices, shards)]

    def rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Entry]]:
        """Feature maps [K, C, H, W] and visibility [K, 1, H, W] (float32) and entries of global rows."""
        with self._guard:
            entries = self.entries()
            return (np.asarray(self._read(indices, "maps"), np.float32),
                    np.asarray(self._read(indices, "visibility"), np.float32), [entries[i] for i in indices])

    def embeddings(self, indices: np.ndarray) -> np.ndarray:
        """Embeddings [K, E] (float32, unit norm) of global rows, read from the shards."""
        with self._guard:
            return np.asarray(self._read(indices, "embeddings"), np.float32).reshape(len(indices), -1)

    def search(self, queries: list[str | Path | np.ndarray], top: int = 10, shortlist: int = 100,
               reader: FaceReader | None = None, precision: str = "fp32") -> list[SearchResult]:
        """Rank the gallery's identities for each query (an image file, a photo, or an aligned RGB
        uint8 face [S, S, 3]): FAISS shortlist of ``shortlist`` faces by embedding, re-ranked by
        the calibrated fusion of embedding, QAConv and occlusion-weighted QAConv."""
        model = self.model
        reader = reader or FaceReader(model.config.input_size)
        faces = [q if isinstance(q, np.ndarray) else reader(q) for q in queries]
        dataset = ImageListDataset(faces, input_size=model.config.input_size)
        probe = extract_features(model, dataset, precision=precision)
        names = ["<array>" if isinstance(q, np.ndarray) else str(q) for q in queries]
        return self.search_features(probe, names, top, shortlist, precision)

    def search_features(self, probe: Features, names: list[str], top: int = 10, shortlist: int = 100,
                        precision: str = "fp32", only: set[str] | None = None) -> list[SearchResult]:
        """:meth:`search` for probes already through the model (``Features`` of N faces); ``only``:
        rank just these identities (a verification against an enrolled subject)."""
        with self._guard:
            self.refresh()
            return search_features(self, probe, names, top, shortlist, precision, only)


def features_of(faces: list[np.ndarray], model: FaceModel, precision: str = "fp32") -> Features:
    """The model's features of aligned faces (RGB uint8 [S, S, 3])."""
    dataset = ImageListDataset(faces, input_size=model.config.input_size)
    return extract_features(model, dataset, precision=precision)
