"""``FaceService``: face matching and search from photos, one object for the HTTP server and the
command line alike.

    service = FaceService("runs/mine/model", gallery="staff.gallery")    # SQLite in the gallery
    service.faces(photo)                          # every face: box, points, visibility, verdict
    service.verify(id_photo, gate_photo)          # scores, decision, the stratum and why
    service.enroll("ann", photo)                  # into the gallery and the database
    service.search(photo, top=5)                  # top identities, or "unknown"

Photos are RGB uint8 arrays (:func:`occface.service.images.decode_image` reads uploads); an image
of the model's input size is taken as an aligned face, anything else is detected and aligned
(:class:`occface.photos.FaceAligner`). Scores that decide are computed in fp32 by default: the
thresholds were calibrated in fp32, and bf16 moves a score by a few percent of its spread, so a
decision would depend on the CPU that served it (``precision="bf16"`` is a speed option that says
so in every answer).

Concurrency: at most ``workers`` requests compute at once (the rest wait, up to the request's
deadline, then get 503); writes to the gallery and the database take the gallery's lock.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ..data.images import file_sha256
from ..errors import InputError
from ..galleries import Entry, Gallery
from ..galleries.gallery import features_of
from ..match import match
from ..models.occface import WEIGHTS_FILE
from ..runtimes.onnx_model import load_face_model
from ..photos import AlignedFace, FaceAligner
from ..scoring import HIDDEN_BELOW, HIDDEN_SHARE, calibrated_fused, describe_fusion_weight, pair_kind
from ..scoring import predicted_occluded, source_scores
from .database import Database, database_url
from .errors import ServiceError, not_found, unprocessable
from .images import Limits, png_base64, visibility_overlay

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "bf16")


class Deadline:
    """The time a request must be answered by."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise ServiceError(504, "timeout", f"the request took longer than {self.seconds:g} s ({what}); "
                                               "nothing was written")


