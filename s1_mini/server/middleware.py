"""Pure ASGI middleware (streaming and disconnects pass through untouched): the
optional bearer API key, and the request body size limit (also used by the SageMaker
front and router)."""

from __future__ import annotations

import hmac
import json
from typing import Any

from s1_mini.server.errors import error_body

OPEN_PATHS = ("/health", "/ready")  # probes work without the key


async def _send_json(send: Any, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


class BodyLimit:
    """The request body size limit: a declared ``Content-Length`` over it is refused
    before any of the body is read; a body of unknown length (chunked) is read up to the
    limit, then replayed to the app, or refused as soon as it crosses it. Either way no
    more than the limit is ever held in memory. ``setting`` names the option that sets
    the limit (it is in the 413's message), ``hint`` ends that message."""

    def __init__(self, app: Any, max_mb: float, setting: str, hint: str = "") -> None:
        self.app = app
        self.max_mb = max_mb
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.setting = setting
        self.hint = hint

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                return await _send_json(send, 400, error_body("invalid_request", "content-length: not a number",
                                                              "content-length", 400))
            if size > self.max_bytes:
                return await self._too_large(send)
            return await self.app(scope, receive, send)
        if scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS") and b"transfer-encoding" not in headers:
            return await self.app(scope, receive, send)
        # No length given (chunked): read the body up to the limit first, then replay it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await self._too_large(send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, send: Any) -> None:
        message = f"body: must be at most {self.max_mb:g} MB ({self.max_bytes} bytes, {self.setting}){self.hint}"
        # Connection: close, so that the server does not read the rest of the body to reuse the connection.
        await _send_json(send, 413, error_body("payload_too_large", message, "body", 413),
                         [(b"connection", b"close")])


class GuardMiddleware:
    """The HTTP server's guard: the optional bearer API key, then the body limit."""

    def __init__(self, app: Any, api_key: str | None, max_body_mb: float) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.limited = BodyLimit(app, max_body_mb, "max_body_mb")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key is not None and scope.get("path") not in OPEN_PATHS:
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                message = "authorization: a valid 'Authorization: Bearer <api key>' header is required"
                return await _send_json(send, 401, error_body("unauthorized", message, "authorization", 401),
                                        [(b"www-authenticate", b'Bearer realm="s1-mini"')])
        return await self.limited(scope, receive, send)


class MetricsMiddleware:
    """Counts every HTTP request by method, route template and status."""

    def __init__(self, app: Any, metrics_of: Any) -> None:
        self.app = app
        self.metrics_of = metrics_of

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def capture(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            metrics = self.metrics_of()
            if metrics is not None:
                route = scope.get("route")
                path = getattr(route, "path", None) or "unmatched"
                metrics.http.labels(scope.get("method", ""), path, str(status)).inc()
