"""The app with a fake engine (in process, no model): engine failures map to the right
status, loading and failed loads show in /health and /ready, nothing leaks internals."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from s1_mini.config import EngineConfig
from s1_mini.engine import TTSResponse
from s1_mini.scheduler import ErrorCode, Timings, TTSError
from s1_mini.server import ServerOptions, create_app
from s1_mini.server.__main__ import build_parser
from s1_mini.server.audio_formats import KNOWN, StreamEncoder, encode, streaming_wav_header
from s1_mini.server.errors import location


class FakeEngine:
    sample_rate = 44100

    def __init__(self, config, outcome=None, start_error=None, gate=None):
        self.config = config
        self.ready = False
        self.voices = None
        self.outcome = outcome
        self.start_error = start_error
        self.gate = gate
        self.stopped = False

    def start(self):
        if self.gate is not None:
            self.gate.wait(10)
        if self.start_error:
            raise self.start_error
        self.ready = True

    def stop(self):
        self.stopped = True

    def health_check(self):
        return {"healthy": self.ready, "models_loaded": self.ready, "device": "cpu", "vram": {"used_gb": 0.0,
                                                                                             "total_gb": 0.0},
                "queue_depth": 0, "active": 0, "streams": 0, "steps": 0}

    async def agenerate(self, text, **kwargs):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        if self.outcome is not None:
            code, message = self.outcome
            return TTSResponse(False, error=message, error_code=code)
        return TTSResponse(True, audio=(44100, np.zeros(128, np.float32)), timings=Timings(frames=2))

    async def agenerate_stream(self, text, **kwargs):
        if self.outcome is not None and not isinstance(self.outcome, BaseException):
            raise TTSError(*self.outcome)
        yield np.zeros(64, np.float32)


def app_with(**engine_kwargs):
    config = EngineConfig(checkpoint_path="unused", device="cpu", precision="float32")
    engines = []

    def factory(cfg):
        engines.append(FakeEngine(cfg, **engine_kwargs))
        return engines[0]

    return create_app(config, ServerOptions(), engine_factory=factory), engines


@pytest.mark.parametrize("code, status, retry", [
    (ErrorCode.TIMEOUT, 504, False), (ErrorCode.OUT_OF_MEMORY, 503, True), (ErrorCode.OVERLOADED, 503, True),
    (ErrorCode.STOPPED, 503, True), (ErrorCode.NO_AUDIO, 500, False), (ErrorCode.INTERNAL, 500, False),
    (ErrorCode.NOT_FOUND, 404, False), (ErrorCode.INVALID, 400, False),
])
def test_engine_errors_map_to_statuses(code, status, retry):
    app, _ = app_with(outcome=(code, "secret internal detail" if code == ErrorCode.INTERNAL else "text: broken"))
    with TestClient(app) as client:
        for path in ("/v1/tts", "/v1/tts/stream"):
            response = client.post(path, json={"text": "hi"})
            assert response.status_code == status, (path, response.text)
            assert ("retry-after" in response.headers) == retry
            error = response.json()["error"]
            assert error["code"] == code and "secret" not in response.text


def test_unexpected_exception_is_a_plain_500():
    app, _ = app_with(outcome=RuntimeError("boom /internal/path"))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/v1/tts", json={"text": "hi"})
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "internal_error"
        assert "boom" not in response.text and "Traceback" not in response.text


def test_loading_then_ready():
    gate = threading.Event()
    app, engines = app_with(gate=gate)
    with TestClient(app) as client:
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "loading" and "retry-after" in ready.headers
        assert client.get("/health").json()["status"] == "loading"
        busy = client.post("/v1/tts", json={"text": "hi"})
        assert busy.status_code == 503 and "loading" in busy.json()["error"]["message"]
        assert client.get("/v1/references").status_code == 503
        gate.set()
        for _ in range(100):
            if client.get("/ready").status_code == 200:
                break
            threading.Event().wait(0.02)
        assert client.get("/ready").json() == {"status": "ready"}
        assert client.post("/v1/tts", json={"text": "hi"}).status_code == 200
    assert engines[0].stopped


def test_failed_load_is_reported():
    failures = []
    config = EngineConfig(checkpoint_path="unused", device="cpu", precision="float32")
    app = create_app(config, engine_factory=lambda c: FakeEngine(c, start_error=FileNotFoundError("no model.pth")),
                     on_load_failure=failures.append)
    with TestClient(app) as client:
        for _ in range(100):
            if failures:
                break
            threading.Event().wait(0.02)
        health = client.get("/health")
        assert health.status_code == 503 and "no model.pth" in health.json()["error"]
        assert client.get("/ready").json()["status"] == "failed"
    assert isinstance(failures[0], FileNotFoundError)


def test_metrics_have_no_globals():
    first, _ = app_with()
    second, _ = app_with()
    with TestClient(first) as a, TestClient(second) as b:
        a.post("/v1/tts", json={"text": "hi"})
        assert "s1_mini_requests_total 1.0" in a.get("/metrics").text
        assert "s1_mini_requests_total 0.0" in b.get("/metrics").text


# ---------------------------------------------------------------- small pieces


def test_streaming_wav_header_reads_to_the_end():
    import io

    import soundfile as sf

    encoder = StreamEncoder(KNOWN["wav"], 44100)
    data = encoder.header() + encoder.chunk(np.full(100, 0.5, np.float32)) + encoder.chunk(np.ones(28, np.float32))
    assert data[:44] == streaming_wav_header(44100)
    audio, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == 44100 and len(audio) == 128 and audio[-1] == 32767  # clipped, not wrapped


def test_opus_is_resampled_to_48k_and_pcm_to_24k_stream():
    body, rate = encode(np.zeros(4410, np.float32), 44100, KNOWN["opus"])
    assert rate == 48000 and body[:4] == b"OggS"
    encoder = StreamEncoder(KNOWN["pcm"], 44100, 24000)
    out = b"".join(encoder.chunk(np.zeros(441, np.float32)) for _ in range(10)) + encoder.flush()
    assert abs(len(out) // 2 - 2400) <= 2


def test_error_locations():
    assert location(("body", "references", 0, "audio")) == "references[0].audio"
    assert location(("path", "voice_id")) == "voice_id"


def test_cli_flags():
    args = vars(build_parser().parse_args(["--checkpoint", "ck", "--no-compile", "--port", "9000",
                                           "--max-concurrent-streams", "3"]))
    assert args["checkpoint_path"] == "ck" and args["compile_model"] is False and args["port"] == 9000
    assert args["max_concurrent_streams"] == 3 and args["device"] is None  # unset flags leave env/defaults
    options = ServerOptions.from_env({"S1_MINI_PORT": "7000", "S1_MINI_API_KEY": "k"}, port=9000)
    assert options.port == 9000 and options.api_key == "k"
