"""Load harness: N concurrent clients of mixed kinds against a running S1-mini server.

    python bench/load.py --url http://127.0.0.1:8080 --kind server --clients 32 --duration 60 \
        --pid <server pid> [--seed 0] [--json out.json]

``--kind server`` drives the HTTP server (``/v1/tts``, ``/v1/tts/stream``; a voice is
registered at start through ``/v1/references``); ``--kind sagemaker`` drives the SageMaker
front's ``/invocations`` (streaming through ``X-Amzn-SageMaker-Forwarded-Api:
InvokeEndpointWithResponseStream``; voices inline only).

Each client picks request kinds deterministically from ``--seed`` (short text, long text,
streamed, streamed with an early disconnect after the first chunk, inline reference audio,
registered voice id) until ``--duration`` seconds have passed (in-flight requests finish,
each bounded by ``--request-timeout``) or ``--max-requests`` were sent. Every success is
checked as audio. The RSS of ``--pid`` (and its child processes) is sampled over the run.

Pass: zero 5xx, zero 4xx (the mixed load sends only valid requests), zero transport errors
or timeouts, zero invalid audio, RSS growth after warm-up (the first 20% of the run) below
``--max-rss-growth-mb``. The exit code is 1 when a criterion fails, 2 for bad arguments.

Loopback only: other hosts are refused. ``run_load(...)`` is the same thing in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import ipaddress
import json
import math
import os
import random
import statistics
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

SAMPLE_RATE = 44100
MAX_CLIENTS = 512
MAX_DURATION_S = 4 * 3600
STREAM_API = "InvokeEndpointWithResponseStream"
FORWARDED_API = "X-Amzn-SageMaker-Forwarded-Api"

SHORT_TEXTS = ["Hello there.", "A short sentence.", "Good morning to you.", "Testing one two three.",
               "The quick brown fox.", "Short and sweet."]
LONG_TEXTS = [
    ("The weather was calm that morning. Boats drifted slowly across the harbour. "
     "A gull called from the pier, and somewhere a bell rang twice. Then the wind came back."),
    ("Reliability is a habit, not an event. Every request should finish or fail cleanly. "
     "Memory should stay flat once the server has warmed up. Streams should end when clients leave."),
    ("She opened the old book and read the first line aloud. The words were strange but familiar. "
     "By the third page the room had gone quiet. Nobody wanted her to stop reading."),
]

# kind -> weight; the sagemaker front has no voice registry, so "voice_id" becomes inline there
KINDS = {"short": 3, "long": 2, "stream": 2, "stream_early": 1, "voice_inline": 1, "voice_id": 1,
         "stream_voice": 1}


# ----------------------------------------------------------------------------- helpers


def check_loopback(url: str) -> None:
    """Refuse anything but http(s) to a loopback address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--url: must be http(s)://HOST:PORT, got {url!r}")
    host = parts.hostname
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"--url: only loopback hosts (127.0.0.0/8, ::1, localhost) are allowed, got {host!r}")


def sine_wav(seconds: float = 0.25, rate: int = 22050, hz: float = 220.0) -> bytes:
    """A short 16-bit mono sine WAV (the inline reference voice)."""
    n = int(seconds * rate)
    pcm = b"".join(struct.pack("<h", int(0.4 * 32767 * math.sin(2 * math.pi * hz * i / rate))) for i in range(n))
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(pcm), b"WAVE", b"fmt ", 16, 1, 1, rate,
                         rate * 2, 2, 16, b"data", len(pcm))
    return header + pcm


def validate_wav(data: bytes, frame_samples: int) -> str | None:
    """None if ``data`` is a valid complete WAV answer, else why not."""
    import numpy as np
    import soundfile as sf

    try:
        audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    except Exception as exc:  # noqa: BLE001 - any decode failure is invalid audio
        return f"not decodable: {exc}"
    if rate != SAMPLE_RATE:
        return f"sample rate {rate} != {SAMPLE_RATE}"
    if len(audio) == 0:
        return "no samples"
    if len(audio) % frame_samples:
        return f"{len(audio)} samples is not a multiple of {frame_samples}"
    if not np.isfinite(audio).all():
        return "non-finite samples"
    return None


