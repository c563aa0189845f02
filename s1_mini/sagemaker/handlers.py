"""The SageMaker inference handlers: ``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn``.

They follow the sagemaker-inference toolkit's contract, so the same functions run under
our serving front (:mod:`s1_mini.sagemaker.front`, the default) and under
multi-model-server. ``code/inference.py`` in ``model.tar.gz`` re-exports them.

Requests are the HTTP server's ``/v1/tts`` body (fish-speech's ``ServeTTSRequest``
fields included) as JSON or msgpack, plain text, or JSON lines (several records, as a
batch-transform MultiRecord body sends them). Responses are audio in the requested
container, or JSON / JSON lines with base64 audio. Errors are :class:`APIError`
(status, code, field, message).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s1_mini.config import EngineConfig
from s1_mini.engine import ProductionTTSEngine, TTSResponse
from s1_mini.scheduler import ErrorCode, TTSError
from s1_mini.server.api_tts import parse, tts_job
from s1_mini.server.audio_formats import KNOWN, SUPPORTED, AudioFormat, encode
from s1_mini.server.bodies import JSON_TYPES, MSGPACK_TYPES, decode_mapping
from s1_mini.server.errors import APIError, from_engine
from s1_mini.server.schemas import TTSRequest
from s1_mini.server.synthesis import Job

JSONLINES_TYPES = ("application/jsonlines", "application/x-jsonlines", "application/jsonl")
TEXT_TYPES = ("text/plain",)
ACCEPT_JSON = "application/json"
WILDCARDS = ("*/*", "audio/*")
ANY_JSON = ("*/*", "application/*", ACCEPT_JSON) + JSONLINES_TYPES
# Real-time endpoints cap a response at 6 MB; batch transform and async inference
# allow more (S1_MINI_MAX_RESPONSE_MB, set by the deploy tooling for those).
REALTIME_RESPONSE_LIMIT = 6_291_456


@dataclass
class Invocation:
    """One parsed request (or one line of a JSON-lines body)."""

    job: Job
    format: AudioFormat
    stream: bool = False


@dataclass
class Records:
    """A JSON-lines body: one Invocation or one APIError per input line, in order."""

    items: list[Invocation | APIError]


@dataclass
class Prediction:
    invocation: Invocation
    response: TTSResponse


# ---------------------------------------------------------------------------- model


# A directory in the checkpoint holding inductor's cache (TORCHINDUCTOR_CACHE_DIR) of a
# run on the same GPU type and image: start-up then loads kernels instead of compiling.
COMPILE_CACHE = "compile-cache"


def find_checkpoint(model_dir: str | Path) -> Path:
    """The checkpoint inside the extracted model.tar.gz: the model dir itself, or the
    one sub-directory that holds ``config.json`` and ``model.pth``."""
    root = Path(model_dir)
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir() and p.name != "code")
    for path in candidates:
        if (path / "config.json").is_file() and (path / "model.pth").is_file():
            return path
    raise FileNotFoundError(f"{root}: no checkpoint (config.json + model.pth) in the model directory or its "
                            "sub-directories")


def model_fn(model_dir: str, context: Any = None) -> ProductionTTSEngine:
    """Build, compile (inductor on GPU, per EngineConfig) and warm up the engine from
    the extracted ``model.tar.gz``; options come from the ``S1_MINI_*`` variables."""
    checkpoint = find_checkpoint(model_dir)
    config = EngineConfig.from_env(checkpoint_path=str(checkpoint))
    shipped = checkpoint / COMPILE_CACHE
    if config.compile_cache_dir is None and shipped.is_dir():
        # A cache made on the same GPU type and image, shipped in model.tar.gz: copied,
        # because inductor writes to its cache and the model directory is read-only.
        config = config.replace(compile_cache_dir=str(shutil.copytree(
            shipped, Path(tempfile.mkdtemp(prefix="s1-mini-")) / COMPILE_CACHE)))
    return ProductionTTSEngine(config).start()


# ---------------------------------------------------------------------------- input


def input_fn(body: bytes | str, content_type: str) -> Invocation | Records:
    kind = (content_type or "application/json").split(";")[0].strip().lower()
    raw = body.encode() if isinstance(body, str) else bytes(body)
    if kind in JSONLINES_TYPES:
        lines = _json_lines(raw)
        if not any(line.strip() for line in lines):
            raise APIError(400, ErrorCode.INVALID, "body: must hold at least one JSON line", "body")
        return Records([_record(line, "application/json") for line in lines])
    if kind in TEXT_TYPES:
        text = raw.decode("utf-8", errors="strict") if _utf8(raw) else None
        if not text or not text.strip():
            raise APIError(400, ErrorCode.INVALID, "body: must be non-empty UTF-8 text", "body")
        return Invocation(tts_job(parse(TTSRequest, {"text": text})), KNOWN["wav"])
    if kind in JSON_TYPES or kind in MSGPACK_TYPES or kind.endswith("+json"):
        record = _record(raw, kind)
        if isinstance(record, APIError):
            raise record
        return record
    accepted = JSON_TYPES + MSGPACK_TYPES + JSONLINES_TYPES + TEXT_TYPES
    raise APIError(415, "unsupported_media_type",
                   f"content-type: must be one of {', '.join(accepted)}, got {kind or '(none)'}", "content-type")


def _json_lines(raw: bytes) -> list[bytes]:
    """The lines of a JSON-lines body, split at ``\n`` only (``\r\n`` too) and kept as bytes:
    str.splitlines would also split inside a JSON string at U+2028, U+0085 and the like
    (one record becoming two broken ones, and the output one line too long), and decoding
    with replacement would let invalid UTF-8 through as U+FFFD; each line is decoded
    strictly by the JSON parser instead, so a bad line is an error record in its place."""
    lines = raw.split(b"\n")
    if lines[-1] == b"":  # the newline that ends the last line
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _record(raw: bytes, kind: str) -> Invocation | APIError:
    try:
        body = parse(TTSRequest, decode_mapping(raw, kind)[0])
    except APIError as exc:
        return exc
    fmt = KNOWN[body.format]
    return Invocation(tts_job(body), fmt, stream=bool(body.streaming))


# --------------------------------------------------------------------------- predict


def predict_fn(data: Invocation | Records, engine: ProductionTTSEngine) -> Prediction | list[Prediction | APIError]:
    """Run the request(s). A JSON-lines body's records are all queued before any is
    awaited, so they share the engine's batch; a bad record stays an error in place."""
    if isinstance(data, Invocation):
        return Prediction(data, engine.generate(data.job.text, **data.job.kwargs()))
    submitted: list[Any] = []
    for item in data.items:
        if isinstance(item, APIError):
            submitted.append(item)
            continue
        while True:
            try:
                submitted.append((item, engine.submit(item.job.text, **item.job.kwargs())))
                break
            except TTSError as exc:
                waiting = [e[1] for e in submitted if isinstance(e, tuple) and not e[1].future.done()]
                if exc.code == ErrorCode.OVERLOADED and waiting:
                    # A long body must not lose records to the queue limit: wait for room.
                    waiting[0].future.exception()
                    continue
                submitted.append(from_engine(exc.code, exc.message, item.job.fields))
                break
    out: list[Prediction | APIError] = []
    for entry in submitted:
        if isinstance(entry, APIError):
            out.append(entry)
            continue
        item, request = entry
        out.append(Prediction(item, engine.wait(request)))
    return out


