"""Errors are values with a status, mapped to HTTP in exactly one place (`install_error_handlers`).

Every error body has the same shape, `{"error": {"type", "message", "field"}}`, and no handler ever
returns a stack trace: unexpected exceptions are logged here and answered with a fixed message.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scoring.items import validation_message
from service.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger("hydra_rm.errors")

# Set on the ASGI scope by whoever answers an error (handlers below, auth, body limit): the reason a
# request was rejected, which the metrics middleware reads to label hydra_rm_rejected_requests.
ERROR_TYPE_KEY = "hydra_rm.error_type"


class ServiceError(Exception):
    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers = headers or {}


class InvalidInput(ServiceError):
    status, type = 422, "invalid_request"


class PayloadTooLarge(ServiceError):
    status, type = 413, "payload_too_large"


class Unauthorized(ServiceError):
    status, type = 401, "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Overloaded(ServiceError):
    """The queue is full (or the server is draining): retry later, elsewhere if possible."""

    status, type = 503, "overloaded"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class NotReady(ServiceError):
    status, type = 503, "not_ready"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class UnknownModel(ServiceError):
    """A request named a model this server does not serve (HYDRA_RM_MODELS)."""

    status, type = 404, "model_not_found"


class DeadlineExceeded(ServiceError):
    status, type = 504, "timeout"


class ScoringFailed(ServiceError):
    """The engine raised on this request's items (after isolating them from their neighbours)."""

    status, type = 500, "scoring_failed"


class ClientDisconnected(ServiceError):
    status, type = 499, "client_disconnected"  # nginx's convention; nobody reads it


def error_body(type_: str, message: str, field: str | None = None) -> dict[str, Any]:
    """The one error body: handlers, auth, the body limit, drain and h11's protocol errors all send it."""
    return ErrorResponse(error=ErrorDetail(type=type_, message=message, field=field)).model_dump()


def error_response(
    status: int, type_: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(type_, message, field), status_code=status, headers=headers)


_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def install_error_handlers(app: FastAPI) -> None:
    """The single place where exceptions become HTTP statuses."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        request.scope[ERROR_TYPE_KEY] = exc.type
        return error_response(exc.status, exc.type, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        request.scope[ERROR_TYPE_KEY] = "invalid_request"
        field, message = validation_message(exc.errors())
        return error_response(422, "invalid_request", message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's "error parsing the body" (e.g. bytes that are not UTF-8)
            request.scope[ERROR_TYPE_KEY] = "invalid_request"
            return error_response(422, "invalid_request", "request body is not valid UTF-8 JSON", "body")
        type_ = _HTTP_TYPES.get(exc.status_code, "http_error")
        request.scope[ERROR_TYPE_KEY] = type_
        return error_response(exc.status_code, type_, str(exc.detail), None, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        request.scope[ERROR_TYPE_KEY] = "internal_error"
        return error_response(500, "internal_error", "internal server error (logged on the server)")
