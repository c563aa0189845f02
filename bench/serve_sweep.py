"""Concurrent streams over HTTP against a running server: the serving sweep.

    python bench/serve_sweep.py --url http://127.0.0.1:8080 --kind server|sagemaker \
        [--concurrency 1,8,32,64,128] [--voice-seconds 20] [--frames 200] --json OUT.json

What bench/engine_sweep.py measures in-process, measured through the real front ends:
at each concurrency c, c streams at once with unique texts (round and index in each, so
nothing is replayed from a cache), first without a voice, then with one. Per stream:
time to first audio (TTFA: the first byte after the 44-byte WAV header, counted from
sending the request), total time, audio seconds from the bytes received (16-bit mono
44.1 kHz, checked as bench/load.py checks a stream) and the real-time factor
RTF = total / audio. Per round: aggregate audio seconds per second of wall time, TTFA
and RTF p50/p99, how many streams ran faster than real time, errors by status. Before
each round a warm-up round of min(c, 4) streams (new prompt lengths and batch sizes),
left out of the figures.

``--kind server``: ``POST /v1/tts/stream`` (chunked WAV); the voice is registered once
through ``POST /v1/references`` and named by ``reference_id`` (the engine's voice prefix
cache applies). ``--kind sagemaker``: ``POST /invocations`` with
``X-Amzn-SageMaker-Forwarded-Api: InvokeEndpointWithResponseStream``; the front has no
voice registry, so the voice travels inline in every request (``references``: base64 WAV
and transcript), which the output says (``voice_mode``).

The voice is a sine of ``--voice-seconds`` (random-weight models: only speed means
anything). Loopback URLs only. Exit status 0 when no stream failed, 1 when some did (the
JSON is written either way), 2 for bad arguments or a server that is not ready.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import json
import math
import os
import platform
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx


def _load_harness() -> ModuleType:
    """bench/load.py, imported by path (bench/ is no package) so that the loopback check,
    the stream validation, the sine WAV and the percentiles stay in one place."""
    name = "bench_load"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name("load.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


load = _load_harness()

WAV_HEADER = 44
MAX_CONCURRENCY = 1024
VOICE_ID = "serve-sweep-voice"
VOICE_TEXT = "A steady tone, registered once and used for every stream of the round."
VOICE_RATE = 22050  # the reference is resampled to 44.1 kHz by the server; half the bytes to send inline
VOICE_NOTES = {
    "registered": "voice registered once via POST /v1/references and named by reference_id in each request",
    "inline": ("the SageMaker front has no voice registry: the voice is sent inline in every request "
               "(references[0]: base64 WAV + transcript), so each request also uploads, decodes and hashes it "
               "(its codes and, since session 4, its prompt part's K/V come from the engine's caches)"),
}


@dataclass
class Stream:
    status: int | None  # None: transport error or timeout
    total_s: float
    ttfa_s: float | None = None
    audio_s: float = 0.0
    invalid: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.invalid is None


@dataclass
class Target:
    url: str
    kind: str  # "server" | "sagemaker"
    frames: int
    frame_samples: int
    voice_wav: bytes

    def __post_init__(self) -> None:
        # Encoded once: at c = 128 the client would otherwise base64 ~1 MB per request on the clock.
        self.voice_b64 = base64.b64encode(self.voice_wav).decode()

    @property
    def path(self) -> str:
        return "/v1/tts/stream" if self.kind == "server" else "/invocations"

    @property
    def ready_path(self) -> str:
        return "/ready" if self.kind == "server" else "/ping"

    @property
    def voice_mode(self) -> str:
        return "registered" if self.kind == "server" else "inline"

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "audio/wav"}
        if self.kind == "sagemaker":
            headers[load.FORWARDED_API] = load.STREAM_API
        return headers

    def body(self, text: str, seed: int, voice: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"text": text, "format": "wav", "max_new_tokens": self.frames, "seed": seed}
        if voice and self.kind == "server":
            body["reference_id"] = VOICE_ID
        elif voice:
            body["references"] = [{"audio": self.voice_b64, "text": VOICE_TEXT}]
        return body


def stream_text(tag: str, index: int) -> str:
    # Short (the tiny test model has 256 positions) and unique per round and index.
    return f"Round {tag}, stream {index}: the quick brown fox {index * 7919 % 1000} jumps over the lazy dog."


def audio_seconds(data: bytes) -> float:
    """Seconds of PCM after the header, at the header's rate, channels and sample width."""
    channels, rate = struct.unpack_from("<HI", data, 22)
    bits = struct.unpack_from("<H", data, 34)[0]
    return (len(data) - WAV_HEADER) / (channels * bits // 8) / rate


async def one_stream(client: httpx.AsyncClient, target: Target, text: str, seed: int, voice: bool) -> Stream:
    body = target.body(text, seed, voice)
    start = time.perf_counter()
    try:
        async with client.stream("POST", target.path, json=body, headers=target.headers()) as r:
            if r.status_code != 200:
                content = await r.aread()
                return Stream(r.status_code, time.perf_counter() - start,
                              error=content[:300].decode("utf-8", "replace"))
            data = bytearray()
            ttfa = None
            async for chunk in r.aiter_raw():
                data += chunk
                if ttfa is None and len(data) > WAV_HEADER:
                    ttfa = time.perf_counter() - start
            total = time.perf_counter() - start
    except (httpx.TransportError, httpx.TimeoutException) as exc:
        return Stream(None, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}")
    raw = bytes(data)
    result = Stream(200, total, ttfa_s=ttfa)
    result.invalid = load.validate_stream(raw, target.frame_samples)
    if result.invalid is None:
        result.audio_s = audio_seconds(raw)
    return result


def _error_key(s: Stream) -> str:
    if s.status is None:
        return "transport"
    return "invalid_audio" if s.status == 200 else str(s.status)


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1e3


def summarize(streams: list[Stream], wall: float, c: int, voice: bool, voice_mode: str,
              warmup: list[Stream]) -> dict[str, Any]:
    good = [s for s in streams if s.ok]
    ttfa = [s.ttfa_s for s in good if s.ttfa_s is not None]
    rtf = [s.total_s / s.audio_s for s in good if s.audio_s > 0]
    audio = sum(s.audio_s for s in good)
    bad = [s for s in streams if not s.ok]
    by_status: dict[str, int] = {}
    for s in bad:
        by_status[_error_key(s)] = by_status.get(_error_key(s), 0) + 1
    return {
        "concurrency": c, "voice": voice, "voice_mode": voice_mode if voice else "none",
        "streams": len(streams), "ok": len(good), "wall_s": wall, "audio_s": audio,
        "audio_s_per_s": audio / wall if wall > 0 else None,
        "ttfa_p50_ms": _ms(load.percentile(ttfa, 0.5)), "ttfa_p99_ms": _ms(load.percentile(ttfa, 0.99)),
        "rtf_p50": load.percentile(rtf, 0.5), "rtf_p99": load.percentile(rtf, 0.99),
        "streams_real_time": sum(r < 1 for r in rtf),
        "errors": len(bad), "errors_by_status": dict(sorted(by_status.items())),
        "error_examples": [asdict(s) for s in bad[:3]],
        "warmup_streams": len(warmup), "warmup_errors": sum(not s.ok for s in warmup),
    }


async def run_round(client: httpx.AsyncClient, target: Target, c: int, voice: bool, tag: str,
                    seed_base: int) -> tuple[list[Stream], float]:
    start = time.perf_counter()
    streams = await asyncio.gather(*(one_stream(client, target, stream_text(tag, i), seed_base + i, voice)
                                     for i in range(c)))
    return list(streams), time.perf_counter() - start


async def register_voice(client: httpx.AsyncClient, wav: bytes) -> None:
    r = await client.post("/v1/references", data={"id": VOICE_ID, "text": VOICE_TEXT, "overwrite": "true"},
                          files={"audio": ("voice.wav", wav, "audio/wav")})
    if r.status_code not in (200, 201):
        raise RuntimeError(f"registering the voice failed: {r.status_code} {r.text[:300]}")


async def wait_ready(client: httpx.AsyncClient, path: str, timeout: float, pid: int | None) -> float:
    """Seconds until ``path`` answered 200; one try when ``timeout`` is 0."""
    start = time.perf_counter()
    last = "no answer"
    while True:
        if pid is not None:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                raise RuntimeError(f"the server process {pid} exited before it was ready") from None
        try:
            r = await client.get(path, timeout=5.0)
            if r.status_code == 200:
                return time.perf_counter() - start
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.perf_counter() - start >= timeout:
            raise RuntimeError(f"{path} did not answer 200 within {timeout} s (last: {last})")
        await asyncio.sleep(0.5)


async def sweep_async(url: str, kind: str, levels: list[int], *, frames: int = 200, voice_seconds: float = 20.0,
                      frame_samples: int = 2048, request_timeout: float = 600.0, wait_ready_s: float = 0.0,
                      pid: int | None = None, log: Any = print) -> dict[str, Any]:
    load.check_loopback(url)
    if kind not in ("server", "sagemaker"):
        raise ValueError(f"--kind: must be server or sagemaker, got {kind!r}")
    if not levels or any(not 1 <= c <= MAX_CONCURRENCY for c in levels):
        raise ValueError(f"--concurrency: each level must be 1..{MAX_CONCURRENCY}, got {levels}")
    if frames < 2:
        raise ValueError(f"--frames: must be >= 2 (the server refuses max_new_tokens 1), got {frames}")
    if not 0 < voice_seconds < math.inf:
        raise ValueError(f"--voice-seconds: must be a finite number > 0, got {voice_seconds}")
    if frame_samples < 1:
        raise ValueError(f"--frame-samples: must be >= 1, got {frame_samples}")

    target = Target(url, kind, frames, frame_samples, load.sine_wav(voice_seconds, rate=VOICE_RATE))
    # Room for the largest round plus its warm-up never overlapping: one connection per stream,
    # so httpx's pool never queues a stream on the client side and inflates its TTFA.
    limits = httpx.Limits(max_connections=max(levels) + 8, max_keepalive_connections=max(levels) + 8)
    timeout = httpx.Timeout(request_timeout, connect=30.0)
    result: dict[str, Any] = {
        "kind": kind, "url": url, "route": target.path, "frames": frames, "voice_seconds": voice_seconds,
        "frame_samples": frame_samples, "concurrency": levels, "voice_mode": target.voice_mode,
        "voice_note": VOICE_NOTES[target.voice_mode],
        "client": {"python": platform.python_version(), "httpx": httpx.__version__},
        "rounds": [],
    }
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, trust_env=False) as client:
        result["ready_wait_s"] = await wait_ready(client, target.ready_path, wait_ready_s, pid)
        health = await client.get("/health" if kind == "server" else "/ping")
        result["health_before"] = health.json() if health.status_code == 200 else {"status": health.status_code}
        if kind == "server":
            await register_voice(client, target.voice_wav)
        start = time.perf_counter()
        for index, c in enumerate(levels):
            for voice in (False, True):
                tag = f"{c}{'v' if voice else 'n'}"
                seed_base = (2 * index + voice) * 10_000
                warmup, _ = await run_round(client, target, min(c, 4), voice, f"{tag}-warm", seed_base + 5_000)
                streams, wall = await run_round(client, target, c, voice, tag, seed_base)
                row = summarize(streams, wall, c, voice, target.voice_mode, warmup)
                log(json.dumps(row))
                result["rounds"].append(row)
        result["sweep_s"] = time.perf_counter() - start
        health = await client.get("/health" if kind == "server" else "/ping")
        result["health_after"] = health.json() if health.status_code == 200 else {"status": health.status_code}
    result["errors_total"] = sum(r["errors"] for r in result["rounds"])
    return result


