"""One error shape for every failure: ``{"error": {"code", "field", "message"}}``
(plus ``type`` and ``param``, the names OpenAI clients read), and the handlers that
turn validation errors, HTTP errors and unexpected exceptions into it."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from s1_mini.scheduler import ErrorCode, TTSError
from s1_mini.voices import REFERENCE_LIMIT

log = logging.getLogger("s1_mini.server")

# engine error code -> HTTP status
STATUS = {
    ErrorCode.INVALID: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.CANCELLED: 499,
    ErrorCode.OUT_OF_MEMORY: 503,
    ErrorCode.NO_AUDIO: 500,
    ErrorCode.STOPPED: 503,
    ErrorCode.INTERNAL: 500,
}
RETRY = {ErrorCode.OVERLOADED, ErrorCode.OUT_OF_MEMORY, ErrorCode.STOPPED}
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
                 429: "rate_limit_error", 503: "server_overloaded", 504: "timeout"}
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*): ")
# Limits on how much a request carries: the engine refuses past them as invalid_request with
# "<field>: must be at most <limit> (<option>), got ..."; over HTTP that is 413 Payload Too
# Large, not a 400. Matched at the start only, where no client text can appear.
_TOO_LARGE = re.compile(rf"^[A-Za-z_][A-Za-z0-9_.\[\]]*: must be at most [^,(]* \({REFERENCE_LIMIT}\)")


class APIError(Exception):
    """An error response: raised anywhere in a request, rendered by the handler."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}


def error_body(code: str, message: str, field: str | None = None, status: int = 400) -> dict[str, Any]:
    return {"error": {"code": code, "field": field, "message": message,
                      "type": _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                      "param": field}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.code, error.message, error.field, error.status),
                        status_code=error.status, headers=error.headers)


def field_of(message: str) -> str | None:
    """The ``name`` of an engine message ``"name: rule"``."""
    match = _FIELD_PREFIX.match(message)
    return match.group(1) if match else None


def too_large(message: str) -> bool:
    """Whether an engine message refuses a request for carrying more than a limit allows."""
    return _TOO_LARGE.match(message) is not None


def from_engine(code: str, message: str, fields: dict[str, str] | None = None,
                retry_after: int = 1) -> APIError:
    """An engine failure (TTSError or a failed TTSResponse) as an APIError; ``fields``
    renames the engine's parameter names to the API's (e.g. voice_id -> voice)."""
    status = STATUS.get(code, 500)
    if code == ErrorCode.INVALID and too_large(message):
        status = 413
    field = field_of(message)
    if field and fields and field in fields:
        renamed = fields[field]
        message = renamed + message[len(field):]
        field = renamed
    if status >= 500 and code in (ErrorCode.INTERNAL,):
        log.error("engine error: %s", message)
        message = "internal error during generation"  # no internals to clients
        field = None
    headers = {"Retry-After": str(retry_after)} if code in RETRY else {}
    return APIError(status, code, message, field, headers)


def from_tts_error(exc: TTSError, fields: dict[str, str] | None = None, retry_after: int = 1) -> APIError:
    return from_engine(exc.code, exc.message, fields, retry_after)


def location(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """pydantic's ``("references", 0, "audio")`` as ``references[0].audio``."""
    out = ""
    for part in loc:
        if part in ("body", "query", "path", "header", "form") and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.startswith("function-") or part in ("str", "bytes", "int", "float"):
            continue  # union member tags
        else:
            out += ("." if out else "") + str(part)
    return out or None


def _describe(error: dict[str, Any], allowed: list[str] | None = None) -> tuple[str | None, str]:
    field = location(error.get("loc", ()))
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        message = "unknown field" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    elif kind == "missing":
        message = "required"
    else:
        message = str(error.get("msg", "invalid value"))
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        if "input" in error and "got " not in message and kind not in ("json_invalid",):
            shown = repr(error["input"])
            message += f", got {shown if len(shown) <= 80 else shown[:80] + '…'}"
    if field is None:
        field = field_of(message)  # model-level rules name their field in the message
    if field and not message.startswith(field + ":"):
        message = f"{field}: {message}"
    return field, message


def from_validation(exc: ValidationError | RequestValidationError, allowed: list[str] | None = None) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(422, "invalid_request", "invalid request")
    field, message = _describe(errors[0], allowed)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(422, "invalid_request", message, field)


_HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type",
               422: "invalid_request", 429: "too_many_requests"}


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(from_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        code = _HTTP_CODES.get(status, "error" if status < 500 else "internal_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if status == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
            field = "path"
        elif status == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
            field = "method"
        else:
            field = None
        if status >= 500:
            message, field = "internal error", None
        return JSONResponse(error_body(code, message, field, status), status_code=status,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body("internal_error", "internal error", None, 500), status_code=500)
