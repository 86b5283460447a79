"""The HTTP API of ``occface serve`` (FastAPI), over one :class:`~occface.service.core.FaceService`.

Every endpoint under ``/v1`` takes images as a multipart upload (field ``image``; ``first`` and
``second`` for verify) or as JSON with base64 strings in the same fields, and answers JSON. Errors
are one JSON line, ``{"error": {"status", "code", "message", "field"}}``, with the HTTP status:
400 malformed request, 401 missing or wrong API key, 404 unknown subject or route, 409 no gallery,
413 upload or image too large, 415 unsupported content type, 422 unusable input (not an image, no
face, ...), 503 every worker busy, 504 past the request's deadline; a 500 (a failure of occface
itself) carries no traceback, which goes to the server's log with the error's id.

With API keys in the database (``occface serve keys add NAME``) every ``/v1`` request needs one, as
``Authorization: Bearer KEY`` or ``X-API-Key: KEY``; ``/healthz``, the page at ``/`` and the
OpenAPI docs at ``/docs`` stay open.
"""
from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import InputError
from .core import FaceService
from .errors import ServiceError, bad_request
from .images import base64_bytes, decode_image

log = logging.getLogger("occface.service")
PAGE = Path(__file__).with_name("page")

_IMAGE = {"type": "string", "format": "binary"}
_B64 = {"type": "string", "description": "base64 image (a data: URL prefix is allowed)"}


def _body(fields: dict[str, dict], required: list[str], json_extra: dict | None = None) -> dict:
    """OpenAPI request bodies: the same fields as multipart uploads or as base64 JSON."""
    multipart = {"type": "object", "properties": fields, "required": required}
    as_json = {"type": "object", "properties": {k: (_B64 if v is _IMAGE else v) for k, v in fields.items()},
               "required": required}
    as_json["properties"].update(json_extra or {})
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": multipart},
                                                          "application/json": {"schema": as_json}}}}


