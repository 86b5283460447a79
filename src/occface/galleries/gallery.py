"""A gallery of enrolled faces on disk, and 1:N search: a FAISS shortlist on the embedding, re-ranked
by the model's calibrated fusion of the embedding with plain and occlusion-weighted QAConv
(:mod:`occface.scoring`).

Layout of a gallery folder ``G``::

    G/manifest.json          format, version, the model it was built with, its shards (name, count)
    G/shards/<name>/         embeddings.npy  float32 [n, E]   (unit norm, flip-and-norm fused)
                             maps.npy        float16 [n, C, H, W]   (QAConv's feature maps)
                             visibility.npy  float16 [n, 1, H, W]   (predicted visibility)
                             entries.csv     identity, source, sha256 of the source file

A write builds its shard under a temporary name, renames it into place and then replaces the
manifest atomically, so a killed write leaves the gallery as it was. Only the embeddings
are read whole (into the FAISS index); the maps and visibility of a query's shortlist are read from
disk row by row (:class:`NpyRows`). The same file (by content) is enrolled once. A gallery refuses a model other than the
one it was built with (the sha256 of its weights).

Index: exact inner product (``IndexFlatIP``) up to :data:`EXACT_UP_TO` faces; above, an inverted
file (``IVF<sqrt(4n)>,Flat``, 32 lists probed) trained on the gallery's embeddings.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .photos import FaceReader
from .data.errors import DataError, DataProblems
from .data.images import file_sha256
from .data.verification import ImageListDataset
from .errors import InputError
from .models.occface import WEIGHTS_FILE
from .onnx_model import FaceModel, load_face_model
from .scoring import Features, calibrated_fused, cpu_matcher, extract_features, matcher_dtype

FORMAT, VERSION = "occface-gallery", 1
EXACT_UP_TO = 1_000_000
IVF_PROBES = 32


def model_fingerprint(model: FaceModel, model_dir: str | Path) -> dict:
    """What a gallery records of its model: where it was, its shape, and its weights' sha256."""
    model_dir = Path(model_dir)
    config = model.config
    return {"path": str(model_dir.resolve()), "arch": config.arch, "feature_level": config.feature_level,
            "weights_sha256": file_sha256(model_dir / WEIGHTS_FILE)}


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


