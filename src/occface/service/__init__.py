"""``occface serve``: face matching and search as an HTTP service.

    from occface.service import FaceService
    service = FaceService("runs/mine/model", gallery="staff.gallery")
    service.verify(first_photo, second_photo)["decision"]

Modules: ``core`` (FaceService: the operations, shared with the command line), ``images`` (uploads
within limits, overlays), ``database`` (subjects, faces, API keys through SQLAlchemy), ``app`` (the
FastAPI routes), ``server`` (settings, access rule, uvicorn), ``errors``; ``page/`` is the page at ``/``.
"""
from .core import FaceService
from .images import Limits

__all__ = ["FaceService", "Limits"]