def validate_stream(data: bytes, frame_samples: int) -> str | None:
    """A streamed WAV: a 44-byte header (sizes unknown) then 16-bit mono PCM."""
    if len(data) < 44:
        return f"only {len(data)} bytes (no full header)"
    riff, _, wave, fmt, _, codec, channels, rate, _, _, bits, data_tag, _ = struct.unpack(
        "<4sI4s4sIHHIIHH4sI", data[:44])
    if (riff, wave, fmt, data_tag) != (b"RIFF", b"WAVE", b"fmt ", b"data"):
        return "bad WAV header"
    if (codec, channels, bits) != (1, 1, 16):
        return f"not 16-bit mono PCM: codec {codec}, {channels} channels, {bits} bits"
    if rate != SAMPLE_RATE:
        return f"sample rate {rate} != {SAMPLE_RATE}"
    pcm = data[44:]
    if len(pcm) % 2:
        return "odd PCM byte count"
    samples = len(pcm) // 2
    if samples == 0:
        return "no samples"
    if samples % frame_samples:
        return f"{samples} samples is not a multiple of {frame_samples}"
    return None  # int16 samples are always finite


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# ----------------------------------------------------------------------------- RSS


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def rss_bytes(pid: int, children: bool = True) -> int | None:
    """RSS of ``pid`` (plus its descendants), psutil if installed, else /proc."""
    try:
        import psutil  # type: ignore[import-not-found]
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            procs = [proc, *(proc.children(recursive=True) if children else [])]
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            return total
        except psutil.Error:
            return None
    pids, total, seen = [pid], 0, set()
    while pids:
        p = pids.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            if p == pid:
                return None
        if children:
            pids += _children(p)
    return total


async def _sample_rss(pid: int, interval: float, start: float, samples: list[tuple[float, int]],
                      stop: asyncio.Event) -> None:
    while True:
        value = await asyncio.to_thread(rss_bytes, pid)
        if value is not None:
            samples.append((time.monotonic() - start, value))
        try:
            await asyncio.wait_for(stop.wait(), interval)
            return
        except asyncio.TimeoutError:
            pass


# ----------------------------------------------------------------------------- requests


@dataclass
class Result:
    kind: str
    status: int | None  # None: transport error or timeout
    latency_s: float
    bytes: int
    ttfb_s: float | None = None
    early_disconnect: bool = False
    invalid: str | None = None
    error: str | None = None


@dataclass
class Plan:
    url: str
    kind: str  # "server" | "sagemaker"
    frame_samples: int
    max_new_tokens: int | None
    voice_id: str | None
    reference: dict[str, str] = field(default_factory=dict)


def _body(plan: Plan, kind: str, rng: random.Random) -> dict[str, Any]:
    text = rng.choice(LONG_TEXTS if kind == "long" else SHORT_TEXTS)
    body: dict[str, Any] = {"text": text, "seed": rng.randrange(1 << 16), "format": "wav"}
    if plan.max_new_tokens:
        body["max_new_tokens"] = plan.max_new_tokens
    if kind in ("voice_inline", "stream_voice") or (kind == "voice_id" and plan.voice_id is None):
        body["references"] = [plan.reference]
    elif kind == "voice_id":
        body["reference_id"] = plan.voice_id
    return body


