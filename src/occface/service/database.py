"""The service's database (SQLAlchemy): subjects, their faces, and API keys.

SQLite in the gallery's folder by default (``G/occface.sqlite``: embedded, WAL journal, ``synchronous
= FULL`` so a committed write survives a killed process), PostgreSQL (or any SQLAlchemy URL) by
``--db``. The arrays of each face stay in the gallery's shards; a face's row holds its id (the
same as in the shard), its subject, source, sha256, enrolment time, the model's weights sha256 and
what the model saw (occluded, mean visibility, which landmarks aligned it).

Write order, so that rows and shards never disagree after a crash: an enrolment commits its shard
(the gallery's manifest) first and its rows second, both under the gallery's lock; a removal
commits the rewritten shards first and deletes the rows second. :meth:`Database.reconcile`, run at
start under the same lock, makes the rows match the shards: rows for faces a crash left without
them, and no rows for faces no longer in the gallery. A write is acknowledged only after both.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Boolean, Float, ForeignKey, String, create_engine, delete, event, func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from ..errors import InputError
from ..galleries.shards import Entry, now_utc

DEFAULT_FILE = "occface.sqlite"
KEY_PREFIX = "occ"


class Base(DeclarativeBase):
    pass


class Subject(Base):
    __tablename__ = "subjects"

    id: Mapped[str] = mapped_column(String(256), primary_key=True)
    created_at: Mapped[str] = mapped_column(String(32))


class Face(Base):
    __tablename__ = "faces"

    face_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject_id: Mapped[str] = mapped_column(ForeignKey("subjects.id", ondelete="CASCADE"), index=True)
    source: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    enrolled_at: Mapped[str] = mapped_column(String(32))
    model_sha256: Mapped[str] = mapped_column(String(64))
    occluded: Mapped[bool] = mapped_column(Boolean)
    visible: Mapped[float] = mapped_column(Float)
    landmarks: Mapped[str] = mapped_column(String(64))


class ApiKey(Base):
    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[str] = mapped_column(String(32))
    revoked_at: Mapped[str | None] = mapped_column(String(32), nullable=True)


@dataclass
class Reconciled:
    """What :meth:`Database.reconcile` changed: rows added for faces in the shards, rows removed
    for faces no longer there, subjects removed with no faces left."""

    added: int
    removed: int
    subjects_removed: int


def database_url(db: str | None, gallery: str | Path | None) -> str:
    """``db`` as given (a SQLAlchemy URL), else SQLite in the gallery's folder."""
    if db:
        return db
    if gallery is None:
        raise InputError("the service needs a database: --gallery G (SQLite in G) or --db URL")
    return f"sqlite:///{Path(gallery).resolve() / DEFAULT_FILE}"