class FaceService:
    """The operations of ``occface serve`` (see the module's docstring).

    Args:
        model_dir: an occface model folder (``save_pretrained``), calibrated by training.
        gallery: a gallery folder (made on first use, for this model); None: no enrolment or search.
        db: a SQLAlchemy URL (default: SQLite in the gallery's folder).
        precision: ``fp32`` (the default: decisions as calibrated) or ``bf16``.
        runtime: the network in ``torch`` or in ONNX Runtime (``onnx``, the graph ``occface export`` wrote).
        onnx: the graph for ``runtime="onnx"`` (default: ``model_dir/model.onnx``).
        landmarks: how photos are aligned (:class:`occface.photos.FaceAligner`'s ``landmarks``).
        detector: the YuNet file (default: as :mod:`occface.photos.model_files` finds it).
        limits: per-request limits (:class:`occface.service.images.Limits`).
        workers: requests computing at once (the rest wait up to their deadline).
    """

    def __init__(self, model_dir: str | Path, gallery: str | Path | None = None, db: str | None = None,
                 precision: str = "fp32", runtime: str = "torch", onnx: str | Path | None = None,
                 landmarks: str = "auto", detector: str | Path | None = None, limits: Limits | None = None,
                 workers: int = 2) -> None:
        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.model_dir = Path(model_dir)
        self.model = load_face_model(self.model_dir, runtime, onnx)
        self.model_sha256 = file_sha256(self.model_dir / WEIGHTS_FILE)
        self.precision, self.runtime, self.limits = precision, runtime, limits or Limits()
        self.landmarks, self.detector = landmarks, detector
        self._aligner: FaceAligner | None = None
        self._aligner_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max(1, workers))
        self.gallery: Gallery | None = None
        self.db: Database | None = None
        self.started = time.time()
        calibration = self.model.config.calibration
        self.calibrated_precision = calibration.get("precision", "fp32")
        if precision != self.calibrated_precision:
            log.warning("decisions in %s with thresholds calibrated in %s: a score may land on the other side of a "
                        "threshold than it would in %s", precision, self.calibrated_precision, self.calibrated_precision)
        if gallery is not None or db is not None:
            self._open_storage(gallery, db)

    # ------------------------------------------------------------ set-up
    def _open_storage(self, gallery: str | Path | None, db: str | None) -> None:
        if gallery is None:
            raise InputError("--db needs --gallery: the faces' arrays live in the gallery's shards")
        path = Path(gallery)
        if (path / "manifest.json").is_file():
            self.gallery = Gallery.open(path, model=self.model, model_dir=self.model_dir)
        else:
            self.gallery = Gallery.create(path, self.model, self.model_dir)
        self.db = Database(database_url(db, path))
        with self.gallery.writing():
            result = self.db.reconcile(self.gallery.entries(), self.gallery.manifest["model"]["weights_sha256"])
        if result.added or result.removed:
            log.warning("database and gallery reconciled at start: %d rows added for faces in the shards, %d removed "
                        "for faces no longer there (%d empty subjects removed)", result.added, result.removed,
                        result.subjects_removed)

    @property
    def aligner(self) -> FaceAligner:
        with self._aligner_lock:
            if self._aligner is None:
                self._aligner = FaceAligner(self.detector, self.model.config.input_size, landmarks=self.landmarks)
            return self._aligner

    def slot(self, deadline: Deadline):
        """A compute slot for a request, or 503 when none frees up before its deadline."""
        service = self

        class _Slot:
            def __enter__(self):
                if not service._slots.acquire(timeout=max(0.0, deadline.left())):
                    raise ServiceError(503, "busy", f"every worker was busy for {deadline.seconds:g} s; try again",
                                       None)
                return self

            def __exit__(self, *exc):
                service._slots.release()
                return False

        return _Slot()

    def deadline(self) -> Deadline:
        """A request's deadline: ``limits.request_timeout`` seconds from now."""
        return Deadline(self.limits.request_timeout)

    # ------------------------------------------------------------ faces
    def _is_aligned(self, image: np.ndarray) -> bool:
        size = self.model.config.input_size
        return image.shape[:2] == (size, size)

    def _found(self, image: np.ndarray, field: str, all_faces: bool) -> list[AlignedFace | None]:
        """The faces of a photo (None for an image taken as aligned), largest first."""
        if self._is_aligned(image):
            return [None]
        result = self.aligner.align(image, all_faces=all_faces)
        if not result.faces:
            raise unprocessable("no_face", f"{field}: {result.reason}", field)
        if all_faces and result.found > self.limits.max_faces:
            raise unprocessable("too_many_faces", f"{field}: {result.found} faces, above the limit of "
                                                  f"{self.limits.max_faces} a photo", field)
        return result.faces

    def _rule(self) -> dict:
        normalization = self.model.config.calibration.get("normalization") or {}
        return {"hidden_below": normalization.get("hidden_below", HIDDEN_BELOW),
                "hidden_share": normalization.get("hidden_share", HIDDEN_SHARE)}

    def _visibility(self, occlusion: torch.Tensor, occluded: bool | None = None) -> dict:
        """What the model saw of one face: its map [1, h, w], the share hidden and the verdict
        (``occluded``: the verdict already reached for it, by the same rule)."""
        rule = self._rule()
        visible = occlusion[0].numpy()
        hidden = float((visible < rule["hidden_below"]).mean())
        if occluded is None:
            occluded = bool(predicted_occluded(occlusion[None], rule)[0])
        return {"map": np.round(visible, 3).tolist(), "mean": round(float(visible.mean()), 4),
                "hidden_share": round(hidden, 4), "occluded": bool(occluded),
                "rule": f"occluded when at least {rule['hidden_share']:.0%} of the map is below {rule['hidden_below']:g}"}

    def _report(self, crop: np.ndarray, alignment: AlignedFace | None, occlusion: torch.Tensor,
                embedding: torch.Tensor | None, overlay: bool, occluded: bool | None = None) -> dict:
        report: dict = {"aligned_input": alignment is None}
        if alignment is not None:
            report.update(box=[round(float(v), 1) for v in alignment.box], score=round(alignment.score, 4),
                          landmarks=np.round(alignment.landmarks, 2).tolist(),
                          landmark_source=alignment.landmark_source, points_used=alignment.points_used)
        visibility = self._visibility(occlusion, occluded)
        report["visibility"] = visibility
        report["occlusion"] = "occluded" if visibility["occluded"] else "clean"
        if embedding is not None:
            report["embedding"] = [round(float(v), 6) for v in embedding]
        if overlay:
            report["overlay_png"] = png_base64(visibility_overlay(crop, occlusion[0].numpy()))
            report["aligned_png"] = png_base64(crop)
        return report

    def faces(self, image: np.ndarray, *, embedding: bool = False, overlay: bool = False, field: str = "image",
              deadline: Deadline | None = None) -> dict:
        """Every face of a photo (up to the limit), each with its box, five points and their source,
        detection score, visibility map and verdict; the embedding and PNG overlays on request."""
        deadline = deadline or self.deadline()
        with self.slot(deadline):
            found = self._found(image, field, all_faces=True)
            crops = [image if a is None else a.image for a in found]
            features = features_of(crops, self.model, self.precision)
        reports = [self._report(crop, a, features.occlusion[i], features.embedding[i] if embedding else None, overlay)
                   for i, (crop, a) in enumerate(zip(crops, found))]
        return {"faces": reports, "count": len(reports), "precision": self.precision}

    # ------------------------------------------------------------ verification
    def _why(self, first: dict, second: dict, pair_type: str) -> str:
        def one(name: str, face: dict) -> str:
            v = face["visibility"]
            return f"{name}: {v['hidden_share']:.0%} of its map hidden ({'occluded' if v['occluded'] else 'clean'})"

        return f"{pair_type}: {one('first', first)}; {one('second', second)}; {first['visibility']['rule']}"

    def verify(self, first: np.ndarray, second: np.ndarray | None = None, subject: str | None = None,
               overlay: bool = False, deadline: Deadline | None = None) -> dict:
        """Two photos (or a photo and an enrolled ``subject``): every source's score, the fused
        score, the decision at the calibrated threshold, the stratum used and why."""
        deadline = deadline or self.deadline()
        if (second is None) == (subject is None):
            raise unprocessable("verify_needs_two", "verify takes a second photo or a subject, not both and not neither",
                                "second")
        with self.slot(deadline):
            [a] = self._found(first, "first", all_faces=False)[:1]
            crop_a = first if a is None else a.image
            if subject is not None:
                return self._verify_subject(crop_a, a, subject, overlay, deadline)
            [b] = self._found(second, "second", all_faces=False)[:1]
            crop_b = second if b is None else b.image
            return self._compare(crop_a, crop_b, (a, b), overlay, correspondences=False)

    def verify_faces(self, first: np.ndarray, second: np.ndarray,
                     alignments: tuple[AlignedFace | None, AlignedFace | None] = (None, None),
                     overlay: bool = False, correspondences: bool = False, deadline: Deadline | None = None) -> dict:
        """:meth:`verify` for two faces already found: aligned crops [size, size, 3] RGB uint8 with the
        alignment each came from (None: given aligned), as :class:`occface.photos.FaceReader` reads
        them (``occface match``). ``correspondences``: also the raw result of
        :func:`occface.match.match` under ``"match"`` (visibility maps, strongest location pairs; not
        JSON), for :func:`occface.match.draw_match`."""
        with self.slot(deadline or self.deadline()):
            return self._compare(first, second, alignments, overlay, correspondences)

    def _compare(self, crop_a: np.ndarray, crop_b: np.ndarray, alignments, overlay: bool, correspondences: bool) -> dict:
        result = match(self.model, crop_a, crop_b, precision=self.precision)
        occlusion = [torch.from_numpy(v)[None] for v in result["visibility"]]
        faces = [self._report(c, al, o, None, overlay, hidden)  # the verdicts that chose the pair type
                 for c, al, o, hidden in zip((crop_a, crop_b), alignments, occlusion, result["occluded"])]
        answer = self._decision(result["scores"], result["pair_type"], faces, None)
        if correspondences:
            answer["match"] = result
        return answer

    def _verify_subject(self, crop: np.ndarray, alignment: AlignedFace | None, subject: str, overlay: bool,
                        deadline: Deadline) -> dict:
        gallery = self._need_gallery()
        gallery.refresh()  # another worker process may have enrolled since
        rows = np.array([i for i, e in enumerate(gallery.entries()) if e.identity == subject], dtype=np.int64)
        if not len(rows):
            raise not_found("unknown_subject", f"subject {subject!r} is not enrolled", "subject")
        probe = features_of([crop], self.model, self.precision)
        maps, visibility, entries = gallery.rows(rows)
        maps_t, visibility_t = torch.from_numpy(maps), torch.from_numpy(visibility)
        embeddings = torch.from_numpy(gallery.embeddings(rows))
        scores = {k: v[0] for k, v in source_scores(self.model, probe, embeddings, maps_t, visibility_t,
                                                    self.precision).items()}
        fused = calibrated_fused(self.model, scores, probe.occlusion, visibility_t)
        if fused is not None:  # [G]: the probe against each of the subject's faces
            scores["fused"] = fused
        key = scores.get("fused", scores["embedding"])
        best = int(np.argmax(key))
        rule = self.model.config.calibration.get("normalization") or None
        kinds = pair_kind(predicted_occluded(probe.occlusion, rule), predicted_occluded(visibility_t[best:best + 1], rule))
        face = self._report(crop, alignment, probe.occlusion[0], None, overlay)
        enrolled = {"aligned_input": True, "face_id": entries[best].face_id, "source": entries[best].source,
                    "visibility": self._visibility(visibility_t[best])}
        enrolled["occlusion"] = "occluded" if enrolled["visibility"]["occluded"] else "clean"
        result = self._decision({k: float(v[best]) for k, v in scores.items()}, str(kinds[0]), [face, enrolled], subject)
        result["compared_faces"] = len(rows)
        return result

    def _decision(self, scores: dict, pair_type: str, faces: list[dict], subject: str | None) -> dict:
        calibration = self.model.config.calibration
        thresholds = {s: calibration[s]["threshold"] for s in scores if isinstance(calibration.get(s), dict)}
        decisions = {s: bool(scores[s] >= t) for s, t in thresholds.items()}
        primary = "fused" if "fused" in decisions else ("embedding" if "embedding" in decisions else None)
        decision = None
        if primary is not None:
            decision = {"same": decisions[primary], "source": primary, "threshold": round(thresholds[primary], 6),
                        "far": calibration[primary].get("far")}
        shares = calibration.get("fusion_weight")
        stratum = {"pair_type": pair_type, "why": self._why(faces[0], faces[1], pair_type)}
        if shares is not None:
            stratum["fusion"] = describe_fusion_weight(shares)
        return {"scores": {k: round(float(v), 6) for k, v in scores.items()}, "decision": decision,
                "decisions": decisions, "stratum": stratum, "faces": faces, "subject": subject,
                "precision": self.precision, "calibrated_in": self.calibrated_precision}

    # ------------------------------------------------------------ gallery
    def _need_gallery(self) -> Gallery:
        if self.gallery is None or self.db is None:
            raise ServiceError(409, "no_gallery", "this service runs without a gallery (start it with --gallery G)")
        return self.gallery

    def enroll(self, subject: str, image: np.ndarray, source: str = "upload", data: bytes | None = None,
               deadline: Deadline | None = None) -> dict:
        """Enrol the largest face of a photo as ``subject``; the same file (by sha256) once a subject."""
        gallery = self._need_gallery()
        deadline = deadline or self.deadline()
        subject = check_subject(subject)
        digest = file_digest(data if data is not None else image.tobytes())
        if (known := self.db.known_sha256(subject, digest)) is not None:
            return {"subject": subject, "face_id": known, "duplicate": True, "faces_found": None}
        with self.slot(deadline):
            found = self._found(image, "image", all_faces=True)
            alignment = found[0]
            crop = image if alignment is None else alignment.image
            landmarks = "aligned" if alignment is None else f"{alignment.landmark_source}/{alignment.points_used}"
            entry = Entry(subject, source[:1024], digest, landmarks=landmarks)
            deadline.check("before the write")
            stored = gallery.enroll_faces([crop], [entry], precision=self.precision,
                                          after_commit=lambda entries: self.db.add_faces(entries, self.model_sha256),
                                          before_commit=lambda: deadline.check("before the commit"))[0]
        return {"subject": subject, "face_id": stored.face_id, "duplicate": False, "faces_found": len(found),
                "occlusion": "occluded" if stored.occluded else "clean", "visible": stored.visible,
                "landmarks": stored.landmarks, "enrolled_at": stored.enrolled_at}

    def enroll_files(self, items: list[tuple[str | Path, str]], reader=None, precision: str | None = None,
                     progress: bool = False):
        """Enrol image files in bulk (``occface enroll``): ``items`` (path, subject); the gallery's
        rows and the database's are written as for :meth:`enroll`. Returns the EnrollSummary."""
        gallery = self._need_gallery()
        for _, subject in items:
            check_subject(str(subject))
        return gallery.enroll(items, reader, precision=precision or self.precision, progress=progress,
                              after_commit=lambda entries: self.db.add_faces(entries, self.model_sha256))

    def search(self, image: np.ndarray, top: int = 5, overlay: bool = False, deadline: Deadline | None = None) -> dict:
        """The gallery's best ``top`` identities for the largest face of a photo, or ``unknown``."""
        gallery = self._need_gallery()
        deadline = deadline or self.deadline()
        if not 1 <= top <= 100:
            raise unprocessable("bad_top", f"top must be between 1 and 100, got {top}", "top")
        with self.slot(deadline):
            [alignment] = self._found(image, "image", all_faces=False)[:1]
            crop = image if alignment is None else alignment.image
            probe = features_of([crop], self.model, self.precision)
            gallery.refresh()  # another worker process may have enrolled since
            if len(gallery) == 0:
                results = None
            else:
                results = gallery.search_features(probe, ["image"], top=top, precision=self.precision)[0]
        face = self._report(crop, alignment, probe.occlusion[0], None, overlay)
        if results is None:
            return {"decision": "unknown", "candidates": [], "ranked_by": None, "threshold": None, "face": face,
                    "gallery_faces": 0, "precision": self.precision}
        return {"decision": results.decision, "unknown": results.decision == "unknown",
                "candidates": [{"subject": c.identity, "face_id": c.face_id, "scores": {k: round(v, 6)
                                                                                         for k, v in c.scores.items()}}
                               for c in results.candidates],
                "ranked_by": results.ranked_by, "threshold": results.threshold, "calibration": results.calibration,
                "face": face, "gallery_faces": len(gallery), "precision": self.precision}

    def subjects(self, limit: int = 100, offset: int = 0) -> dict:
        """A page of the enrolled subjects (id, enrolment time, face count) and their total."""
        self._need_gallery()
        if not 1 <= limit <= 1000 or offset < 0:
            raise unprocessable("bad_page", "limit must be 1-1000 and offset 0 or more", "limit")
        total, page = self.db.subjects(limit, offset)
        return {"total": total, "limit": limit, "offset": offset, "subjects": page}

    def subject(self, subject: str) -> dict:
        """One subject and each of its faces' record (source, sha256, time, model, what the model saw)."""
        self._need_gallery()
        found = self.db.subject(check_subject(subject))
        if found is None:
            raise not_found("unknown_subject", f"subject {subject!r} is not enrolled", "subject")
        return found

    def delete_subject(self, subject: str, deadline: Deadline | None = None) -> dict:
        """Remove a subject and every face of theirs, from the shards and then the database."""
        gallery = self._need_gallery()
        subject = check_subject(subject)
        deadline = deadline or self.deadline()
        with self.slot(deadline):
            try:
                removed = gallery.remove_where(lambda e: e.identity == subject, f"subject {subject!r}",
                                               after_commit=lambda entries: self.db.remove_faces(
                                                   [e.face_id for e in entries]))
            except InputError as error:
                raise not_found("unknown_subject", f"subject {subject!r} is not enrolled", "subject") from error
        return {"subject": subject, "removed_faces": len(removed)}

    def info(self) -> dict:
        """The model, its calibration, precision and runtime, the limits, the gallery and database."""
        config, calibration = self.model.config, self.model.config.calibration
        info = {"model": {"path": str(self.model_dir), "arch": config.arch, "feature_level": config.feature_level,
                          "input_size": config.input_size, "weights_sha256": self.model_sha256},
                "calibration": {s: v for s, v in calibration.items() if isinstance(v, dict) and "threshold" in v},
                "precision": self.precision, "calibrated_in": self.calibrated_precision, "runtime": self.runtime,
                "limits": self.limits.as_dict(), "uptime_s": round(time.time() - self.started, 1)}
        if calibration.get("fusion_weight") is not None:
            info["fusion"] = describe_fusion_weight(calibration["fusion_weight"])
        info["search_calibration"] = "search" if isinstance(calibration.get("search"), dict) else "pairs"
        if self._aligner is not None:
            info["landmarks"] = self._aligner.landmark_source
        if self.gallery is not None:
            subjects, faces = self.db.counts()
            info["gallery"] = {"path": str(self.gallery.path), "faces": len(self.gallery), "subjects": subjects,
                               "database_faces": faces, "database": self.db.describe()}
        return info


def check_subject(subject: str) -> str:
    """A subject id: 1-256 printable characters without "/" (it is a URL path segment)."""
    if (not isinstance(subject, str) or not subject.strip() or len(subject) > 256 or not subject.isprintable()
            or "/" in subject):
        raise unprocessable("bad_subject", "a subject id is 1 to 256 printable characters without '/'", "subject")
    return subject.strip()


def file_digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