def sweep(url: str, kind: str, levels: list[int], **kwargs: Any) -> dict[str, Any]:
    """The sweep in a fresh event loop; returns what ``--json`` writes."""
    return asyncio.run(sweep_async(url, kind, levels, **kwargs))


def format_table(result: dict[str, Any]) -> str:
    def f(x: Any, digits: int = 2) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    lines = [f"{result['kind']} {result['url']}{result['route']}  frames={result['frames']}  "
             f"voice: {result['voice_note']}",
             "| c | voice | audio s/s | TTFA p50 / p99 ms | per-stream RTF p50 / p99 | streams real-time | errors |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rounds"]:
        errors = f"{r['errors']} {r['errors_by_status']}" if r["errors"] else "0"
        lines.append(f"| {r['concurrency']} | {'yes' if r['voice'] else 'no'} | {f(r['audio_s_per_s'], 1)} | "
                     f"{f(r['ttfa_p50_ms'], 0)} / {f(r['ttfa_p99_ms'], 0)} | {f(r['rtf_p50'])} / {f(r['rtf_p99'])} | "
                     f"{r['streams_real_time']}/{r['streams']} | {errors} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="base URL of the running server (loopback only)")
    p.add_argument("--kind", required=True, choices=["server", "sagemaker"])
    p.add_argument("--concurrency", default="1,8,32,64,128", help="comma-separated stream counts")
    p.add_argument("--frames", type=int, default=200, help="max_new_tokens of every request (random weights "
                   "rarely stop early, so each stream runs this many frames)")
    p.add_argument("--voice-seconds", type=float, default=20.0, help="length of the sine voice (20 s: a ~470-token "
                   "prompt on S1-mini)")
    p.add_argument("--frame-samples", type=int, default=2048, help="samples per codec frame, to check the streams "
                   "(S1-mini: 2048; the tiny test codec: 64)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per stream")
    p.add_argument("--wait-ready", type=float, default=0.0, help="poll /ready (server) or /ping (sagemaker) this "
                   "many seconds before starting (0: one try)")
    p.add_argument("--pid", type=int, help="the server's process: stop waiting if it exits")
    p.add_argument("--json", dest="json_out", required=True, help="write the result here")
    args = p.parse_args(argv)
    try:
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        print(f"error: --concurrency: must be comma-separated integers, got {args.concurrency!r}", file=sys.stderr)
        return 2
    try:
        result = sweep(args.url, args.kind, levels, frames=args.frames, voice_seconds=args.voice_seconds,
                       frame_samples=args.frame_samples, request_timeout=args.request_timeout,
                       wait_ready_s=args.wait_ready, pid=args.pid)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    Path(args.json_out).write_text(json.dumps(result, indent=1))
    print(format_table(result))
    return 1 if result["errors_total"] else 0


if __name__ == "__main__":
    sys.exit(main())
