"""Limits on a second real server: API key, body size, text length, open streams,
engine overload; flags override environment variables; a bad checkpoint exits 1."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from server_utils import ROOT, ServerProcess, tiny_checkpoint

KEY = "s3cret-key"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    env = {"S1_MINI_MAX_TEXT_LENGTH": "50", "S1_MINI_MAX_BATCH_SIZE": "1", "S1_MINI_MAX_QUEUE_SIZE": "0",
           "S1_MINI_MAX_CONCURRENT_STREAMS": "5",  # the flag below wins
           "S1_MINI_API_KEY": "not-this-one"}
    server = ServerProcess(tiny_checkpoint(), "--api-key", KEY, "--max-body-mb", "0.05",
                           "--max-concurrent-streams", "1", "--max-new-tokens", "16", env=env,
                           log_dir=tmp_path_factory.mktemp("guarded"))
    yield server
    server.stop()


def test_api_key(guarded):
    c = guarded.client
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}, {"authorization": "Basic x"},
                    {"authorization": "Bearer not-this-one"}):
        response = c.post("/v1/tts", json={"text": "hi"}, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["error"]["field"] == "authorization"
    assert c.get("/metrics").status_code == 401
    assert c.get("/v1/health").status_code == 401
    assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
    assert c.post("/v1/tts", json={"text": "hi"}, headers=AUTH).status_code == 200


def test_body_size_limit(guarded):
    c = guarded.client
    big = {"text": "hi", "references": [{"audio": "A" * 80_000, "text": "t"}]}
    response = c.post("/v1/tts", json=big, headers=AUTH)
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    assert "0.05 MB" in response.json()["error"]["message"]

    def chunks():  # no content-length: chunked transfer
        for _ in range(10):
            yield b" " * 10_000

    response = c.post("/v1/tts", content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 413
    small = c.post("/v1/tts", content=iter([b'{"text": ', b'"chunked"}']),
                   headers={**AUTH, "content-type": "application/json"})
    assert small.status_code == 200


def test_text_length_from_the_environment(guarded):
    response = guarded.client.post("/v1/tts", json={"text": "x" * 51}, headers=AUTH)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["field"] == "text" and "at most 50" in error["message"]


def test_stream_cap_and_engine_overload(guarded):
    c = guarded.client
    with httpx.Client(base_url=guarded.url, headers=AUTH, timeout=30) as other:
        with other.stream("POST", "/v1/tts/stream", json={"text": "Hold the only slot.", "max_new_tokens": 240,
                                                          "seed": 1}) as first:
            assert first.status_code == 200
            chunks = first.iter_raw()  # keep a reference: a collected iterator closes the connection
            next(chunks)
            second = c.post("/v1/tts/stream", json={"text": "One too many."}, headers=AUTH)
            assert second.status_code == 503 and second.headers["retry-after"] == "1"
            assert "max_concurrent_streams" in second.json()["error"]["message"]
            busy = c.post("/v1/tts", json={"text": "No room in the batch."}, headers=AUTH)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "overloaded"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        response = c.post("/v1/tts", json={"text": "Room again."}, headers=AUTH)
        if response.status_code == 200:
            break
        time.sleep(0.1)
    assert response.status_code == 200


def test_bad_checkpoint_exits_nonzero(tmp_path):
    result = subprocess.run([sys.executable, "-m", "s1_mini.server", "--checkpoint", str(tmp_path / "missing"),
                             "--device", "cpu", "--port", "0"], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "loading the models failed" in result.stderr


def test_bad_option_exits_2():
    result = subprocess.run([sys.executable, "-m", "s1_mini.server", "--max-body-mb", "-1"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and "max_body_mb" in result.stderr