def _write_json_atomically(data: dict, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temporary.write_text(json.dumps(data, indent=2))
    os.replace(temporary, path)


@dataclass
class Entry:
    identity: str
    source: str
    sha256: str


@dataclass
class EnrollSummary:
    added: int
    duplicates: int
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Candidate:
    """One gallery identity for a query: its best-scoring entry and every source's score of it."""

    identity: str
    source: str
    scores: dict[str, float]


@dataclass
class SearchResult:
    query: str
    candidates: list[Candidate]     # best first, one per identity
    decision: str                   # the best identity, or "unknown" below the model's threshold
    ranked_by: str                  # "fused" for a calibrated model, else "embedding"
    threshold: float | None


class Gallery:
    """An on-disk gallery (see the module's docstring). ``Gallery.create`` or ``Gallery.open``."""

    def __init__(self, path: Path, manifest: dict, model: FaceModel | None = None, runtime: str = "torch",
                 onnx_path: str | Path | None = None) -> None:
        self.path, self.manifest, self._model = path, manifest, model
        self._runtime, self._onnx_path = runtime, onnx_path
        self._index = None
        self._arrays: list[dict] | None = None
        self._entries: list[Entry] | None = None

    # ------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: str | Path, model: FaceModel, model_dir: str | Path) -> "Gallery":
        path = Path(path)
        if (path / "manifest.json").is_file():
            raise InputError(f"{path}: a gallery exists here already")
        (path / "shards").mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "version": VERSION, "model": model_fingerprint(model, model_dir), "shards": []}
        _write_json_atomically(manifest, path / "manifest.json")
        return cls(path, manifest, model)

    @classmethod
    def open(cls, path: str | Path, model: FaceModel | None = None, model_dir: str | Path | None = None,
             load_model: bool = True, runtime: str = "torch", onnx_path: str | Path | None = None) -> "Gallery":
        """Open a gallery; with ``model_dir`` check that it is the model the gallery was built with;
        with neither, load the model the gallery records (``load_model=False``: when first needed).
        ``runtime``, ``onnx_path``: how a model loaded here runs its network (:func:`load_face_model`)."""
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise InputError(f"{path}: not a gallery (no manifest.json; `occface enroll` makes one)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise InputError(f"{manifest_path}: corrupt gallery manifest ({error})") from error
        if manifest.get("format") != FORMAT:
            raise InputError(f"{manifest_path}: not an occface gallery manifest")
        if manifest.get("version") != VERSION:
            raise InputError(f"{manifest_path}: gallery format version {manifest.get('version')}, this occface reads {VERSION}")
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

    # ------------------------------------------------------------ contents
    def _shard_dir(self, name: str) -> Path:
        return self.path / "shards" / name

    def _shard_entries(self, name: str) -> list[Entry]:
        with (self._shard_dir(name) / "entries.csv").open(newline="") as handle:
            return [Entry(**row) for row in csv.DictReader(handle)]

    def entries(self) -> list[Entry]:
        """Every enrolled face, in index order."""
        if self._entries is None:
            self._entries = [e for shard in self.manifest["shards"] for e in self._shard_entries(shard["name"])]
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
        size = sum(f.stat().st_size for f in (self.path / "shards").rglob("*") if f.is_file())
        return {"faces": len(self), "identities": len(self.identities()), "shards": len(self.manifest["shards"]),
                "bytes_on_disk": size, "model": self.manifest["model"],
                "index": "exact inner product (IndexFlatIP)" if len(self) <= EXACT_UP_TO else "IVF (approximate)"}

    def _close_arrays(self) -> None:
        for arrays in self._arrays or []:
            for rows in arrays.values():
                rows.close()
        self._arrays = None

    def _load_arrays(self) -> list[dict]:
        if self._arrays is None:
            self._arrays = [{name: NpyRows(self._shard_dir(shard["name"]) / f"{name}.npy")
                             for name in ("embeddings", "maps", "visibility")} for shard in self.manifest["shards"]]
        return self._arrays

    # ------------------------------------------------------------ writing
    def _commit(self, shards: list[dict], drop: list[str] = ()) -> None:
        self.manifest = {**self.manifest, "shards": shards}
        _write_json_atomically(self.manifest, self.path / "manifest.json")
        for name in drop:
            shutil.rmtree(self._shard_dir(name), ignore_errors=True)
        self._close_arrays()
        self._index, self._entries = None, None
        self._clean_orphans()

    def _clean_orphans(self) -> None:
        """Shard folders no manifest names: what a killed write left."""
        known = {shard["name"] for shard in self.manifest["shards"]}
        for folder in (self.path / "shards").iterdir():
            if folder.name not in known:
                shutil.rmtree(folder, ignore_errors=True)

    def _write_shard(self, entries: list[Entry], features: Features) -> dict:
        name = f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"
        temporary = self.path / "shards" / f".{name}.tmp"
        temporary.mkdir(parents=True)
        np.save(temporary / "embeddings.npy", features.embedding.numpy().astype(np.float32))
        np.save(temporary / "maps.npy", features.feature_map.numpy().astype(np.float16))
        np.save(temporary / "visibility.npy", features.occlusion.numpy().astype(np.float16))
        with (temporary / "entries.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["identity", "source", "sha256"])
            writer.writerows([e.identity, e.source, e.sha256] for e in entries)
        os.replace(temporary, self._shard_dir(name))
        return {"name": name, "count": len(entries)}

    def enroll(self, items: list[tuple[str | Path, str]], reader: FaceReader | None = None, batch_size: int = 64,
               precision: str = "auto", progress: bool = False) -> EnrollSummary:
        """Add faces: ``items`` (source image, identity). A file already in the gallery (by content)
        is skipped; a file without a usable face is listed in ``failed`` and skipped."""
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
                faces.append(reader(source))
            except DataError as error:
                failed.append(str(error))
                continue
            known.add(digest)
            entries.append(Entry(str(identity), str(source), digest))
        if entries:
            dataset = ImageListDataset(faces, input_size=self.model.config.input_size)
            self.add(entries, extract_features(self.model, dataset, batch_size, precision=precision, progress=progress))
        return EnrollSummary(len(entries), duplicates, failed, time.perf_counter() - started)

    def add(self, entries: list[Entry], features: Features) -> None:
        """Append faces already through the model (one shard, committed atomically)."""
        if len(entries) != len(features.embedding):
            raise ValueError(f"{len(entries)} entries for {len(features.embedding)} faces")
        self._commit([*self.manifest["shards"], self._write_shard(entries, features)])

    def remove(self, identity: str) -> int:
        """Remove every face of ``identity``; returns how many. Shards holding it are rewritten."""
        kept_shards, dropped, removed = [], [], 0
        for shard, arrays in zip(self.manifest["shards"], self._load_arrays()):
            entries = self._shard_entries(shard["name"])
            keep = [i for i, e in enumerate(entries) if e.identity != identity]
            if len(keep) == len(entries):
                kept_shards.append(shard)
                continue
            removed += len(entries) - len(keep)
            dropped.append(shard["name"])
            if keep:
                features = Features(*(torch.from_numpy(np.asarray(arrays[k].read()[keep], np.float32))
                                      for k in ("embeddings", "maps", "visibility")), torch.zeros(len(keep), dtype=torch.bool))
                kept_shards.append(self._write_shard([entries[i] for i in keep], features))
        if not removed:
            raise InputError(f"{self.path}: no faces of identity {identity!r} in the gallery")
        self._close_arrays()
        self._commit(kept_shards, dropped)
        return removed

    # ------------------------------------------------------------ search
    def index(self):
        """The FAISS index of every enrolled embedding (built on first use)."""
        import faiss

        if self._index is None:
            arrays = self._load_arrays()
            if not arrays:
                raise InputError(f"{self.path}: the gallery is empty (enrol faces first)")
            embeddings = np.ascontiguousarray(np.concatenate([a["embeddings"].read() for a in arrays]), dtype=np.float32)
            dimension = embeddings.shape[1]
            if len(embeddings) <= EXACT_UP_TO:
                index = faiss.IndexFlatIP(dimension)
            else:
                lists = int(4 * math.sqrt(len(embeddings)))
                index = faiss.index_factory(dimension, f"IVF{lists},Flat", faiss.METRIC_INNER_PRODUCT)
                sample = embeddings[np.random.default_rng(0).choice(len(embeddings), min(len(embeddings), 64 * lists),
                                                                    replace=False)]
                index.train(sample)
                index.nprobe = IVF_PROBES
            index.add(embeddings)
            self._index = index
        return self._index

    def _rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Entry]]:
        """Feature maps [K, C, H, W] and visibility [K, 1, H, W] (float32) and entries of global rows."""
        arrays, entries = self._load_arrays(), self.entries()
        starts = np.cumsum([0] + [shard["count"] for shard in self.manifest["shards"]])
        maps, visibility = [], []
        for row in indices:
            shard = int(np.searchsorted(starts, row, side="right") - 1)
            maps.append(arrays[shard]["maps"].row(row - starts[shard]))
            visibility.append(arrays[shard]["visibility"].row(row - starts[shard]))
        return (np.asarray(maps, np.float32), np.asarray(visibility, np.float32), [entries[i] for i in indices])

    def search(self, queries: list[str | Path | np.ndarray], top: int = 10, shortlist: int = 100,
               reader: FaceReader | None = None, precision: str = "auto") -> list[SearchResult]:
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
                        precision: str = "auto") -> list[SearchResult]:
        """:meth:`search` for probes already through the model (``Features`` of N faces)."""
        model = self.model
        similarities, neighbours = self.index().search(probe.embedding.numpy().astype(np.float32), min(shortlist, len(self)))
        qaconv = cpu_matcher(model)
        dtype = matcher_dtype(qaconv, probe.feature_map, precision)
        calibration = model.config.calibration
        results = []
        for q, name in enumerate(names):
            found = neighbours[q] >= 0
            rows, embedding = neighbours[q][found], similarities[q][found]
            maps, visibility, entries = self._rows(rows)
            maps_t, visibility_t = torch.from_numpy(maps), torch.from_numpy(visibility)
            plain = qaconv.score_all(probe.feature_map[q:q + 1], maps_t, dtype=dtype)[0].numpy()
            weighted = qaconv.score_all(probe.feature_map[q:q + 1], maps_t, probe.occlusion[q:q + 1], visibility_t,
                                        dtype=dtype)[0].numpy()
            fused = calibrated_fused(model, {"embedding": embedding, "qaconv": plain, "qaconv_weighted": weighted},
                                     probe.occlusion[q:q + 1], visibility_t)
            ranked_by = "fused" if fused is not None else "embedding"
            key = fused if fused is not None else embedding
            best: dict[str, Candidate] = {}
            for i in np.argsort(-key):
                entry = entries[i]
                if entry.identity not in best:
                    scores = {"embedding": float(embedding[i]), "qaconv": float(plain[i]),
                              "qaconv_weighted": float(weighted[i])}
                    if fused is not None:
                        scores["fused"] = float(fused[i])
                    best[entry.identity] = Candidate(entry.identity, entry.source, scores)
            candidates = list(best.values())[:top]
            stored = calibration.get(ranked_by)
            threshold = stored.get("threshold") if isinstance(stored, dict) else None
            decision = candidates[0].identity if candidates else "unknown"
            if candidates and threshold is not None and candidates[0].scores[ranked_by] < threshold:
                decision = "unknown"
            results.append(SearchResult(name, candidates, decision, ranked_by, threshold))
        return results