# ---------------------------------------------------------------------------- output


def output_fn(prediction: Prediction | list[Prediction | APIError], accept: str) -> tuple[bytes, str]:
    """The response body and its media type, by ``accept`` (an Accept header: one type or a
    list with q-values; empty or a wildcard means the request's own ``format``)."""
    accept = (accept or "").strip()
    wanted = _preferences(accept)
    if isinstance(prediction, list):  # a JSON-lines body is answered line for line, as JSON lines
        if accept and not any(kind in ANY_JSON for kind in wanted):
            raise _not_acceptable(accept, ["application/jsonlines", ACCEPT_JSON])
        lines = [json.dumps(_json_result(p, line)) for line, p in enumerate(prediction, start=1)]
        return ("\n".join(lines) + "\n").encode(), "application/jsonlines"
    kind = next((k for k in wanted if k in WILDCARDS + (ACCEPT_JSON,) + JSONLINES_TYPES or _audio_format(k)), None)
    if accept and kind is None:
        raise _not_acceptable(accept, [KNOWN[n].media_type for n in SUPPORTED] + [ACCEPT_JSON,
                                                                                   "application/jsonlines"])
    response = _checked(prediction)
    if kind == ACCEPT_JSON or kind in JSONLINES_TYPES:
        body = json.dumps(_json_result(prediction)).encode()
        if kind == ACCEPT_JSON:
            return _limited(body), ACCEPT_JSON
        return _limited(body + b"\n"), "application/jsonlines"
    fmt = _audio_format(kind) if kind not in (None, *WILDCARDS) else prediction.invocation.format
    rate, audio = response.audio
    body, _ = encode(audio, rate, fmt)
    return _limited(body), fmt.media_type


