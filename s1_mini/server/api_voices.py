"""Voice routes: ours (``/v1/references`` REST) and fish-speech's
(``/v1/references/add|list|delete``, answers in msgpack unless JSON is asked for)."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Annotated, Any

import msgpack
from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from s1_mini.server.api_tts import parse
from s1_mini.server.bodies import read_body
from s1_mini.server.errors import APIError, error_body, field_of, too_large
from s1_mini.server.schemas import (VOICE_ID_PATTERN, AddReferenceRequest, Deleted, DeleteReferenceRequest,
                                    ErrorResponse, FishAddResponse, FishDeleteResponse, FishListResponse, VoiceId,
                                    VoiceInfo, VoiceList, _decode_audio)
from s1_mini.voices import InvalidVoiceId, VoiceError, VoiceNotFound, VoiceStorageError

log = logging.getLogger("s1_mini.server")
router = APIRouter(tags=["voices"])
RESERVED_IDS = frozenset({"add", "list", "delete", "update"})  # names of fish-speech routes under /v1/references
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 415, 422, 500, 503, 507)}


class VoiceCreate(BaseModel):
    """``POST /v1/references``: multipart (audio as a file), JSON (audio base64) or msgpack."""

    model_config = ConfigDict(extra="forbid")
    id: VoiceId
    text: Annotated[str, Field(min_length=1, max_length=2000, description="transcript of the audio")]
    audio: Annotated[bytes, Field(description="an audio file (wav, flac, mp3, ogg...)")]
    overwrite: bool = False

    @field_validator("audio", mode="before")
    @classmethod
    def _audio(cls, value: Any) -> Any:
        return _decode_audio(value)


def _multipart_spec(name: str) -> dict[str, Any]:
    ref = {"schema": {"$ref": f"#/components/schemas/{name}"}}
    form = {"schema": {"type": "object", "required": ["id", "text", "audio"], "properties": {
        "id": {"type": "string", "pattern": VOICE_ID_PATTERN}, "text": {"type": "string", "minLength": 1},
        "audio": {"type": "string", "format": "binary"}, "overwrite": {"type": "boolean"}}}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": form, "application/json": ref,
                                                          "application/msgpack": ref}}}


def _engine(request: Request) -> Any:
    request.app.state.synth.require_ready()
    return request.app.state.engine


async def _register(engine: Any, voice_id: str, audio: bytes, text: str, overwrite: bool, id_field: str) -> Any:
    if voice_id.lower() in RESERVED_IDS:
        raise APIError(422, "invalid_request", f"{id_field}: {voice_id!r} is reserved (it names a fish-speech "
                       "route under /v1/references)", id_field)
    if not overwrite:
        try:
            engine.voices.get(voice_id)
        except VoiceError:
            pass
        else:
            raise APIError(409, "conflict", f"{id_field}: a voice {voice_id!r} is already registered "
                           "(delete it first, or send overwrite=true)", id_field)
    try:
        return await asyncio.to_thread(engine.voices.register, voice_id, audio, text)
    except VoiceStorageError as exc:  # the server's disk, not the request: nothing to fix in the body
        raise _storage_error(voice_id, exc, "registered") from None
    except VoiceError as exc:
        message = str(exc)
        field = field_of(message)
        if field == "voice_id":
            message, field = id_field + message[len("voice_id"):], id_field
        return _raise(413 if too_large(message) else 422, "invalid_request", message, field)
    except Exception:  # noqa: BLE001 -- undecodable uploads can fail deep in the decoders
        log.warning("voice %r: audio could not be encoded", voice_id, exc_info=True)
        return _raise(422, "invalid_request", "audio: could not be decoded and encoded as audio", "audio")


def _raise(status: int, code: str, message: str, field: str | None) -> Any:
    raise APIError(status, code, message, field)


def _storage_error(voice_id: str, exc: VoiceStorageError, done: str) -> APIError:
    """507 when the registry's disk is full (space may come back), 500 when its directory
    cannot be written at all (the deployment must be fixed). The path stays in the log."""
    log.error("voice %r could not be %s: %s", voice_id, done, exc)
    if exc.full:
        return APIError(507, "insufficient_storage", f"the voice could not be {done}: the voice registry's "
                        "storage is full", None)
    return APIError(500, "storage_not_writable", f"the voice could not be {done}: the voice registry's "
                    "directory is not writable", None)


# ----------------------------------------------------------------- fish-speech routes (first: fixed paths)


def _wants_json(request: Request) -> bool:
    q = request.query_params.get("format", "").strip().lower()
    if q in {"json", "application/json", "msgpack", "application/msgpack"}:
        return q in {"json", "application/json"}
    accept = request.headers.get("accept", "").lower()
    return "application/json" in accept and "application/msgpack" not in accept


def _fish(request: Request, payload: dict[str, Any], status: int = 200) -> Response:
    if _wants_json(request):
        return JSONResponse(payload, status_code=status)
    return Response(msgpack.packb(payload, use_bin_type=True), status_code=status, media_type="application/msgpack")


def _fish_error(request: Request, exc: APIError, extra: dict[str, Any]) -> Response:
    payload = {"success": False, "message": exc.message, **extra,
               **error_body(exc.code, exc.message, exc.field, exc.status)}
    response = _fish(request, payload, exc.status)
    response.headers.update(exc.headers)
    return response


@router.post("/v1/references/add", openapi_extra=_multipart_spec("AddReferenceRequest"),
             responses={200: {"model": FishAddResponse}, **ERRORS}, summary="fish-speech: add a voice")
async def fish_add(request: Request) -> Response:
    """fish-speech's route: ``id``, ``audio``, ``text`` as multipart, JSON (audio
    base64) or msgpack. Answers msgpack unless ``?format=json`` or ``Accept:
    application/json``. Ids are ``[A-Za-z0-9_-]{1,64}`` (fish-speech also allows
    spaces and 255 characters); an existing id is 409 as in fish-speech."""
    voice_id = ""
    try:
        data, _ = await read_body(request, forms=True)
        voice_id = data.get("id") if isinstance(data.get("id"), str) else ""
        body = parse(AddReferenceRequest, data)
        if not re.fullmatch(VOICE_ID_PATTERN, body.id):
            raise APIError(400, "invalid_request", f"id: must match [A-Za-z0-9_-]{{1,64}}, got {body.id[:80]!r} "
                           "(fish-speech also allows spaces and up to 255 characters; this server does not)", "id")
        engine = _engine(request)
        await _register(engine, body.id, body.audio, body.text, overwrite=False, id_field="id")
    except APIError as exc:
        return _fish_error(request, exc, {"reference_id": voice_id})
    return _fish(request, {"success": True, "message": f"Reference voice '{body.id}' added successfully",
                           "reference_id": body.id})


@router.get("/v1/references/list", responses={200: {"model": FishListResponse}, **ERRORS},
            summary="fish-speech: list voice ids")
async def fish_list(request: Request) -> Response:
    try:
        ids = [v.id for v in _engine(request).voices.list()]
    except APIError as exc:
        return _fish_error(request, exc, {"reference_ids": []})
    return _fish(request, {"success": True, "reference_ids": ids, "message": f"Found {len(ids)} reference voices"})


_DELETE_SPEC = {"requestBody": {"required": True, "content": {
    t: {"schema": {"$ref": "#/components/schemas/DeleteReferenceRequest"}}
    for t in ("application/json", "application/msgpack", "multipart/form-data")}}}


@router.delete("/v1/references/delete", openapi_extra=_DELETE_SPEC, responses={200: {"model": FishDeleteResponse}, **ERRORS}, summary="fish-speech: delete a voice")
async def fish_delete(request: Request) -> Response:
    voice_id = ""
    try:
        data, _ = await read_body(request, forms=True)
        voice_id = data.get("reference_id") if isinstance(data.get("reference_id"), str) else ""
        body = parse(DeleteReferenceRequest, data)
        _delete(_engine(request), body.reference_id, "reference_id")
    except APIError as exc:
        return _fish_error(request, exc, {"reference_id": voice_id})
    return _fish(request, {"success": True, "message": f"Reference voice '{body.reference_id}' deleted successfully",
                           "reference_id": body.reference_id})


def _delete(engine: Any, voice_id: str, field: str) -> None:
    try:
        engine.voices.delete(voice_id)
    except VoiceNotFound:
        raise APIError(404, "not_found", f"{field}: no voice {voice_id!r} is registered", field) from None
    except InvalidVoiceId as exc:
        raise APIError(422, "invalid_request", field + str(exc)[len("voice_id"):], field) from None
    except VoiceStorageError as exc:
        raise _storage_error(voice_id, exc, "deleted") from None


# ----------------------------------------------------------------- our REST routes


@router.post("/v1/references", status_code=201, openapi_extra=_multipart_spec("VoiceCreate"),
             responses={201: {"model": VoiceInfo}, **ERRORS}, summary="Register a voice")
async def create_voice(request: Request) -> JSONResponse:
    """Multipart ``id``, ``text`` and an ``audio`` file (or JSON with base64 audio).
    An existing id is 409 unless ``overwrite`` is true."""
    data, _ = await read_body(request, forms=True)
    body = parse(VoiceCreate, data)
    voice = await _register(_engine(request), body.id, body.audio, body.text, body.overwrite, "id")
    return JSONResponse(voice.info(), status_code=201)


@router.get("/v1/references", response_model=VoiceList, responses=ERRORS, summary="List voices")
async def list_voices(request: Request) -> dict[str, Any]:
    return {"voices": [v.info() for v in _engine(request).voices.list()]}


VoicePath = Annotated[str, Path(pattern=VOICE_ID_PATTERN, description="[A-Za-z0-9_-]{1,64}")]


@router.get("/v1/references/{voice_id}", response_model=VoiceInfo, responses=ERRORS, summary="One voice")
async def get_voice(request: Request, voice_id: VoicePath) -> dict[str, Any]:
    try:
        return _engine(request).voices.get(voice_id).info()
    except VoiceNotFound:
        raise APIError(404, "not_found", f"voice_id: no voice {voice_id!r} is registered", "voice_id") from None
    except VoiceError as exc:
        raise APIError(422, "invalid_request", str(exc), "voice_id") from None


@router.delete("/v1/references/{voice_id}", response_model=Deleted, responses=ERRORS, summary="Delete a voice")
async def delete_voice(request: Request, voice_id: VoicePath) -> dict[str, Any]:
    _delete(_engine(request), voice_id, "voice_id")
    return {"id": voice_id, "deleted": True}