async def _one(client: httpx.AsyncClient, plan: Plan, kind: str, rng: random.Random) -> Result:
    body = _body(plan, kind, rng)
    streaming = kind.startswith("stream")
    headers = {"Accept": "audio/wav"}
    if plan.kind == "server":
        path = "/v1/tts/stream" if streaming else "/v1/tts"
    else:
        path = "/invocations"
        headers[FORWARDED_API] = STREAM_API if streaming else "InvokeEndpoint"
    start = time.monotonic()
    try:
        if not streaming:
            r = await client.post(path, json=body, headers=headers)
            result = Result(kind, r.status_code, time.monotonic() - start, len(r.content))
            if r.status_code == 200:
                result.invalid = validate_wav(r.content, plan.frame_samples)
            else:
                result.error = r.text[:300]
            return result
        async with client.stream("POST", path, json=body, headers=headers) as r:
            if r.status_code != 200:
                content = await r.aread()
                return Result(kind, r.status_code, time.monotonic() - start, len(content), error=content[:300].decode(
                    "utf-8", "replace"))
            data, ttfb = bytearray(), None
            async for chunk in r.aiter_raw():
                if ttfb is None:
                    ttfb = time.monotonic() - start
                data += chunk
                if kind == "stream_early" and data:
                    break  # leaving the block closes the connection mid-stream
            result = Result(kind, 200, time.monotonic() - start, len(data), ttfb_s=ttfb)
            if kind == "stream_early":
                result.early_disconnect = True
                if len(data) >= 4 and data[:4] != b"RIFF":
                    result.invalid = "first chunk does not start with RIFF"
            else:
                result.invalid = validate_stream(bytes(data), plan.frame_samples)
            return result
    except (httpx.TransportError, httpx.TimeoutException) as exc:
        return Result(kind, None, time.monotonic() - start, 0, error=f"{type(exc).__name__}: {exc}")


async def _client(index: int, client: httpx.AsyncClient, plan: Plan, seed: int, deadline: float,
                  budget: list[int], results: list[Result], kinds: list[str], weights: list[int]) -> None:
    rng = random.Random(seed * 1_000_003 + index)
    while time.monotonic() < deadline and budget[0] > 0:
        budget[0] -= 1
        kind = rng.choices(kinds, weights)[0]
        results.append(await _one(client, plan, kind, rng))


async def _register_voice(client: httpx.AsyncClient, voice_id: str, wav: bytes) -> None:
    r = await client.post("/v1/references", data={"id": voice_id, "text": "A registered load-test voice.",
                                                 "overwrite": "true"},
                          files={"audio": ("voice.wav", wav, "audio/wav")})
    if r.status_code not in (200, 201):
        raise RuntimeError(f"registering voice {voice_id!r} failed: {r.status_code} {r.text[:300]}")


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus exposition (enough for gauges like active streams)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