def _checked(prediction: Prediction) -> TTSResponse:
    response = prediction.response
    if not response.success:
        raise from_engine(response.error_code or ErrorCode.INTERNAL, response.error or "failed",
                          prediction.invocation.job.fields)
    return response


def _json_result(prediction: Prediction | APIError, line: int | None = None) -> dict[str, Any]:
    """A record's JSON; an error on a JSON-lines body says its line, whether the line did not
    parse or the engine refused it."""
    if isinstance(prediction, APIError):
        message = prediction.message if line is None else f"line {line}: {prediction.message}"
        return {"error": {"status": prediction.status, "code": prediction.code, "field": prediction.field,
                          "message": message}}
    try:
        response = _checked(prediction)
    except APIError as exc:
        return _json_result(exc, line)
    rate, audio = response.audio
    fmt = prediction.invocation.format
    body, out_rate = encode(audio, rate, fmt)
    return {"audio": base64.b64encode(body).decode(), "format": fmt.name, "content_type": fmt.media_type,
            "sample_rate": out_rate, "frames": int(response.timings.frames),
            "audio_seconds": round(response.timings.audio_seconds, 4),
            "timings": {k: v for k, v in response.timings.as_dict().items() if v is not None}}


def _preferences(accept: str) -> list[str]:
    """The media types of an Accept header, most preferred first; q=0 (and a q that is not
    a number) means "not this one"."""
    ranked = []
    for position, part in enumerate(accept.split(",")):
        kind, *params = [p.strip() for p in part.split(";")]
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if kind and quality > 0:  # NaN is not > 0 either
            ranked.append((-quality, position, kind.lower()))
    return [kind for _, _, kind in sorted(ranked)]


def _audio_format(media_type: str) -> AudioFormat | None:
    return next((KNOWN[n] for n in SUPPORTED if KNOWN[n].media_type == media_type), None)


def _not_acceptable(accept: str, offered: list[str]) -> APIError:
    shown = accept if len(accept) <= 200 else accept[:200] + "…"
    return APIError(406, "not_acceptable", f"accept: must be one of {', '.join(offered)}, got {shown}", "accept")


def _limited(body: bytes) -> bytes:
    limit = int(float(os.environ.get("S1_MINI_MAX_RESPONSE_MB", "0")) * 1024 * 1024) or REALTIME_RESPONSE_LIMIT
    if len(body) > limit:
        raise APIError(413, "response_too_large",
                       f"response: {len(body)} bytes exceeds the {limit}-byte limit of a real-time invocation; "
                       "use a streaming call (InvokeEndpointWithResponseStream), async inference or batch transform",
                       "text")
    return body
