"""From a validated request to audio bytes: reference handling, the engine call, error
mapping, metrics, and streaming with a per-process cap on open streams."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import Request
from starlette.responses import StreamingResponse

from s1_mini.scheduler import ErrorCode, TTSError
from s1_mini.server.audio_formats import PCM_FORMAT, AudioFormat, StreamEncoder, encode
from s1_mini.server.errors import APIError, from_engine, from_tts_error
from s1_mini.server.metrics import Metrics
from s1_mini.voices import VoiceError, VoiceNotFound

log = logging.getLogger("s1_mini.server")
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks for a gone client


@dataclass
class Job:
    """One synthesis request in engine terms, plus how to name its fields in errors."""

    text: str
    params: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, ... for the engine
    reference_id: str | None = None
    references: list[tuple[bytes, str]] = field(default_factory=list)  # inline (audio, transcript) pairs
    fields: dict[str, str] = field(default_factory=dict)  # engine name -> API field name
    warnings: list[str] = field(default_factory=list)

    def kwargs(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.params.items() if v is not None}, "reference_id": self.reference_id,
                "references": self.references or None}


def sampling(body: Any) -> dict[str, Any]:
    seed = body.seed
    return {"temperature": body.temperature, "top_p": body.top_p, "repetition_penalty": body.repetition_penalty,
            "max_new_tokens": body.max_new_tokens, "seed": None if seed is None else abs(seed)}


class StreamAborted(Exception):
    """A response that broke off after its headers were sent (the engine failed, or the
    upstream engine of the router went away). Raised out of the body iterator so that
    uvicorn closes the connection without the final empty chunk: the client sees an
    incomplete chunked response, an error every HTTP client reports, instead of an end
    that looks complete (a streamed WAV's header is open-ended, raw PCM has none)."""


async def unless_disconnected(request: Request | None, awaitable: Awaitable[Any]) -> Any:
    """The result of ``awaitable``, unless the client disconnects first: then it is
    cancelled and a 499 ``cancelled`` APIError raised. (Starlette does not cancel a route
    whose client left, so a waiting route has to look for itself.)"""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if request is not None and await request.is_disconnected():
                raise APIError(499, ErrorCode.CANCELLED, "the client disconnected", None)
    finally:
        if not task.done():
            task.cancel()


class ManagedStream(StreamingResponse):
    """A StreamingResponse that always runs ``on_close``, even when it is cancelled
    before its body iterator ever starts (the iterator's own ``finally`` would not), and
    that ends a body that raises :class:`StreamAborted` by closing the connection."""

    def __init__(self, *args: Any, on_close: Callable[[], Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except StreamAborted:
            # Logged where it happened (with its reason). Returning without the final
            # chunk makes uvicorn close the connection, as raising would, with one log
            # line ("returned without completing response") instead of a traceback.
            return
        finally:
            await self._on_close()


class Synthesizer:
    def __init__(self, engine: Any, metrics: Metrics, max_streams: int, retry_after: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_streams = max_streams
        self.retry_after = retry_after
        self.open_streams = 0

    # ------------------------------------------------------------------ checks

    @contextmanager
    def counting_rejects(self) -> Iterator[None]:
        """Count a request refused while reading its body as a failed synthesis request."""
        try:
            yield
        except APIError as exc:
            self.metrics.requests.inc()
            self.metrics.observe_error(0.0, exc.code)
            raise

    def require_ready(self) -> None:
        if not getattr(self.engine, "ready", False):
            raise APIError(503, ErrorCode.STOPPED, "the models are still loading (see GET /ready)", None,
                           {"Retry-After": str(max(self.retry_after, 1))})

    async def prepare(self, job: Job) -> None:
        """Checks that are cheap here and costly later, and the inline reference encoded
        in a worker thread (the engine would encode it on the event loop)."""
        self.require_ready()
        limit = self.engine.config.max_text_length
        if len(job.text) > limit:
            field = job.fields.get("text", "text")
            raise APIError(400, ErrorCode.INVALID, f"{field}: must be at most {limit} characters, got {len(job.text)} "
                           "(max_text_length)", field)
        if job.reference_id is not None:
            try:
                self.engine.voices.get(job.reference_id)
            except VoiceNotFound as exc:
                raise from_engine(ErrorCode.NOT_FOUND, str(exc), job.fields) from None
            except VoiceError as exc:
                raise from_engine(ErrorCode.INVALID, str(exc), job.fields) from None
        for i, (audio, text) in enumerate(job.references):
            try:
                await asyncio.to_thread(self.engine.voices.encode_inline, audio, text)
            except VoiceError as exc:
                raise _reference_error(str(exc), f"references[{i}]") from None
            except Exception:  # noqa: BLE001 -- undecodable uploads can fail deep in the decoders
                log.warning("reference audio could not be encoded", exc_info=True)
                raise APIError(422, ErrorCode.INVALID, f"references[{i}].audio: could not be decoded and encoded "
                               "as audio", f"references[{i}].audio") from None

    # ------------------------------------------------------------------ whole files

    async def synthesize(self, job: Job, fmt: AudioFormat,
                         request: Request | None = None) -> tuple[bytes, int, Any]:
        """(body, sample rate, timings); raises APIError. A client that disconnects
        while it waits cancels the request (its batch slot is freed)."""
        start = time.perf_counter()
        self.metrics.requests.inc()
        try:
            await self.prepare(job)
            response = await self._generate(job, request)
            if not response.success:
                raise from_engine(response.error_code or ErrorCode.INTERNAL, response.error or "failed", job.fields,
                                  self.retry_after)
            rate, audio = response.audio
            body, out_rate = await asyncio.to_thread(encode, audio, rate, fmt)
        except APIError as exc:
            self.metrics.observe_error(time.perf_counter() - start, exc.code)
            raise
        except Exception:
            self.metrics.observe_error(time.perf_counter() - start, ErrorCode.INTERNAL)
            raise
        self.metrics.observe_success(time.perf_counter() - start, response.timings)
        return body, out_rate, response.timings

    async def _generate(self, job: Job, request: Request | None) -> Any:
        # Cancelling agenerate cancels the engine request, which frees its batch slot.
        return await unless_disconnected(request, self.engine.agenerate(job.text, **job.kwargs()))

    # ------------------------------------------------------------------ streams

    async def stream(self, job: Job, fmt: AudioFormat, headers: dict[str, str],
                     out_rate: int | None = None, sse: bool = False, with_header: bool = True) -> StreamingResponse:
        """Start generating, wait for the first chunk (so bad input still gets a 4xx
        status), then stream. A client that goes away cancels the request."""
        start = time.perf_counter()
        self.metrics.requests.inc()
        if self.open_streams >= self.max_streams:
            self.metrics.observe_error(0.0, ErrorCode.OVERLOADED)
            raise APIError(503, ErrorCode.OVERLOADED,
                           f"too many open streams ({self.max_streams}, max_concurrent_streams); retry later",
                           None, {"Retry-After": str(self.retry_after)})
        self.open_streams += 1
        state = {"closed": False, "ok": False, "code": ErrorCode.CANCELLED, "audio": 0.0}
        generator = None

        async def close() -> None:
            if state["closed"]:
                return
            state["closed"] = True
            self.open_streams -= 1
            if generator is not None:
                try:
                    await generator.aclose()  # cancels the engine request, frees its batch slot
                except RuntimeError:  # still running in a task being torn down: it cancels itself
                    log.debug("stream generator busy at close", exc_info=True)
            elapsed = time.perf_counter() - start
            if state["ok"]:
                self.metrics.success.inc()
                self.metrics.duration.observe(elapsed)
                if state["audio"] > 0:
                    self.metrics.audio_seconds.inc(state["audio"])
                    self.metrics.rtf.observe(elapsed / state["audio"])
            else:
                self.metrics.observe_error(elapsed, state["code"])

        try:
            await self.prepare(job)
            generator = self.engine.agenerate_stream(job.text, **job.kwargs())
            try:
                first = await generator.__anext__()
            except StopAsyncIteration:
                first = np.zeros(0, dtype=np.float32)
        except TTSError as exc:
            state["code"] = exc.code
            await close()
            raise from_tts_error(exc, job.fields, self.retry_after) from None
        except APIError as exc:
            state["code"] = exc.code
            await close()
            raise
        except BaseException:
            state["code"] = ErrorCode.INTERNAL
            await close()
            raise
        rate = self.engine.sample_rate
        encoder = StreamEncoder(fmt, rate, out_rate)

        async def body() -> AsyncIterator[bytes]:
            sent_first = False
            audio_samples = 0

            def piece(chunk: np.ndarray) -> bytes:
                nonlocal sent_first, audio_samples
                audio_samples += len(chunk)
                data = encoder.chunk(chunk)
                if data and not sent_first:
                    sent_first = True
                    self.metrics.first_audio.observe(time.perf_counter() - start)
                return _sse_delta(data) if sse and data else data

            try:
                if with_header and not sse:
                    yield encoder.header()
                data = piece(first)
                if data:
                    yield data
                # A client that leaves is noticed by Starlette, which listens for the
                # disconnect beside this body and cancels it (the engine request with it):
                # no check per chunk (request.is_disconnected() cost 37 us a chunk, three
                # times the rest of a chunk's way through uvicorn).
                async for chunk in generator:
                    data = piece(chunk)
                    if data:
                        yield data
                tail = encoder.flush()
                if tail:
                    yield _sse_delta(tail) if sse else tail
                if sse:
                    yield _sse({"type": "speech.audio.done", "usage": {"input_tokens": 0, "output_tokens": 0,
                                                                      "total_tokens": 0}})
                state["ok"] = True
                state["audio"] = audio_samples / rate
            except TTSError as exc:  # after the headers: the status cannot say it any more
                state["code"] = exc.code
                if sse:  # an event stream can say it in band; a client sees no speech.audio.done either
                    log.warning("stream ended early: %s (%s)", exc.message, exc.code)
                    yield _sse({"type": "error", "error": {"code": exc.code, "message": exc.message}})
                    return
                log.warning("stream aborted after %.2f s of audio: %s (%s); closing the connection",
                            audio_samples / rate, exc.message, exc.code)
                raise StreamAborted(f"{exc.code}: {exc.message}") from None
            finally:
                await close()

        media = "text/event-stream" if sse else fmt.media_type
        headers = {**headers, "X-Sample-Rate": str(encoder.target_rate), "X-Audio-Channels": "1",
                   "X-Audio-Format": PCM_FORMAT, "Cache-Control": "no-store"}
        return ManagedStream(body(), media_type=media, headers=headers, on_close=close)


def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def _sse_delta(data: bytes) -> bytes:
    return _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})


def _reference_error(message: str, prefix: str) -> APIError:
    """A registry message about one inline reference ("audio: ..." or "text: ...")."""
    error = from_engine(ErrorCode.INVALID, message, {"audio": f"{prefix}.audio", "text": f"{prefix}.text",
                                                     "sample_rate": f"{prefix}.audio"})
    if error.field is None:
        error.field = f"{prefix}.audio"
        error.message = f"{prefix}.audio: {error.message}"
    if error.status != 413:  # a limit (max_reference_seconds) stays 413, as on /v1/references
        error.status = 422
    return error