async def _active_streams_after(client: httpx.AsyncClient, wait_s: float = 15.0) -> float | None:
    """s1_mini_active_streams once it is 0, or its last value after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    value = None
    while True:
        try:
            r = await client.get("/metrics")
            value = parse_metrics(r.text).get("s1_mini_active_streams") if r.status_code == 200 else None
        except httpx.TransportError:
            value = None
        if value == 0 or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.2)


# ----------------------------------------------------------------------------- the run


async def run_load_async(url: str, kind: str, clients: int, duration: float, *, seed: int = 0,
                         pid: int | None = None, frame_samples: int = 64, max_new_tokens: int | None = None,
                         max_requests: int | None = None, request_timeout: float = 120.0,
                         rss_interval: float = 0.5, warmup_fraction: float = 0.2,
                         max_rss_growth_mb: float = 200.0) -> dict[str, Any]:
    check_loopback(url)
    if kind not in ("server", "sagemaker"):
        raise ValueError(f"--kind: must be server or sagemaker, got {kind!r}")
    if not 1 <= clients <= MAX_CLIENTS:
        raise ValueError(f"--clients: must be 1..{MAX_CLIENTS}, got {clients}")
    if not 0 < duration <= MAX_DURATION_S:
        raise ValueError(f"--duration: must be in (0, {MAX_DURATION_S}] seconds, got {duration}")
    if frame_samples < 1:
        raise ValueError(f"--frame-samples: must be >= 1, got {frame_samples}")
    max_requests = max_requests or int(clients * duration * 20) + clients

    wav = sine_wav()
    plan = Plan(url, kind, frame_samples, max_new_tokens,
                voice_id=f"load-voice-{seed}" if kind == "server" else None,
                reference={"audio": base64.b64encode(wav).decode(), "text": "A short reference voice."})
    kinds, weights = list(KINDS), list(KINDS.values())
    results: list[Result] = []
    rss: list[tuple[float, int]] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(request_timeout, connect=10.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, trust_env=False) as client:
        if plan.voice_id:
            await _register_voice(client, plan.voice_id, wav)
        start = time.monotonic()
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_rss(pid, rss_interval, start, rss, stop)) if pid else None
        deadline = start + duration
        budget = [max_requests]
        await asyncio.gather(*(_client(i, client, plan, seed, deadline, budget, results, kinds, weights)
                               for i in range(clients)))
        wall = time.monotonic() - start
        if sampler:
            stop.set()
            await sampler
        active_after = await _active_streams_after(client) if kind == "server" else None
    return report(results, rss, wall=wall, url=url, kind=kind, clients=clients, duration=duration, seed=seed,
                  pid=pid, warmup_s=warmup_fraction * duration, max_rss_growth_mb=max_rss_growth_mb,
                  active_streams_after=active_after)


def run_load(url: str, kind: str, clients: int, duration: float, **kwargs: Any) -> dict[str, Any]:
    """Run the load in a fresh event loop; returns the report (see ``report``)."""
    return asyncio.run(run_load_async(url, kind, clients, duration, **kwargs))


def report(results: list[Result], rss: list[tuple[float, int]], *, wall: float, warmup_s: float,
           max_rss_growth_mb: float, active_streams_after: float | None, **config: Any) -> dict[str, Any]:
    mb = 1024 * 1024
    statuses = [r.status for r in results]
    successes = [r for r in results if r.status == 200]
    complete = [r for r in successes if not r.early_disconnect]
    by_kind: dict[str, dict[str, int]] = {}
    for r in results:
        row = by_kind.setdefault(r.kind, {"requests": 0, "successes": 0})
        row["requests"] += 1
        row["successes"] += r.status == 200
    latencies = [r.latency_s for r in complete]
    ttfbs = [r.ttfb_s for r in successes if r.ttfb_s is not None]
    rss_info: dict[str, Any] = {"samples": len(rss)}
    growth_mb = None
    if rss:
        after = [v for t, v in rss if t >= warmup_s] or [rss[-1][1]]
        base = after[0]
        growth_mb = (max(after) - base) / mb
        rss_info.update(start_mb=rss[0][1] / mb, warm_mb=base / mb, peak_mb=max(v for _, v in rss) / mb,
                        end_mb=rss[-1][1] / mb, growth_after_warmup_mb=growth_mb,
                        series=[(round(t, 2), round(v / mb, 1)) for t, v in rss])
    invalid = [r for r in successes if r.invalid]
    out = {
        "config": {**config, "warmup_s": warmup_s, "max_rss_growth_mb": max_rss_growth_mb},
        "wall_s": round(wall, 2),
        "requests": len(results),
        "successes": len(successes),
        "by_kind": dict(sorted(by_kind.items())),
        "status_counts": {str(k): statuses.count(k) for k in sorted(set(statuses), key=str)},
        "4xx": sum(1 for s in statuses if s is not None and 400 <= s < 500),
        "5xx": sum(1 for s in statuses if s is not None and s >= 500),
        "transport_errors": statuses.count(None),
        "invalid_audio": len(invalid),
        "early_disconnects": sum(r.early_disconnect for r in successes),
        "latency_s": {"p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
                      "max": max(latencies, default=None), "mean": statistics.fmean(latencies) if latencies else None},
        "stream_ttfb_s": {"p50": percentile(ttfbs, 0.5), "p99": percentile(ttfbs, 0.99)},
        "audio_bytes": sum(r.bytes for r in successes),
        "throughput_rps": round(len(results) / wall, 3) if wall > 0 else None,
        "rss": rss_info,
        "active_streams_after": active_streams_after,
        "examples": {
            "errors": [asdict(r) for r in results if r.status != 200][:5],
            "invalid": [asdict(r) for r in invalid][:5],
        },
    }
    failures = []
    if out["5xx"]:
        failures.append(f"{out['5xx']} responses were 5xx")
    if out["4xx"]:
        failures.append(f"{out['4xx']} responses were 4xx (the load sends only valid requests)")
    if out["transport_errors"]:
        failures.append(f"{out['transport_errors']} requests failed in transport or timed out")
    if out["invalid_audio"]:
        failures.append(f"{out['invalid_audio']} successes were not valid audio")
    if not successes:
        failures.append("no request succeeded")
    if growth_mb is not None and growth_mb > max_rss_growth_mb:
        failures.append(f"RSS grew {growth_mb:.1f} MB after warm-up (bound {max_rss_growth_mb} MB)")
    if active_streams_after not in (None, 0):
        failures.append(f"s1_mini_active_streams is {active_streams_after} after the load, not 0")
    out["failures"] = failures
    out["passed"] = not failures
    return out


def format_table(r: dict[str, Any]) -> str:
    def f(x: Any, unit: str = "") -> str:
        return "-" if x is None else f"{x:.3f}{unit}" if isinstance(x, float) else f"{x}{unit}"

    c = r["config"]
    lines = [(f"load: {c['kind']} {c['url']}  clients={c['clients']} duration={c['duration']}s seed={c['seed']} "
              f"wall={r['wall_s']}s"),
             f"{'kind':<14}{'requests':>10}{'successes':>11}"]
    for kind, row in r["by_kind"].items():
        lines.append(f"{kind:<14}{row['requests']:>10}{row['successes']:>11}")
    lines.append(f"{'total':<14}{r['requests']:>10}{r['successes']:>11}")
    rss = r["rss"]
    lines += [
        f"status counts: {r['status_counts']}   4xx={r['4xx']} 5xx={r['5xx']} transport errors={r['transport_errors']}",
        (f"invalid audio: {r['invalid_audio']}   early disconnects: {r['early_disconnects']}   "
         f"throughput: {f(r['throughput_rps'])} req/s"),
        (f"latency (complete answers): p50={f(r['latency_s']['p50'], 's')} p99={f(r['latency_s']['p99'], 's')} "
         f"max={f(r['latency_s']['max'], 's')}   stream TTFB p50={f(r['stream_ttfb_s']['p50'], 's')} "
         f"p99={f(r['stream_ttfb_s']['p99'], 's')}"),
    ]
    if rss.get("samples"):
        lines.append(f"RSS (MB): start={rss['start_mb']:.1f} after warm-up={rss['warm_mb']:.1f} "
                     f"peak={rss['peak_mb']:.1f} end={rss['end_mb']:.1f} growth after warm-up="
                     f"{rss['growth_after_warmup_mb']:.1f} (bound {c['max_rss_growth_mb']}) [{rss['samples']} samples]")
    else:
        lines.append("RSS: not sampled (no --pid)")
    if r["active_streams_after"] is not None:
        lines.append(f"s1_mini_active_streams after the load: {r['active_streams_after']}")
    lines.append("PASS" if r["passed"] else "FAIL: " + "; ".join(r["failures"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="base URL of the server (loopback only)")
    p.add_argument("--kind", required=True, choices=["server", "sagemaker"])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of new requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pid", type=int, help="server process whose RSS (with its children) is sampled")
    p.add_argument("--frame-samples", type=int, default=64, help="samples per codec frame (tiny checkpoint: 64)")
    p.add_argument("--max-new-tokens", type=int, help="sent in every request body (default: the server's)")
    p.add_argument("--max-requests", type=int, help="stop after this many requests (default: bounded by time)")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--max-rss-growth-mb", type=float, default=200.0)
    p.add_argument("--json", dest="json_out", help="write the report here")
    args = p.parse_args(argv)
    try:
        result = run_load(args.url, args.kind, args.clients, args.duration, seed=args.seed, pid=args.pid,
                          frame_samples=args.frame_samples, max_new_tokens=args.max_new_tokens,
                          max_requests=args.max_requests, request_timeout=args.request_timeout,
                          max_rss_growth_mb=args.max_rss_growth_mb)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
