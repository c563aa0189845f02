"""The short CI load run (bench/load.py) against a real HTTP server process and a real
SageMaker front process on the tiny random checkpoint, plus the harness's own checks.

Timings on a shared 2-core CPU are noise: only correctness is asserted (zero 5xx, zero 4xx,
no transport errors, every success valid audio, RSS growth within a generous bound,
active streams back to 0, the server still answers)."""

from __future__ import annotations

import importlib.util
import io
import struct
import sys

import numpy as np
import pytest
import soundfile as sf
from server_utils import ROOT, ServerProcess, metric_values, tiny_checkpoint
from test_sagemaker_front import TINY_FRAME, Container, extract, model_tar  # noqa: F401 - model_tar is a fixture



def _load_harness():
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_load"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


load = _load_harness()

CLIENTS = 32
DURATION_S = 30
MAX_RSS_GROWTH_MB = 300  # generous: the tiny model's steady state grows a few MB at most

def assert_passed(report: dict) -> None:
    print(load.format_table(report))
    examples = report["examples"]
    assert report["5xx"] == 0, examples
    assert report["4xx"] == 0, examples
    assert report["transport_errors"] == 0, examples
    assert report["invalid_audio"] == 0, examples
    assert report["successes"] == report["requests"] > 0
    # every kind of client ran and succeeded
    assert set(report["by_kind"]) == set(load.KINDS)
    assert all(row["successes"] == row["requests"] for row in report["by_kind"].values())
    assert report["early_disconnects"] > 0
    assert report["rss"]["samples"] >= 5
    assert report["rss"]["growth_after_warmup_mb"] < MAX_RSS_GROWTH_MB
    assert report["passed"], report["failures"]


def _good_wav(content: bytes) -> None:
    audio, rate = sf.read(io.BytesIO(content), dtype="float32")
    assert rate == 44100 and len(audio) > 0 and len(audio) % TINY_FRAME == 0 and np.isfinite(audio).all()


# ----------------------------------------------------------------------------- the loads


@pytest.fixture(scope="module")
def http_server(tmp_path_factory):
    server = ServerProcess(tiny_checkpoint(), "--max-new-tokens", "24", log_dir=tmp_path_factory.mktemp("load-http"))
    yield server
    server.stop()


def test_load_http_server(http_server):
    report = load.run_load(http_server.url, "server", CLIENTS, DURATION_S, seed=0, pid=http_server.process.pid,
                           max_rss_growth_mb=MAX_RSS_GROWTH_MB)
    try:
        assert_passed(report)
        assert report["active_streams_after"] == 0
        # after the load a good request still works and no stream is left open
        r = http_server.client.post("/v1/tts", json={"text": "Still serving after the load.", "seed": 1})
        assert r.status_code == 200, r.text
        _good_wav(r.content)
        assert metric_values(http_server.client.get("/metrics").text)["s1_mini_active_streams"] == 0
    except AssertionError:
        print(http_server.log()[-4000:])
        raise


def test_load_sagemaker_front(model_tar, tmp_path):  # noqa: F811 - pytest fixture
    front = Container(extract(model_tar, tmp_path / "ml"), tmp_path)
    try:
        assert front.pings()[-1] == 200
        report = load.run_load(front.url, "sagemaker", CLIENTS, DURATION_S, seed=1, pid=front.process.pid,
                               max_rss_growth_mb=MAX_RSS_GROWTH_MB)
        assert_passed(report)
        r = front.client.post("/invocations", json={"text": "Still serving after the load.", "seed": 1},
                              headers={"Accept": "audio/wav"})
        assert r.status_code == 200, r.text
        _good_wav(r.content)
        assert front.client.get("/ping").status_code == 200
    except AssertionError:
        print(front.log()[-4000:])
        raise
    finally:
        assert front.stop() == 0, front.log()[-4000:]


# ----------------------------------------------------------------------------- the harness itself


@pytest.mark.parametrize("url", ["http://10.0.0.1:8080", "http://example.com", "http://0.0.0.0:80",
                                 "ftp://127.0.0.1:21", "127.0.0.1:8080", "http://192.168.1.2"])
