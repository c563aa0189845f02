"""The HTTP server, started for real (``python -m s1_mini.server`` on the tiny random
checkpoint, CPU) and called over HTTP."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time

import httpx
import msgpack
import pytest
import soundfile as sf

from server_utils import metric_values, shared_server, sine_wav

FRAME = 64  # samples per frame of the tiny codec
RATE = 44100


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def client(server):
    return server.client


def metrics(client) -> dict[str, float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return metric_values(response.text)


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"code", "field", "message"} <= set(body["error"]), body
    return body["error"]


# ---------------------------------------------------------------- system routes


def test_ready_health_docs(client):
    assert client.get("/ready").json() == {"status": "ready"}
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["healthy"] and health["models_loaded"] and health["device"] == "cpu"
    assert {"queue_depth", "active", "streams", "vram"} <= set(health)
    assert client.get("/v1/health").json() == {"status": "ok"}
    assert client.post("/v1/health").json() == {"status": "ok"}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/tts", "/v1/tts/stream", "/v1/audio/speech", "/v1/references", "/v1/references/{voice_id}",
                 "/v1/references/add", "/v1/references/list", "/v1/references/delete", "/health", "/ready",
                 "/metrics"):
        assert path in paths


# ---------------------------------------------------------------- /v1/tts


def test_tts_wav_has_frames_times_64_samples(client):
    response = client.post("/v1/tts", json={"text": "Hello world!", "seed": 3})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"
    audio, rate = sf.read(io.BytesIO(response.content), dtype="float32")
    frames = int(response.headers["x-audio-frames"])
    assert rate == RATE and frames > 0 and audio.shape == (frames * FRAME,)


def test_tts_seed_is_deterministic_and_pcm_is_raw(client):
    body = {"text": "Same seed, same audio.", "seed": 11, "format": "pcm", "max_new_tokens": 16}
    first, second = client.post("/v1/tts", json=body), client.post("/v1/tts", json=body)
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    frames = int(first.headers["x-audio-frames"])
    assert len(first.content) == frames * FRAME * 2 and first.headers["x-sample-rate"] == str(RATE)


@pytest.mark.parametrize("fmt", ["flac", "mp3", "opus"])
def test_tts_other_formats_decode(client, fmt):
    response = client.post("/v1/tts", json={"text": "Formats.", "format": fmt, "seed": 1, "max_new_tokens": 16})
    assert response.status_code == 200, response.text
    audio, rate = sf.read(io.BytesIO(response.content))
    assert rate == (48000 if fmt == "opus" else RATE) and len(audio) > 0
    assert response.headers["content-disposition"] == f"attachment; filename=audio.{fmt}"


def test_tts_msgpack_body_with_bytes_reference(client):
    body = {"text": "Msgpack body.", "references": [{"audio": sine_wav(0.05), "text": "a reference"}],
            "max_new_tokens": 12, "seed": 2, "format": "wav"}
    response = client.post("/v1/tts", content=msgpack.packb(body, use_bin_type=True),
                           headers={"content-type": "application/msgpack"})
    assert response.status_code == 200, response.text
    audio, rate = sf.read(io.BytesIO(response.content))
    assert rate == RATE and len(audio) == int(response.headers["x-audio-frames"]) * FRAME


def test_tts_json_base64_references_several(client):
    refs = [{"audio": base64.b64encode(sine_wav(0.02 * (i + 1))).decode(), "text": f"reference {i}"}
            for i in range(2)]
    response = client.post("/v1/tts", json={"text": "Two references.", "references": refs, "max_new_tokens": 12})
    assert response.status_code == 200, response.text


def test_fish_fields_and_their_rules(client):
    fish = {"text": "Fish body.", "chunk_length": 200, "format": "wav", "references": [], "reference_id": None,
            "seed": None, "use_memory_cache": "off", "normalize": True, "streaming": False, "max_new_tokens": 12,
            "top_p": 0.8, "repetition_penalty": 1.1, "temperature": 0.8}
    assert client.post("/v1/tts", json=fish).status_code == 200
    response = client.post("/v1/tts", json={**fish, "chunk_length": 50})
    error = error_of(response)
    assert response.status_code == 422 and error["field"] == "chunk_length"
    assert "fish-speech" in error["message"] and "100 to 300" in error["message"]
    response = client.post("/v1/tts", json={**fish, "repetition_penalty": 2.0})
    assert response.status_code == 422 and "fish-speech" in error_of(response)["message"]
    response = client.post("/v1/tts", json={**fish, "references": [{"audio": "not base64!", "text": "x"}]})
    error = error_of(response)
    assert response.status_code == 422 and error["field"] == "references[0].audio" and "base64" in error["message"]


def test_fish_streaming_true_sends_headerless_pcm(client):
    body = {"text": "Stream the fish way.", "streaming": True, "max_new_tokens": 20, "seed": 5}
    with client.stream("POST", "/v1/tts", json=body) as response:
        assert response.status_code == 200
        data = response.read()
    assert response.headers["x-audio-format"] == "s16le" and response.headers["x-sample-rate"] == str(RATE)
    assert not data.startswith(b"RIFF") and len(data) % (2 * FRAME) == 0 and data


# ---------------------------------------------------------------- streaming


def _timed_stream(client, path, body):
    start = time.perf_counter()
    arrivals, data = [], b""
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        for chunk in response.iter_raw():
            arrivals.append((time.perf_counter() - start, len(chunk)))
            data += chunk
    return response, data, arrivals, time.perf_counter() - start


def test_stream_first_audio_leaves_before_generation_ends(client):
    body = {"text": "A long stream of audio for the timing test.", "max_new_tokens": 200, "seed": 1}
    response, data, arrivals, total = _timed_stream(client, "/v1/tts/stream", body)
    assert response.headers["content-type"] == "audio/wav"
    assert response.headers.get("transfer-encoding") == "chunked"
    assert data[:4] == b"RIFF" and struct.unpack("<I", data[40:44])[0] == 0xFFFFFFFF
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    frames = len(audio) // FRAME
    assert rate == RATE and len(audio) == frames * FRAME and frames >= 30
    # the first audio bytes (after the 44-byte header) arrive long before the last
    first_audio = next(t for t, n in _after_header(arrivals))
    assert len(arrivals) >= 5
    assert first_audio < 0.5 * total, (first_audio, total, arrivals[:5])


def _after_header(arrivals):
    seen = 0
    for t, n in arrivals:
        if seen + n > 44:
            yield t, n
        seen += n


def test_stream_pcm_headers(client):
    response, data, _, _ = _timed_stream(client, "/v1/tts/stream",
                                         {"text": "Raw samples.", "format": "pcm", "max_new_tokens": 20, "seed": 4})
    assert response.headers["content-type"] == "audio/pcm"
    assert response.headers["x-sample-rate"] == str(RATE) and response.headers["x-audio-format"] == "s16le"
    assert len(data) % (2 * FRAME) == 0 and data


def test_stream_bad_input_is_4xx_before_streaming(client):
    response = client.post("/v1/tts/stream", json={"text": "x", "reference_id": "nobody-here"})
    assert response.status_code == 404 and error_of(response)["field"] == "reference_id"
    response = client.post("/v1/tts/stream", json={"text": "x", "format": "mp3"})
    assert response.status_code == 422 and error_of(response)["field"] == "format"
    response = client.post("/v1/tts/stream", json={"text": "x", "max_new_tokens": 1})
    assert response.status_code == 422 and error_of(response)["field"] == "max_new_tokens"


def test_disconnect_mid_stream_frees_the_slot(server, client):
    before = metrics(client)
    cancelled_key = 's1_mini_request_errors_by_code_total{code="cancelled"}'
    with httpx.Client(base_url=server.url, timeout=30) as other:
        with other.stream("POST", "/v1/tts/stream",
                          json={"text": "A long stream that the client abandons.", "max_new_tokens": 240,
                                "seed": 1}) as response:
            assert response.status_code == 200
            chunks = response.iter_raw()
            next(chunks)
            during = metrics(client)
            assert during["s1_mini_active_streams"] == 1
            # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = metrics(client)
        if (now["s1_mini_active_streams"] == 0 and now["s1_mini_batch_size"] == 0
                and now.get(cancelled_key, 0) > before.get(cancelled_key, 0)):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the stream's slot was not freed: {now}")
    assert now["s1_mini_kv_slots_used"] == 0 and now["s1_mini_kv_slots_total"] == 4
    assert client.post("/v1/tts", json={"text": "Still serving.", "max_new_tokens": 8}).status_code == 200


def test_disconnect_while_waiting_for_a_whole_file_cancels_it(server, client):
    key = 's1_mini_request_errors_by_code_total{code="cancelled"}'
    before = metrics(client).get(key, 0)
    with httpx.Client(base_url=server.url, timeout=0.3) as impatient:
        with pytest.raises(httpx.ReadTimeout):  # gives up and closes the connection
            impatient.post("/v1/tts", json={"text": "A long file nobody waits for.", "max_new_tokens": 240,
                                            "seed": 1})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = metrics(client)
        if now.get(key, 0) > before and now["s1_mini_batch_size"] == 0:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the abandoned request was not cancelled: {now}")


def test_concurrent_requests_share_the_batch(client, server):
    results = []

    def one(i):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            results.append(c.post("/v1/tts", json={"text": f"Concurrent {i}.", "max_new_tokens": 16, "seed": i}))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * 6


# ---------------------------------------------------------------- OpenAI


@pytest.fixture(scope="module")
def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_openai_speech_create(openai_client):
    result = openai_client.audio.speech.create(model="s1-mini", voice="alloy", input="Hello from OpenAI.",
                                               response_format="wav", extra_body={"max_new_tokens": 16, "seed": 1})
    audio, rate = sf.read(io.BytesIO(result.content))
    assert rate == RATE and len(audio) > 0 and len(audio) % FRAME == 0
    mp3 = openai_client.audio.speech.create(model="tts-1", voice="default", input="Default format is mp3.",
                                            extra_body={"max_new_tokens": 16})
    assert sf.info(io.BytesIO(mp3.content)).format == "MP3"


def test_openai_streaming_pcm(openai_client):
    arrivals, data = [], b""
    start = time.perf_counter()
    with openai_client.audio.speech.with_streaming_response.create(
            model="s1-mini", voice="default", input="Streaming from the OpenAI client.", response_format="pcm",
            extra_body={"max_new_tokens": 160, "seed": 1}) as response:
        assert response.headers["x-sample-rate"] == "24000"
        for chunk in response.iter_bytes():
            arrivals.append(time.perf_counter() - start)
            data += chunk
    assert len(data) % 2 == 0 and len(data) > 1000 and len(arrivals) >= 2


def test_openai_errors(openai_client):
    import openai

    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.audio.speech.create(model="s1-mini", voice="no-such-voice", input="Hi")
    assert caught.value.body["param"] == "voice"
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        openai_client.audio.speech.create(model="s1-mini", voice="alloy", input="Hi", speed=1.5)
    assert "only 1.0" in caught.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        openai_client.audio.speech.create(model="s1-mini", voice="alloy", input="Hi", response_format="aac")
    assert caught.value.body["param"] == "response_format"


def test_openai_sse(client):
    events = []
    with client.stream("POST", "/v1/audio/speech", json={"model": "s1-mini", "voice": "default", "input": "Events.",
                                                         "response_format": "pcm", "stream_format": "sse",
                                                         "max_new_tokens": 16}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["type"] == "speech.audio.done"
    audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert len(audio) > 0 and len(audio) % 2 == 0


# ---------------------------------------------------------------- voices


def test_voices_rest_and_fish_routes(client):
    wav = sine_wav(0.05)
    files = {"audio": ("voice.wav", wav, "audio/wav")}
    response = client.post("/v1/references", data={"id": "alice", "text": "Alice speaking."}, files=files)
    assert response.status_code == 201, response.text
    assert response.json()["id"] == "alice" and response.json()["frames"] > 0
    again = client.post("/v1/references", data={"id": "alice", "text": "Alice again."}, files=files)
    assert again.status_code == 409 and error_of(again)["field"] == "id"
    replaced = client.post("/v1/references", data={"id": "alice", "text": "Alice again.", "overwrite": "true"},
                           files=files)
    assert replaced.status_code == 201 and replaced.json()["text"] == "Alice again."
    assert "alice" in [v["id"] for v in client.get("/v1/references").json()["voices"]]
    assert client.get("/v1/references/alice").json()["text"] == "Alice again."

    tts = client.post("/v1/tts", json={"text": "With a voice.", "reference_id": "alice", "max_new_tokens": 12})
    assert tts.status_code == 200, tts.text
    speech = client.post("/v1/audio/speech", json={"model": "s1-mini", "voice": "alice", "input": "OpenAI voice.",
                                                   "response_format": "wav", "max_new_tokens": 12})
    assert speech.status_code == 200, speech.text

    # fish-speech's routes: msgpack answers by default, JSON on request
    added = client.post("/v1/references/add", data={"id": "bob", "text": "Bob."},
                        files={"audio": ("b.wav", wav, "audio/wav")})
    assert added.status_code == 200 and added.headers["content-type"] == "application/msgpack"
    assert msgpack.unpackb(added.content) == {"success": True, "message": "Reference voice 'bob' added successfully",
                                              "reference_id": "bob"}
    dup = client.post("/v1/references/add?format=json", json={"id": "bob", "text": "Bob.",
                                                              "audio": base64.b64encode(wav).decode()})
    assert dup.status_code == 409 and dup.json()["success"] is False
    listed = client.get("/v1/references/list", headers={"accept": "application/json"}).json()
    assert listed["success"] and {"alice", "bob"} <= set(listed["reference_ids"])
    spaced = client.post("/v1/references/add?format=json", json={"id": "with space", "text": "x",
                                                                 "audio": base64.b64encode(wav).decode()})
    assert spaced.status_code == 400 and "fish-speech" in spaced.json()["message"]
    deleted = client.request("DELETE", "/v1/references/delete?format=json", json={"reference_id": "bob"})
    assert deleted.status_code == 200 and deleted.json()["success"]
    missing = client.request("DELETE", "/v1/references/delete?format=json", json={"reference_id": "bob"})
    assert missing.status_code == 404 and missing.json()["success"] is False

    assert client.delete("/v1/references/alice").json() == {"id": "alice", "deleted": True}
    gone = client.get("/v1/references/alice")
    assert gone.status_code == 404 and error_of(gone)["code"] == "not_found"
    assert "alice" not in [v["id"] for v in client.get("/v1/references").json()["voices"]]


def test_voice_upload_rules(client):
    not_audio = client.post("/v1/references", data={"id": "carol", "text": "Carol."},
                            files={"audio": ("x.wav", b"this is not audio at all", "audio/wav")})
    assert not_audio.status_code == 422 and error_of(not_audio)["field"] == "audio"
    bad_id = client.post("/v1/references", data={"id": "../etc/passwd", "text": "x"},
                         files={"audio": ("x.wav", sine_wav(), "audio/wav")})
    assert bad_id.status_code == 422 and error_of(bad_id)["field"] == "id"
    reserved = client.post("/v1/references", data={"id": "list", "text": "x"},
                           files={"audio": ("x.wav", sine_wav(), "audio/wav")})
    assert reserved.status_code == 422 and "reserved" in error_of(reserved)["message"]
    path_like = client.get("/v1/references/..%2F..%2Fsecret")
    assert path_like.status_code in (404, 422)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, status, code, field", [
    (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid_body", "body"),
    (dict(content=b"text=hi", headers={"content-type": "text/plain"}), 415, "unsupported_media_type", "content-type"),
    (dict(json=["a", "list"]), 422, "invalid_request", "body"),
    (dict(json={"text": "hi", "temperature": "hot"}), 422, "invalid_request", "temperature"),
    (dict(json={"text": "hi", "tempreature": 0.5}), 422, "invalid_request", "tempreature"),
    (dict(json={"text": "hi", "format": "aac"}), 422, "invalid_request", "format"),
    (dict(json={"text": "hi", "streaming": True, "format": "mp3"}), 422, "invalid_request", "streaming"),
    (dict(json={"text": "x" * 2001}), 400, "invalid_request", "text"),
    (dict(json={"text": "   "}), 422, "invalid_request", "text"),
    (dict(json={}), 422, "invalid_request", "text"),
    (dict(json={"text": "hi", "reference_id": "../../etc"}), 422, "invalid_request", "reference_id"),
    (dict(json={"text": "hi", "reference_id": "unknown"}), 404, "not_found", "reference_id"),
])
def test_error_shape(client, kwargs, status, code, field):
    response = client.post("/v1/tts", **kwargs)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["code"] == code and error["field"] == field and error["message"].startswith(field)


def test_unknown_route_and_method(client):
    response = client.get("/v1/nothing")
    assert response.status_code == 404 and error_of(response)["field"] == "path"
    response = client.get("/v1/tts")
    assert response.status_code == 405 and error_of(response)["code"] == "method_not_allowed"


def test_metrics_count_requests(client):
    before = metrics(client)
    for i in range(3):
        assert client.post("/v1/tts", json={"text": f"Counted {i}.", "max_new_tokens": 8}).status_code == 200
    assert client.post("/v1/tts", json={"text": "bad", "top_p": 5}).status_code == 422
    after = metrics(client)
    assert after["s1_mini_requests_total"] - before["s1_mini_requests_total"] == 4
    assert after["s1_mini_requests_success_total"] - before["s1_mini_requests_success_total"] == 3
    assert after["s1_mini_requests_error_total"] - before["s1_mini_requests_error_total"] == 1
    assert after["s1_mini_request_duration_seconds_count"] - before["s1_mini_request_duration_seconds_count"] == 4
    key = 's1_mini_http_requests_total{method="POST",route="/v1/tts",status="200"}'
    assert after[key] - before.get(key, 0) == 3
    for name in ("s1_mini_vram_utilization", "s1_mini_queue_depth", "s1_mini_active_streams", "s1_mini_batch_size",
                 "s1_mini_kv_cache_utilization", "s1_mini_real_time_factor_count",
                 "s1_mini_time_to_first_audio_seconds_count", "s1_mini_ready"):
        assert name in after
    assert after["s1_mini_ready"] == 1 and after["s1_mini_real_time_factor_count"] > 0