class Database:
    """Subjects, faces and API keys behind a SQLAlchemy URL (see the module's docstring)."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine: Engine = create_engine(url, pool_pre_ping=True)
        except (SQLAlchemyError, ImportError, ValueError) as error:
            raise InputError(f"--db {_safe(url)}: cannot use this database URL ({_first_line(error)})") from error
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            Base.metadata.create_all(self.engine)
        except SQLAlchemyError as error:
            raise InputError(f"--db {_safe(url)}: cannot open the database ({_first_line(error)})") from error

    def describe(self) -> str:
        return f"{self.engine.dialect.name} ({_safe(self.url)})"

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # ------------------------------------------------------------ faces and subjects
    def add_faces(self, entries: list[Entry], model_sha256: str) -> None:
        """Rows for faces just committed to the gallery, and their subjects where new; one transaction.
        Linear in the faces, inserted in bulk (a 100k-face gallery's rows in seconds)."""
        first: dict[str, str] = {}
        for e in entries:  # each new subject's earliest enrolment
            when = e.enrolled_at or now_utc()
            first[e.identity] = min(first.get(e.identity, when), when)
        subjects = sorted(first)
        with self.session() as session, session.begin():
            known: set[str] = set()
            for start in range(0, len(subjects), 500):
                known.update(session.scalars(select(Subject.id).where(Subject.id.in_(subjects[start:start + 500]))))
            new = [{"id": s, "created_at": first[s]} for s in subjects if s not in known]
            if new:  # the subjects before the faces that refer to them
                session.execute(insert(Subject), new)
            if entries:
                session.execute(insert(Face), [_face_row(e, model_sha256) for e in entries])

    def remove_faces(self, face_ids: list[str]) -> None:
        """Delete the rows of faces removed from the gallery, and subjects left without faces."""
        with self.session() as session, session.begin():
            for start in range(0, len(face_ids), 500):
                session.execute(delete(Face).where(Face.face_id.in_(face_ids[start:start + 500])))
            session.execute(delete(Subject).where(~Subject.id.in_(select(Face.subject_id).distinct())))

    def subjects(self, limit: int = 100, offset: int = 0) -> tuple[int, list[dict]]:
        """(total, a page of subjects with their face counts), by id."""
        with self.session() as session:
            total = session.scalar(select(func.count()).select_from(Subject)) or 0
            rows = session.execute(select(Subject.id, Subject.created_at, func.count(Face.face_id))
                                   .join(Face, Face.subject_id == Subject.id, isouter=True)
                                   .group_by(Subject.id, Subject.created_at).order_by(Subject.id)
                                   .limit(limit).offset(offset)).all()
        return total, [{"id": r[0], "created_at": r[1], "faces": r[2]} for r in rows]

    def subject(self, subject_id: str) -> dict | None:
        """A subject and its faces, or None."""
        with self.session() as session:
            subject = session.get(Subject, subject_id)
            if subject is None:
                return None
            faces = session.scalars(select(Face).where(Face.subject_id == subject_id).order_by(Face.enrolled_at)).all()
        return {"id": subject.id, "created_at": subject.created_at, "faces": [_face_dict(f) for f in faces]}

    def known_sha256(self, subject_id: str, sha256: str) -> str | None:
        """The face id of this subject's face from the same file, if it was enrolled."""
        with self.session() as session:
            return session.scalar(select(Face.face_id).where(Face.subject_id == subject_id, Face.sha256 == sha256))

    def counts(self) -> tuple[int, int]:
        with self.session() as session:
            return (session.scalar(select(func.count()).select_from(Subject)) or 0,
                    session.scalar(select(func.count()).select_from(Face)) or 0)

    def reconcile(self, entries: list[Entry], model_sha256: str) -> Reconciled:
        """Make the rows match the gallery's ``entries`` (run under the gallery's lock)."""
        wanted = {e.face_id: e for e in entries}
        with self.session() as session:
            have = set(session.scalars(select(Face.face_id)))
        missing = [wanted[i] for i in wanted.keys() - have]
        extra = sorted(have - wanted.keys())
        if missing:
            self.add_faces(missing, model_sha256)
        with self.session() as session, session.begin():
            for start in range(0, len(extra), 500):
                session.execute(delete(Face).where(Face.face_id.in_(extra[start:start + 500])))
            empty = session.execute(delete(Subject).where(~Subject.id.in_(select(Face.subject_id).distinct())))
        return Reconciled(len(missing), len(extra), empty.rowcount or 0)

    # ------------------------------------------------------------ API keys
    def add_key(self, name: str) -> str:
        """A new API key named ``name``; returns the key itself (shown once: only its hash is kept)."""
        if not name or len(name) > 256:
            raise InputError("an API key needs a name of 1 to 256 characters")
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        with self.session() as session, session.begin():
            session.add(ApiKey(key_id=key_id, name=name, secret_sha256=_digest(secret), created_at=now_utc()))
        return f"{KEY_PREFIX}_{key_id}_{secret}"

    def keys(self) -> list[dict]:
        with self.session() as session:
            rows = session.scalars(select(ApiKey).order_by(ApiKey.created_at)).all()
        return [{"key_id": k.key_id, "name": k.name, "created_at": k.created_at, "revoked_at": k.revoked_at}
                for k in rows]

    def active_keys(self) -> int:
        with self.session() as session:
            return session.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.revoked_at.is_(None))) or 0

    def revoke_key(self, key: str) -> list[str]:
        """Revoke keys by id or name; returns the ids revoked (an InputError if none matches)."""
        with self.session() as session, session.begin():
            rows = session.scalars(select(ApiKey).where((ApiKey.key_id == key) | (ApiKey.name == key),
                                                        ApiKey.revoked_at.is_(None))).all()
            for row in rows:
                row.revoked_at = now_utc()
            revoked = [row.key_id for row in rows]
        if not revoked:
            raise InputError(f"no active API key with the id or name {key!r} (`occface serve keys list`)")
        return revoked

    def check_key(self, token: str) -> str | None:
        """The name of the active key ``token`` is, or None."""
        prefix, _, rest = token.partition("_")
        key_id, _, secret = rest.partition("_")
        if prefix != KEY_PREFIX or not key_id or not secret:
            return None
        with self.session() as session:
            row = session.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            return None
        return row.name if hmac.compare_digest(row.secret_sha256, _digest(secret)) else None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _face_row(entry: Entry, model_sha256: str) -> dict:
    return {"face_id": entry.face_id, "subject_id": entry.identity, "source": entry.source[:1024],
            "sha256": entry.sha256, "enrolled_at": entry.enrolled_at or now_utc(), "model_sha256": model_sha256,
            "occluded": bool(entry.occluded), "visible": float(entry.visible), "landmarks": entry.landmarks or ""}


def _face_dict(face: Face) -> dict:
    return {"face_id": face.face_id, "source": face.source, "sha256": face.sha256, "enrolled_at": face.enrolled_at,
            "model_sha256": face.model_sha256, "occluded": face.occluded, "visible": face.visible,
            "landmarks": face.landmarks}


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _safe(url: str) -> str:
    """A URL with its password hidden."""
    head, sep, tail = url.partition("://")
    if "@" in tail and ":" in tail.split("@", 1)[0]:
        user = tail.split("@", 1)[0].split(":", 1)[0]
        return f"{head}{sep}{user}:***@{tail.split('@', 1)[1]}"
    return url


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
