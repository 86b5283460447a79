"""The service's errors: each an HTTP status, a short code, a one-line message and the field it is
about. The server answers ``{"error": {"status", "code", "message", "field"}}`` with the status."""
from __future__ import annotations


class ServiceError(Exception):
    """Bad input or a refusal, with its HTTP status (4xx, or 503 / 504 for load and time)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field

    def body(self) -> dict:
        return {"error": {"status": self.status, "code": self.code, "message": self.message, "field": self.field}}


def bad_request(code: str, message: str, field: str | None = None) -> ServiceError:
    return ServiceError(400, code, message, field)


def unprocessable(code: str, message: str, field: str | None = None) -> ServiceError:
    return ServiceError(422, code, message, field)


def not_found(code: str, message: str, field: str | None = None) -> ServiceError:
    return ServiceError(404, code, message, field)


def too_large(code: str, message: str, field: str | None = None) -> ServiceError:
    return ServiceError(413, code, message, field)
