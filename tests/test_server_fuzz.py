"""Malformed input gets 4xx, never 5xx: a hand corpus of well over 100 bad requests,
and property-based fuzzing of the OpenAPI schema with schemathesis (bounded). After
both, the server still serves a good request."""

from __future__ import annotations

import base64
import io
import json

import msgpack
import numpy as np
import pytest
import soundfile as sf

from server_utils import shared_server, sine_wav


@pytest.fixture(scope="module")
def server():
    return shared_server()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _wav_header_only() -> bytes:
    return sine_wav(0.05)[:44]


def _silent_flac() -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(0, dtype=np.float32), 16000, format="FLAC")
    return buffer.getvalue()


NOT_AUDIO = {
    "text": b"just some text, not audio",
    "png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
    "random": bytes(range(256)) * 8,
    "wav-header-only": _wav_header_only(),
    "truncated-riff": b"RIFF\x24\x00\x00\x00WAVEfmt ",
    "empty-flac": _silent_flac(),
    "zip": b"PK\x03\x04" + b"\x00" * 100,
    "html": b"<html><body>not audio</body></html>",
}

GOOD_TTS = {"text": "A good request.", "max_new_tokens": 8}


def _tts_json(**fields):
    return ("POST", "/v1/tts", {"json": {**GOOD_TTS, **fields}})


def _speech(**fields):
    base = {"model": "s1-mini", "input": "Hello.", "voice": "default", "response_format": "wav"}
    body = {k: v for k, v in {**base, **fields}.items() if v is not _DROP}
    return ("POST", "/v1/audio/speech", {"json": body})


_DROP = object()


def corpus() -> list[tuple[str, str, dict]]:
    cases: list[tuple[str, str, dict]] = []
    add = cases.append
    raw_json = {"content-type": "application/json"}
    # --- bodies that are not JSON / msgpack at all
    for body in [b"", b"{", b"[", b"}", b"{\"text\": }", b"{'text': 'single quotes'}", b"\xff\xfe\x00bad utf-8",
                 b"{\"text\": \"a\"} trailing", b"[" * 100_000 + b"]" * 100_000, b"\x00\x01\x02",
                 b"{\"text\": \"unterminated}", b"nul\x00l"]:
        add(("POST", "/v1/tts", {"content": body, "headers": raw_json}))
    for body in [b"null", b"1", b"\"a string\"", b"[1, 2]", b"true", b"{\"text\": NaN}",
                 b"{\"text\": \"a\", \"temperature\": NaN}", b"{\"text\": \"a\", \"top_p\": Infinity}",
                 b"{\"text\": \"a\", \"seed\": 1e999}"]:
        add(("POST", "/v1/tts", {"content": body, "headers": raw_json}))
    msgpack_type = {"content-type": "application/msgpack"}
    for body in [b"\xc1", b"\x92\x01\x02", msgpack.packb("string"), msgpack.packb({1: "int key"}),
                 b"\xdd\xff\xff\xff\xff", msgpack.packb({"text": b"\xff\xfe"}), msgpack.packb({"text": None}),
                 msgpack.packb({"text": "a", "references": [{"audio": 12, "text": "t"}]})]:
        add(("POST", "/v1/tts", {"content": body, "headers": msgpack_type}))
    # --- wrong content types
    for kind in ["text/plain", "application/xml", "image/png", "application/octet-stream",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "audio/wav"]:
        add(("POST", "/v1/tts", {"content": json.dumps(GOOD_TTS).encode(), "headers": {"content-type": kind}}))
        if kind != "multipart/form-data; boundary=x":
            add(("POST", "/v1/audio/speech", {"content": b"input=hi", "headers": {"content-type": kind}}))
    # --- wrong types and broken rules, field by field
    bad_fields = {
        "text": [1, None, [], {}, True, "", "   ", "x" * 2001, "y" * 50_000],
        "temperature": ["0.5", True, [], -1, 0, 2, 1e9, "NaN"],
        "top_p": [0, 1.5, "x", -0.1, False],
        "repetition_penalty": [0, 2, 2.0, -1, "1.1"],
        "max_new_tokens": [-1, 1, 1.5, "10", True, 10**30],
        "seed": ["1", 1.5, 2**70, [1]],
        "reference_id": [1, "", "a/b", "..", "../../etc/passwd", "a" * 65, "nul\x00", "with space", "unknown-voice",
                         "é"],
        "references": ["x", [1], [{"audio": 1, "text": "t"}], [{"audio": b64(sine_wav(0.02))}],
                       [{"text": "t"}], [{"audio": "!!not base64!!", "text": "t"}],
                       [{"audio": b64(sine_wav(0.02)), "text": ""}],
                       [{"audio": b64(sine_wav(0.02)), "text": "t", "extra": 1}],
                       [{"audio": "", "text": "t"}], [{"audio": b64(NOT_AUDIO["text"]), "text": "t"}],
                       [{"audio": b64(NOT_AUDIO["png"]), "text": "t"}],
                       [{"audio": b64(NOT_AUDIO["wav-header-only"]), "text": "t"}],
                       [{"audio": b64(sine_wav(0.02)), "text": "t"}] * 17,
                       [{"audio": b64(sine_wav(3.0)), "text": "too long for the context"}]],
        "format": ["wav2", 1, "aac", "pcm16", "", None],
        "streaming": [[1], "maybe", 2],
        "chunk_length": [0, 50, 1000, "150", 150.5],
        "normalize": ["maybe", [True]],
        "use_memory_cache": ["maybe", True],
        "unknown_field": [1],
    }
    for name, values in bad_fields.items():
        for value in values:
            add(_tts_json(**{name: value}))
    add(_tts_json(streaming=True, format="mp3"))
    add(("POST", "/v1/tts", {"json": {"temperature": 0.5}}))  # no text
    # --- streaming route
    for fields in [{"format": "mp3"}, {"format": "flac"}, {"text": ""}, {"reference_id": "nobody"},
                   {"max_new_tokens": 1}, {"references": [{"audio": b64(NOT_AUDIO["random"]), "text": "t"}]}]:
        add(("POST", "/v1/tts/stream", {"json": {**GOOD_TTS, **fields}}))
    # --- OpenAI route
    for fields in [dict(model=_DROP), dict(input=_DROP), dict(voice=_DROP), dict(input=""), dict(model=""),
                   dict(speed=0.1), dict(speed=1.5), dict(speed="fast"), dict(response_format="wav2"),
                   dict(response_format="aac"), dict(stream_format="x"), dict(stream_format="sse",
                                                                             response_format="mp3"),
                   dict(voice={"id": 1}), dict(voice={}), dict(voice="no-such-voice"), dict(voice="../etc"),
                   dict(instructions="x" * 5000), dict(input="z" * 2001), dict(extra=1), dict(seed="x")]:
        add(_speech(**fields))
    # --- voices: non-audio uploads, bad ids, unknown voices
    for name, data in NOT_AUDIO.items():
        add(("POST", "/v1/references", {"data": {"id": f"v-{name}", "text": "t"},
                                        "files": {"audio": ("x.wav", data, "audio/wav")}}))
    for voice_id in ["../x", "a/b", "a b", "é", "", "x" * 65, "list", "add", ".hidden", "a.b"]:
        add(("POST", "/v1/references", {"data": {"id": voice_id, "text": "t"},
                                        "files": {"audio": ("x.wav", sine_wav(0.02), "audio/wav")}}))
    add(("POST", "/v1/references", {"data": {"id": "no-audio", "text": "t"}}))
    add(("POST", "/v1/references", {"data": {"id": "no-text"},
                                    "files": {"audio": ("x.wav", sine_wav(0.02), "audio/wav")}}))
    add(("POST", "/v1/references", {"json": {"id": "json-bad-b64", "text": "t", "audio": "%%%"}}))
    add(("POST", "/v1/references", {"content": b"--x\r\nbroken multipart",
                                    "headers": {"content-type": "multipart/form-data; boundary=x"}}))
    add(("POST", "/v1/references", {"content": b"raw audio", "headers": {"content-type": "audio/wav"}}))
    for path in ["/v1/references/unknown", "/v1/references/..%2F..%2Fetc%2Fpasswd", "/v1/references/a.b",
                 "/v1/references/%00", "/v1/references/" + "x" * 65, "/v1/references/%C3%A9"]:
        add(("GET", path, {}))
        add(("DELETE", path, {}))
    add(("POST", "/v1/references/add", {"data": {"id": "../x", "text": "t"},
                                        "files": {"audio": ("x.wav", sine_wav(0.02), "audio/wav")}}))
    add(("POST", "/v1/references/add", {"json": {"id": "ok", "text": "t", "audio": b64(NOT_AUDIO["zip"])}}))
    add(("POST", "/v1/references/add", {"content": msgpack.packb({"id": "x"}), "headers": msgpack_type}))
    add(("DELETE", "/v1/references/delete", {"json": {"reference_id": "unknown"}}))
    add(("DELETE", "/v1/references/delete", {"json": {"reference_id": "../etc"}}))
    add(("DELETE", "/v1/references/delete", {"json": {}}))
    # --- routes and methods that do not exist
    for method, path in [("PUT", "/v1/tts"), ("GET", "/v1/tts"), ("GET", "/v1/audio/speech"),
                         ("POST", "/health"), ("GET", "/v1/nothing"), ("GET", "/../../etc/passwd"),
                         ("PATCH", "/v1/references/x")]:
        add((method, path, {}))
    return cases