def test_refuses_non_loopback(url):
    with pytest.raises(ValueError, match="--url"):
        load.check_loopback(url)
    assert load.main(["--url", url, "--kind", "server", "--duration", "1", "--clients", "1"]) == 2


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:9", "http://127.3.2.1"])
def test_accepts_loopback(url):
    load.check_loopback(url)


@pytest.mark.parametrize("clients, duration", [(0, 10), (load.MAX_CLIENTS + 1, 10), (1, 0), (1, load.MAX_DURATION_S + 1)])
def test_bounded_count_and_time(clients, duration):
    with pytest.raises(ValueError):
        load.run_load("http://127.0.0.1:9", "server", clients, duration)


def _wav(samples: int, rate: int = 44100) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(samples, dtype="float32"), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def test_validate_wav():
    assert load.validate_wav(_wav(640), 64) is None
    assert "multiple" in load.validate_wav(_wav(650), 64)
    assert "rate" in load.validate_wav(_wav(640, 22050), 64)
    assert "no samples" in load.validate_wav(_wav(0), 64)
    assert "decodable" in load.validate_wav(b"RIFF garbage", 64)
    buffer = io.BytesIO()
    sf.write(buffer, np.array([np.nan] * 64, dtype="float32"), 44100, format="WAV", subtype="FLOAT")
    assert "finite" in load.validate_wav(buffer.getvalue(), 64)


def _stream_header(rate: int = 44100, bits: int = 16) -> bytes:
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 0xFFFFFFFF, b"WAVE", b"fmt ", 16, 1, 1, rate, rate * 2, 2,
                       bits, b"data", 0xFFFFFFFF)


def test_validate_stream():
    assert load.validate_stream(_stream_header() + b"\0\0" * 128, 64) is None
    assert "no samples" in load.validate_stream(_stream_header(), 64)
    assert "multiple" in load.validate_stream(_stream_header() + b"\0\0" * 100, 64)
    assert "odd" in load.validate_stream(_stream_header() + b"\0" * 129, 64)
    assert "rate" in load.validate_stream(_stream_header(rate=16000) + b"\0\0" * 64, 64)
    assert "16-bit" in load.validate_stream(_stream_header(bits=8) + b"\0\0" * 64, 64)
    assert "header" in load.validate_stream(b"x" * 100, 64)
    assert "header" in load.validate_stream(b"RIFF", 64)


def test_sine_reference_is_a_wav():
    audio, rate = sf.read(io.BytesIO(load.sine_wav()))
    assert rate == 22050 and len(audio) > 1000 and np.abs(audio).max() > 0.3


def test_report_fails_on_5xx_invalid_audio_and_rss_growth():
    ok = load.Result("short", 200, 0.1, 100)
    mb = 1024 * 1024
    flat = [(t, 400 * mb) for t in range(10)]
    common = {"wall": 10, "warmup_s": 2, "max_rss_growth_mb": 50, "active_streams_after": 0, "url": "u",
              "kind": "server", "clients": 1, "duration": 10, "seed": 0, "pid": 1}
    assert load.report([ok], flat, **common)["passed"]
    assert "5xx" in load.report([ok, load.Result("short", 500, 0.1, 10)], flat, **common)["failures"][0]
    bad = load.Result("short", 200, 0.1, 100, invalid="no samples")
    assert "valid audio" in load.report([ok, bad], flat, **common)["failures"][0]
    growing = [(t, (400 + 20 * t) * mb) for t in range(10)]  # 140 MB after warm-up
    assert "RSS grew" in load.report([ok], growing, **common)["failures"][0]
    leak = {**common, "active_streams_after": 2}
    assert "active_streams" in load.report([ok], flat, **leak)["failures"][0]
    table = load.format_table(load.report([ok], flat, **common))
    assert "PASS" in table and "p50" in table


def test_rss_of_this_process():
    import os

    assert load.rss_bytes(os.getpid()) > 10 * 1024 * 1024
    assert load.rss_bytes(2 ** 22 + 7) is None
