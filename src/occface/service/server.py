"""Running ``occface serve``: the settings, the loopback rule for servers without API keys, uvicorn.

Without API keys in the database the server listens on loopback only and says so; asked for another
address, it refuses to start. ``--workers N`` runs N processes (uvicorn's); each loads the model and
opens the gallery and database itself, and they share the gallery through its lock. Within a
process, requests compute one per CPU core at a time (each on one thread), the rest wait up to
their deadline.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
from dataclasses import dataclass

from ..errors import InputError
from .images import Limits

log = logging.getLogger("occface.service")
SETTINGS_VARIABLE = "OCCFACE_SERVE_SETTINGS"


@dataclass
class Settings:
    """Everything ``occface serve`` takes (the CLI's options)."""

    model: str
    gallery: str | None = None
    db: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    precision: str = "fp32"
    runtime: str = "torch"
    onnx: str | None = None
    landmarks: str = "auto"
    detector: str | None = None
    limits: Limits = dataclasses.field(default_factory=Limits)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        values = json.loads(text)
        values["limits"] = Limits(**values.get("limits", {}))
        return cls(**values)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def compute_slots(workers: int) -> int:
    """Requests computing at once in each of ``workers`` processes: the cores shared out."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def build_service(settings: Settings):
    """The FaceService of these settings, with one compute thread a request."""
    import cv2
    import torch

    from .core import FaceService

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    return FaceService(settings.model, settings.gallery, settings.db, settings.precision, settings.runtime,
                       settings.onnx, settings.landmarks, settings.detector, settings.limits,
                       workers=compute_slots(settings.workers))


def app_from_environment():
    """The app factory each uvicorn worker process calls (settings from the environment)."""
    from .app import create_app

    return create_app(build_service(Settings.from_json(os.environ[SETTINGS_VARIABLE])))


def check_access(settings: Settings, active_keys: int) -> str:
    """The line the server says about access, or an InputError when it must not start."""
    if active_keys:
        return f"{active_keys} API key(s) active: every /v1 request needs one"
    if not is_loopback(settings.host):
        raise InputError(f"--host {settings.host}: no API keys are set, so the server listens on loopback only; "
                         "add one with `occface serve keys add NAME --gallery G`, or leave --host at 127.0.0.1")
    return "no API keys set: listening on loopback only, open to this machine's users"


def serve(settings: Settings) -> None:
    """Start the server in the foreground (Ctrl-C stops it)."""
    import uvicorn

    from .app import create_app

    if settings.workers < 1:
        raise InputError(f"--workers must be 1 or more, got {settings.workers}")
    service = build_service(settings)
    keys = service.db.active_keys() if service.db is not None else 0
    print(f"occface serve: {check_access(settings, keys)}")
    print(f"occface serve: model {settings.model} ({service.model.config.arch}), precision {service.precision}"
          + (f", gallery {settings.gallery} ({len(service.gallery)} faces, database {service.db.describe()})"
             if service.gallery is not None else ", no gallery"))
    print(f"occface serve: http://{settings.host}:{settings.port}/ (page), /docs (API)")
    if settings.workers == 1:
        uvicorn.run(create_app(service), host=settings.host, port=settings.port, log_level="info", access_log=False)
        return
    del service  # each worker process builds its own
    os.environ[SETTINGS_VARIABLE] = settings.to_json()
    uvicorn.run("occface.service.server:app_from_environment", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_level="info", access_log=False)