CORPUS = corpus()


def test_corpus_is_large():
    assert len(CORPUS) >= 100


def test_hand_corpus_gets_only_4xx(server):
    client = server.client
    failures = []
    for method, path, kwargs in CORPUS:
        response = client.request(method, path, **kwargs)
        ok = 400 <= response.status_code < 500
        if ok and response.headers.get("content-type", "").startswith("application/json"):
            body = response.json()
            ok = "error" in body and "message" in body["error"] and "field" in body["error"]
        elif ok and path.startswith("/v1/references/") and response.headers.get("content-type") == \
                "application/msgpack":
            ok = "error" in msgpack.unpackb(response.content)
        elif ok:
            ok = False  # every error body is JSON (or fish-speech's msgpack)
        if not ok:
            failures.append((method, path, _short(kwargs), response.status_code, response.text[:300]))
    assert not failures, "\n".join(map(str, failures))
    log = server.log()
    assert "unhandled error" not in log and "Exception in ASGI application" not in log, log[-3000:]
    good = client.post("/v1/tts", json=GOOD_TTS)
    assert good.status_code == 200 and good.content[:4] == b"RIFF"


def _short(kwargs: dict) -> str:
    text = repr(kwargs)
    return text if len(text) < 200 else text[:200] + "…"


# ---------------------------------------------------------------- schemathesis


def test_openapi_fuzzing_never_5xx(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            examples = 15 if operation.path in ("/v1/tts", "/v1/tts/stream", "/v1/audio/speech") else 25

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call(base_url=server.url, timeout=60)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.path} {mode.value}: {response.status_code} "
                                    f"{response.text[:300]} body={str(case.body)[:300]}")

            try:
                run()
            except Unsatisfiable:  # nothing to break in an operation without parameters
                assert mode is GenerationMode.NEGATIVE, operation.label
    assert not failures, "\n".join(failures[:20])
    good = server.client.post("/v1/tts", json=GOOD_TTS)
    assert good.status_code == 200
