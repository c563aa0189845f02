"""Request bodies in the three encodings the fish-speech server takes: JSON, msgpack
(``application/msgpack``, how its client sends ``ServeTTSRequest``) and multipart
forms. Anything else is 415; a body that does not parse is 400."""

from __future__ import annotations

import json
from typing import Any

import msgpack
from fastapi import Request
from starlette.datastructures import UploadFile

from s1_mini.server.errors import APIError

JSON_TYPES = ("application/json",)
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _unsupported(kind: str, accepted: tuple[str, ...]) -> APIError:
    shown = kind or "(none)"
    return APIError(415, "unsupported_media_type",
                    f"content-type: must be one of {', '.join(accepted)}, got {shown}", "content-type")


async def read_body(request: Request, forms: bool = False) -> tuple[dict[str, Any], str]:
    """The body as a mapping and the encoding it came in ("json", "msgpack", "form")."""
    kind = media_type(request)
    accepted = JSON_TYPES + MSGPACK_TYPES + (FORM_TYPES if forms else ())
    if kind in FORM_TYPES and forms:
        return await read_form(request), "form"
    if kind and kind not in JSON_TYPES + MSGPACK_TYPES and not kind.endswith("+json"):
        raise _unsupported(kind, accepted)
    return decode_mapping(await request.body(), kind)


def decode_mapping(raw: bytes, kind: str) -> tuple[dict[str, Any], str]:
    """A JSON or msgpack body (by media type ``kind``) as a mapping, and its encoding."""
    if not raw:
        raise APIError(400, "invalid_request", "body: must not be empty", "body")
    if kind in MSGPACK_TYPES:
        try:
            data = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        except Exception as exc:  # noqa: BLE001 -- any malformed input
            raise APIError(400, "invalid_body", f"body: not valid msgpack ({type(exc).__name__})", "body") from None
        encoding = "msgpack"
    else:  # JSON, also when no content type was given
        try:
            data = json.loads(raw)
        except RecursionError:
            raise APIError(400, "invalid_body", "body: JSON nested too deeply", "body") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise APIError(400, "invalid_body", f"body: not valid JSON ({exc})", "body") from None
        encoding = "json"
    if not isinstance(data, dict):
        raise APIError(422, "invalid_request", f"body: must be an object, got {type(data).__name__}", "body")
    return data, encoding


async def read_form(request: Request) -> dict[str, Any]:
    """Form fields as a dict: uploaded files become their bytes."""
    try:
        form = await request.form(max_files=4, max_fields=64)
    except Exception as exc:  # noqa: BLE001 -- malformed multipart of any kind
        raise APIError(400, "invalid_body", f"body: not a valid form ({type(exc).__name__}: {exc})", "body") from None
    out: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key in out:
            raise APIError(422, "invalid_request", f"{key}: given more than once", key)
        out[key] = await value.read() if isinstance(value, UploadFile) else value
    await form.close()
    return out
