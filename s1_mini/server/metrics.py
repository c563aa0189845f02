"""Prometheus metrics, in a registry owned by one app (no process-wide globals)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
FIRST_AUDIO_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RTF_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0)


class Metrics:
    """Synthesis counters and histograms, updated by the request handlers, and engine
    gauges, refreshed from ``engine.health_check()`` at each scrape."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("s1_mini_requests", "Synthesis requests received", registry=r)
        self.success = Counter("s1_mini_requests_success", "Synthesis requests that returned audio", registry=r)
        self.errors = Counter("s1_mini_requests_error", "Synthesis requests that failed", registry=r)
        self.errors_by_code = Counter("s1_mini_request_errors_by_code", "Failed synthesis requests by error code",
                                      ["code"], registry=r)
        self.http = Counter("s1_mini_http_requests", "HTTP requests by route and status",
                            ["method", "route", "status"], registry=r)
        self.duration = Histogram("s1_mini_request_duration_seconds", "Synthesis request duration",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.first_audio = Histogram("s1_mini_time_to_first_audio_seconds",
                                     "Time from request to the first audio bytes sent (streams)",
                                     buckets=FIRST_AUDIO_BUCKETS, registry=r)
        self.rtf = Histogram("s1_mini_real_time_factor",
                             "Processing seconds per second of audio produced (below 1: faster than real time)",
                             buckets=RTF_BUCKETS, registry=r)
        self.audio_seconds = Counter("s1_mini_audio_seconds", "Seconds of audio produced", registry=r)
        self.vram = Gauge("s1_mini_vram_utilization", "GPU memory used / total (0 on the CPU)", registry=r)
        self.ready = Gauge("s1_mini_ready", "1 once the models are loaded and warmed up", registry=r)
        self.queue_depth = Gauge("s1_mini_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.active_streams = Gauge("s1_mini_active_streams", "Streaming responses open", registry=r)
        self.engine_streams = Gauge("s1_mini_engine_streams", "Streaming requests in the running batch", registry=r)
        self.batch_size = Gauge("s1_mini_batch_size", "Sequences in the running batch", registry=r)
        self.kv_slots_used = Gauge("s1_mini_kv_slots_used", "KV-cache slots in use", registry=r)
        self.kv_slots_total = Gauge("s1_mini_kv_slots_total", "KV-cache slots", registry=r)
        self.kv_utilization = Gauge("s1_mini_kv_cache_utilization", "KV-cache slots used / total", registry=r)
        self.decode_steps = Gauge("s1_mini_decode_steps", "Batched decode steps run since start", registry=r)

    def observe_success(self, seconds: float, timings: Any = None) -> None:
        self.success.inc()
        self.duration.observe(seconds)
        audio = getattr(timings, "audio_seconds", 0.0) or 0.0
        if audio > 0:
            self.audio_seconds.inc(audio)
            self.rtf.observe(seconds / audio)

    def observe_error(self, seconds: float, code: str) -> None:
        self.errors.inc()
        self.errors_by_code.labels(code).inc()
        self.duration.observe(seconds)

    def refresh(self, health: dict[str, Any] | None, ready: bool, open_streams: int, slots_total: int) -> None:
        self.ready.set(1 if ready else 0)
        self.active_streams.set(open_streams)
        if not health:
            return
        vram = health.get("vram") or {}
        total = vram.get("total_gb") or 0
        self.vram.set((vram.get("used_gb") or 0) / total if total else 0.0)
        active = int(health.get("active", 0))
        self.queue_depth.set(int(health.get("queue_depth", 0)))
        self.engine_streams.set(int(health.get("streams", 0)))
        self.batch_size.set(active)
        self.decode_steps.set(int(health.get("steps", 0)))
        used = int(health.get("kv_slots_used", active))
        total_slots = int(health.get("kv_slots_total", slots_total))
        self.kv_slots_used.set(used)
        self.kv_slots_total.set(total_slots)
        self.kv_utilization.set(used / total_slots if total_slots else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