def enrollment_items(inputs: list[str | Path], identity: str | None = None) -> list[tuple[Path, str]]:
    """(image, identity) from command-line inputs: a folder of identity folders (``ann/1.jpg`` is
    ann's), a CSV with ``path,identity`` columns (paths relative to the CSV's folder), or, with
    ``identity`` given, single images and folders of that identity's images."""
    from .data.images import is_image_file

    items, problems = [], []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p)
                           and (identity is not None or p.parent != path))
            if not found:
                problems.append(f"{path}: no images in identity folders (expected {path}/<identity>/<image>)"
                                if identity is None else f"{path}: no images")
            items += [(p, identity or p.relative_to(path).parts[0]) for p in found]
        elif path.suffix.lower() == ".csv" and path.is_file():
            with path.open(newline="") as handle:
                reader = csv.DictReader(handle)
                if not reader.fieldnames or not {"path", "identity"} <= set(reader.fieldnames):
                    problems.append(f"{path}: a CSV of faces needs 'path' and 'identity' columns, has {reader.fieldnames}")
                    continue
                items += [(path.parent / row["path"], row["identity"]) for row in reader]
        elif path.is_file() and is_image_file(path):
            if identity is None:
                problems.append(f"{path}: a single image needs --identity NAME")
                continue
            items.append((path, identity))
        else:
            problems.append(f"{path}: not found, or not a folder, CSV or image")
    missing = [f"{p}: image not found" for p, _ in items if not Path(p).is_file()]
    if problems or missing:
        raise DataProblems("enrol inputs", problems + missing)
    return items