class Payload:
    """A request's fields, from a multipart form or a JSON object, with images decoded lazily."""

    def __init__(self, fields: dict, files: dict[str, bytes], service: FaceService) -> None:
        self.fields, self.files, self.service = fields, files, service

    @classmethod
    async def read(cls, request: Request, service: FaceService) -> "Payload":
        limit = service.limits.max_upload_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > 2 * limit + 65536:
            raise ServiceError(413, "upload_too_large", f"the request is {int(length):,} bytes; uploads are limited "
                                                        f"to {limit:,} bytes an image")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            try:
                form = await request.form(max_files=4, max_fields=16)
            except Exception as error:  # noqa: BLE001 - the parser's own errors name the problem
                raise bad_request("malformed_multipart", f"a multipart body occface cannot parse ({error})") from error
            fields, files = {}, {}
            for key, value in form.multi_items():
                if hasattr(value, "read"):
                    files[key] = await value.read(limit + 1)
                else:
                    fields[key] = value
            return cls(fields, files, service)
        if kind == "application/json":
            raw = await request.body()
            try:
                data = json.loads(raw or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise bad_request("malformed_json", f"the body is not valid JSON ({error})") from error
            if not isinstance(data, dict):
                raise bad_request("malformed_json", "the JSON body must be an object")
            return cls(data, {}, service)
        raise ServiceError(415, "unsupported_media_type", f"content type {kind or 'none'!r}: send multipart/form-data "
                                                          "(image uploads) or application/json (base64 images)")

    def has(self, name: str) -> bool:
        return name in self.files or self.fields.get(name) not in (None, "")

    def image(self, name: str) -> tuple:
        """(RGB uint8 image, the encoded bytes or None) of field ``name``."""
        limits = self.service.limits
        if name in self.files:
            data = self.files[name]
            return decode_image(data, name, limits), data
        if name in self.fields and self.fields[name] not in (None, ""):
            data = base64_bytes(self.fields[name], name, limits)  # the same file's sha256 as if uploaded
            return decode_image(data, name, limits), data
        raise ServiceError(422, "missing_field", f"{name}: missing (an image upload, or base64 in JSON)", name)

    def flag(self, name: str, request: Request) -> bool:
        value = self.fields.get(name, request.query_params.get(name, False))
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("", "0", "false", "no", "off"):
            return False
        raise ServiceError(422, "bad_flag", f"{name}: expected true or false, got {value!r}", name)

    def number(self, name: str, request: Request, default: int) -> int:
        value = self.fields.get(name, request.query_params.get(name, default))
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ServiceError(422, "bad_number", f"{name}: expected a whole number, got {value!r}", name) from None

    def text(self, name: str) -> str | None:
        value = self.fields.get(name)
        return None if value in (None, "") else str(value)


def create_app(service: FaceService) -> FastAPI:
    """The API over ``service`` (see the module's docstring)."""
    docs = _local_docs()
    app = FastAPI(title="occface", version=__version__, docs_url=None if docs else "/docs", redoc_url=None,
                  description="Occlusion-aware face recognition: which parts of a face are visible, and matching on "
                              "those parts.")
    app.state.service = service

    @app.middleware("http")
    async def api_keys(request: Request, call_next):
        path = request.url.path
        if path.startswith("/v1/") and service.db is not None and service.db.active_keys():
            header = request.headers.get("authorization", "")
            token = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
            if not token:
                return _error(ServiceError(401, "no_api_key", "this server needs an API key: Authorization: Bearer KEY "
                                                              "or X-API-Key: KEY"))
            name = await run_in_threadpool(service.db.check_key, token)
            if name is None:
                return _error(ServiceError(401, "bad_api_key", "the API key is not valid (unknown or revoked)"))
            request.state.key_name = name
        return await call_next(request)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError):
        return _error(error)

    @app.exception_handler(InputError)
    async def input_error(request: Request, error: InputError):
        return _error(ServiceError(422, "bad_input", str(error).splitlines()[0]))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(ServiceError(422, "bad_parameter", f"{where or 'request'}: {first.get('msg', 'invalid')}", where))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {error.detail}"
        return _error(ServiceError(error.status_code, code, message))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        reference = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s", reference, request.method, request.url.path, exc_info=error)
        return _error(ServiceError(500, "internal", f"internal error (reference {reference} in the server's log)"))

    @app.get("/healthz", summary="200 once the model is loaded")
    async def healthz() -> dict:
        return {"status": "ok", "model": service.model.config.arch}

    @app.get("/v1/info", summary="The model, its calibration, the gallery, precision and runtime")
    async def info() -> dict:
        return await run_in_threadpool(service.info)

    @app.post("/v1/faces", summary="Detect, align and describe every face of a photo",
              openapi_extra=_body({"image": _IMAGE, "embedding": {"type": "boolean"}, "overlay": {"type": "boolean"}},
                                  ["image"]))
    async def faces(request: Request) -> dict:
        payload = await Payload.read(request, service)
        image, _ = payload.image("image")
        return await run_in_threadpool(service.faces, image, embedding=payload.flag("embedding", request),
                                       overlay=payload.flag("overlay", request))

    @app.post("/v1/verify", summary="Two photos, or a photo and an enrolled subject: scores and the decision",
              openapi_extra=_body({"first": _IMAGE, "second": _IMAGE, "subject": {"type": "string"},
                                   "overlay": {"type": "boolean"}}, ["first"]))
    async def verify(request: Request) -> dict:
        payload = await Payload.read(request, service)
        first, _ = payload.image("first")
        subject = payload.text("subject")
        second = None if subject is not None and not payload.has("second") else payload.image("second")[0]
        return await run_in_threadpool(service.verify, first, second, subject, payload.flag("overlay", request))

    @app.post("/v1/subjects/{subject}/faces", status_code=201, summary="Enrol the largest face of a photo",
              openapi_extra=_body({"image": _IMAGE}, ["image"]))
    async def enroll(subject: str, request: Request) -> dict:
        payload = await Payload.read(request, service)
        image, data = payload.image("image")
        source = payload.text("source") or _upload_name(request) or "upload"
        return await run_in_threadpool(service.enroll, subject, image, source, data)

    @app.get("/v1/subjects", summary="Enrolled subjects, a page at a time")
    async def subjects(limit: int = 100, offset: int = 0) -> dict:
        return await run_in_threadpool(service.subjects, limit, offset)

    @app.get("/v1/subjects/{subject}", summary="One subject and its faces")
    async def subject(subject: str) -> dict:
        return await run_in_threadpool(service.subject, subject)

    @app.delete("/v1/subjects/{subject}", summary="Remove a subject and every face of theirs")
    async def delete_subject(subject: str) -> dict:
        return await run_in_threadpool(service.delete_subject, subject)

    @app.post("/v1/search", summary="The gallery's best identities for the largest face of a photo, or unknown",
              openapi_extra=_body({"image": _IMAGE, "top": {"type": "integer"}, "overlay": {"type": "boolean"}},
                                  ["image"]))
    async def search(request: Request) -> dict:
        payload = await Payload.read(request, service)
        image, _ = payload.image("image")
        return await run_in_threadpool(service.search, image, payload.number("top", request, 5),
                                       payload.flag("overlay", request))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return FileResponse(PAGE / "index.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = PAGE / name
        if "/" in name or not path.is_file():
            raise ServiceError(404, "not_found", f"GET /static/{name}: no such file")
        return FileResponse(path)

    if docs:
        _mount_docs(app, docs)
    return app


def _error(error: ServiceError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _upload_name(request: Request) -> str | None:
    return request.headers.get("x-source-name")


def _local_docs() -> Path | None:
    """Swagger UI's files from the optional package ``swagger-ui-bundle-v2`` (the docs page then
    needs no CDN), or None (FastAPI's default page, which loads them from a CDN)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    return Path(swagger_ui_path)


def _mount_docs(app: FastAPI, folder: Path) -> None:
    from fastapi.openapi.docs import get_swagger_ui_html

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="occface API",
                                   swagger_js_url="/docs-files/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-files/swagger-ui.css", swagger_favicon_url="")

    @app.get("/docs-files/{name}", include_in_schema=False)
    async def docs_files(name: str):
        path = folder / name
        if "/" in name or not path.is_file():
            raise ServiceError(404, "not_found", f"GET /docs-files/{name}: no such file")
        return FileResponse(path)
