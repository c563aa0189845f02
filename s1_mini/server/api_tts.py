"""Synthesis routes: ``/v1/tts`` (ours and fish-speech's body), ``/v1/tts/stream`` and
OpenAI's ``/v1/audio/speech``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ValidationError

from s1_mini.server.audio_formats import KNOWN, STREAMABLE, UnsupportedFormat, check_format
from s1_mini.server.bodies import read_body
from s1_mini.server.errors import APIError, from_validation
from s1_mini.server.schemas import SpeechRequest, TTSRequest
from s1_mini.server.synthesis import Job, Synthesizer, sampling

router = APIRouter(tags=["synthesis"])

# voice names that mean "no reference": ours, and OpenAI's built-in voices, so that
# clients written for OpenAI work unchanged (they get this model's unconditioned voice)
DEFAULT_VOICES = frozenset({"default", "none", "alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx",
                            "sage", "shimmer", "verse", "marin", "cedar"})
OPENAI_PCM_RATE = 24000  # OpenAI's pcm is 24 kHz s16le; clients assume it


def body_spec(name: str, msgpack: bool = True) -> dict[str, Any]:
    ref = {"schema": {"$ref": f"#/components/schemas/{name}"}}
    content = {"application/json": ref, **({"application/msgpack": ref} if msgpack else {})}
    return {"requestBody": {"required": True, "content": content}}


def audio_responses(streaming: bool = False) -> dict[int | str, dict[str, Any]]:
    names = STREAMABLE if streaming else tuple(KNOWN)
    content = {KNOWN[n].media_type: {"schema": {"type": "string", "format": "binary"}} for n in names}
    errors = {code: {"model": _error_model(), "description": text} for code, text in [
        (400, "invalid request (the message names the field and the rule)"), (401, "missing or wrong API key"),
        (404, "unknown voice"), (413, "body too large"), (415, "unsupported content type"),
        (422, "invalid field"), (503, "overloaded or loading (Retry-After)"), (504, "timed out")]}
    return {200: {"content": content, "description": "audio"}, **errors}


def _error_model() -> type[BaseModel]:
    from s1_mini.server.schemas import ErrorResponse

    return ErrorResponse


def parse(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc, allowed=list(model.model_fields)) from None


def synth_of(request: Request) -> Synthesizer:
    return request.app.state.synth


def tts_job(body: TTSRequest) -> Job:
    job = Job(body.text, sampling(body), fields={"voice_id": "reference_id"})
    if body.reference_id is not None:
        job.reference_id = body.reference_id
        if body.references:
            job.warnings.append("references: ignored because reference_id is given (as fish-speech does)")
    else:  # several references: each one turn of the prompt, in order (as fish-speech does)
        job.references = [(ref.audio, ref.text) for ref in body.references]
    return job


def _headers(job: Job, fmt_name: str) -> dict[str, str]:
    headers = {"Content-Disposition": f"attachment; filename=audio.{fmt_name}"}
    if job.warnings:
        headers["X-S1-Mini-Warning"] = "; ".join(job.warnings)
    return headers


@router.post("/v1/tts", openapi_extra=body_spec("TTSRequest"), responses=audio_responses(),
             summary="Text to speech (also fish-speech's ServeTTSRequest, JSON or msgpack)")
async def tts(request: Request) -> Response:
    """The whole audio file in ``format``. With ``streaming: true`` (fish-speech
    clients) the body is headerless 16-bit little-endian mono PCM, sent as it is
    generated, the way fish-speech's client reads it."""
    synth = synth_of(request)
    with synth.counting_rejects():
        data, _ = await read_body(request)
        body = parse(TTSRequest, data)
    job = tts_job(body)
    if body.streaming:
        return await synth.stream(job, KNOWN["pcm"], _headers(job, "pcm"), with_header=False)
    fmt = KNOWN[body.format]
    audio, rate, timings = await synth.synthesize(job, fmt, request)
    return Response(audio, media_type=fmt.media_type, headers={
        **_headers(job, fmt.name), "X-Sample-Rate": str(rate), "X-Audio-Frames": str(timings.frames)})


@router.post("/v1/tts/stream", openapi_extra=body_spec("TTSRequest"), responses=audio_responses(streaming=True),
             summary="Streaming text to speech (WAV with an open-ended header, or raw PCM)")
async def tts_stream(request: Request) -> Response:
    """Chunked audio, first bytes as soon as the first frames are decoded. ``wav``: a
    44-byte header with sizes 0xFFFFFFFF, then 16-bit PCM; ``pcm``: raw s16le (see the
    ``X-Sample-Rate`` and ``X-Audio-Format`` headers). Disconnecting cancels generation."""
    synth = synth_of(request)
    with synth.counting_rejects():
        data, _ = await read_body(request)
        body = parse(TTSRequest, data)
        try:
            fmt = check_format(body.format, "format", streaming=True)
        except UnsupportedFormat as exc:
            raise APIError(422, "invalid_request", str(exc), "format") from None
    job = tts_job(body)
    return await synth.stream(job, fmt, _headers(job, fmt.name))


@router.post("/v1/audio/speech", openapi_extra=body_spec("SpeechRequest", msgpack=False),
             responses=audio_responses(), summary="OpenAI-compatible speech")
async def speech(request: Request) -> Response:
    """OpenAI's ``audio.speech.create``. ``voice`` is a registered voice id, or
    ``default`` (any OpenAI built-in name too) for no reference. ``pcm`` is 24 kHz
    s16le like OpenAI's and always streams; ``wav`` streams with
    ``stream_format: "audio"``; ``stream_format: "sse"`` sends base64 PCM events.
    Other formats come whole. ``speed`` must be 1.0."""
    synth = synth_of(request)
    with synth.counting_rejects():
        data, _ = await read_body(request)
        body = parse(SpeechRequest, data)
        if body.stream_format == "sse" and body.response_format not in STREAMABLE:
            raise APIError(422, "invalid_request", "stream_format: 'sse' needs response_format pcm or wav, "
                           f"got {body.response_format!r}", "stream_format")
    job = Job(body.input, sampling(body), fields={"voice_id": "voice", "text": "input"})
    if body.voice.lower() not in DEFAULT_VOICES or body.voice in _registered(request):
        job.reference_id = body.voice
    if body.instructions:
        job.warnings.append("instructions: ignored (the model takes no instructions)")
    name = body.response_format
    headers = _headers(job, name)
    if body.stream_format == "sse":
        return await synth.stream(job, KNOWN["pcm"], headers, out_rate=OPENAI_PCM_RATE, sse=True)
    if name == "pcm":
        return await synth.stream(job, KNOWN["pcm"], headers, out_rate=OPENAI_PCM_RATE)
    if name == "wav" and body.stream_format == "audio":
        return await synth.stream(job, KNOWN["wav"], headers)
    fmt = KNOWN[name]
    audio, rate, _ = await synth.synthesize(job, fmt, request)
    return Response(audio, media_type=fmt.media_type, headers={**headers, "X-Sample-Rate": str(rate)})


def _registered(request: Request) -> set[str]:
    engine = request.app.state.engine
    voices = getattr(engine, "voices", None)
    return {v.id for v in voices.list()} if voices is not None else set()
