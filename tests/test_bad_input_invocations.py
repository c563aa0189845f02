"""Bad input to SageMaker's ``POST /invocations`` through the real front
(``python -m s1_mini.sagemaker.serve`` on 127.0.0.1, tiny checkpoint), every content type:
JSON, msgpack, plain text, JSON lines, unsupported types (415), Accept headers (406),
oversize bodies (413). Each table row is one request: id, body and headers, the expected
status and the field the error names (``{"error": {"field", "message": "<field>: <rule>"}}``).

A batch (JSON lines) with bad lines in the middle answers an error line in the place of
each bad line while the other lines succeed: same line count, same order. Hypothesis
fuzzes ``input_fn`` and ``output_fn`` in-process and the front's body over HTTP.
"""

from __future__ import annotations

import base64
import io
import json
import string

import msgpack
import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s1_mini.engine import TTSResponse
from s1_mini.sagemaker.handlers import Invocation, Prediction, Records, input_fn, output_fn
from s1_mini.server.errors import APIError
from server_utils import sine_wav, tiny_checkpoint
from test_sagemaker_front import TINY_FRAME, Container, _wav, build_model_tar, extract

JSON, MSGPACK, TEXT, JSONL = "application/json", "application/x-msgpack", "text/plain", "application/jsonlines"
STREAM = {"X-Amzn-SageMaker-Forwarded-Api": "InvokeEndpointWithResponseStream"}
REALTIME = {"X-Amzn-SageMaker-Forwarded-Api": "InvokeEndpoint"}
PAYLOAD_LIMIT = 6 * 1024 * 1024  # SAGEMAKER_MAX_PAYLOAD_IN_MB's default
GOOD = {"text": "A good request.", "max_new_tokens": 8}
WAV = sine_wav(0.05)


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input-front")
    started = Container(extract(build_model_tar(tiny_checkpoint(), tmp / "model.tar.gz"), tmp / "ml"), tmp)
    assert started.pings()[-1] == 200, started.log()
    yield started
    assert started.stop() == 0, started.log()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def call(id: str, status: int, field: str, body: bytes | dict, content_type: str = JSON, **headers: str) -> object:
    """One row: a dict body is sent as JSON (or msgpack), bytes as they are."""
    if isinstance(body, dict):
        body = msgpack.packb(body) if "msgpack" in content_type else json.dumps(body).encode()
    return pytest.param(body, {"Content-Type": content_type, **headers}, status, field, id=id)


def fields(**changes: object) -> dict:
    return {**GOOD, **changes}


INVOCATIONS = [
    # --- JSON that does not parse: 400 body
    call("json-empty", 400, "body", b""),
    call("json-open-brace", 400, "body", b"{"),
    call("json-open-bracket", 400, "body", b"["),
    call("json-close-brace", 400, "body", b"}"),
    call("json-missing-value", 400, "body", b'{"text": }'),
    call("json-single-quotes", 400, "body", b"{'text': 'single quotes'}"),
    call("json-bad-utf8", 400, "body", b'{"text": "caf\xe9"}'),
    call("json-trailing", 400, "body", b'{"text": "a"} trailing'),
    call("json-nested-deep", 400, "body", b"[" * 100_000 + b"]" * 100_000),
    call("json-binary", 400, "body", b"\x00\x01\x02"),
    call("json-unterminated", 400, "body", b'{"text": "unterminated}'),
    call("json-two-objects", 400, "body", b'{"text": "a"}{"text": "b"}'),
    # --- JSON that is not an object: 422 body
    call("json-null", 422, "body", b"null"),
    call("json-number", 422, "body", b"1"),
    call("json-string", 422, "body", b'"a string"'),
    call("json-array", 422, "body", b'[{"text": "a"}]'),
    call("json-true", 422, "body", b"true"),
    # --- wrong types and broken rules, field by field
    call("text-number", 422, "text", fields(text=1)),
    call("text-null", 422, "text", fields(text=None)),
    call("text-list", 422, "text", fields(text=["a"])),
    call("text-object", 422, "text", fields(text={})),
    call("text-bool", 422, "text", fields(text=True)),
    call("text-empty", 422, "text", fields(text="")),
    call("text-spaces", 422, "text", fields(text="   ")),
    call("text-nan", 422, "text", b'{"text": NaN}'),
    call("text-too-long", 400, "text", fields(text="x" * 10_001)),
    call("text-missing", 422, "text", {"temperature": 0.5}),
    call("temperature-string", 422, "temperature", fields(temperature="0.5")),
    call("temperature-bool", 422, "temperature", fields(temperature=True)),
    call("temperature-negative", 422, "temperature", fields(temperature=-1)),
    call("temperature-zero", 422, "temperature", fields(temperature=0)),
    call("temperature-two", 422, "temperature", fields(temperature=2)),
    call("temperature-nan", 422, "temperature", b'{"text": "a", "temperature": NaN}'),
    call("temperature-inf", 422, "temperature", b'{"text": "a", "temperature": 1e999}'),
    call("top-p-zero", 422, "top_p", fields(top_p=0)),
    call("top-p-above-one", 422, "top_p", fields(top_p=1.5)),
    call("top-p-string", 422, "top_p", fields(top_p="x")),
    call("top-p-infinity", 422, "top_p", b'{"text": "a", "top_p": Infinity}'),
    call("penalty-zero", 422, "repetition_penalty", fields(repetition_penalty=0)),
    call("penalty-two", 422, "repetition_penalty", fields(repetition_penalty=2)),
    call("max-new-tokens-negative", 422, "max_new_tokens", fields(max_new_tokens=-1)),
    call("max-new-tokens-one", 422, "max_new_tokens", fields(max_new_tokens=1)),
    call("max-new-tokens-float", 422, "max_new_tokens", fields(max_new_tokens=1.5)),
    call("max-new-tokens-string", 422, "max_new_tokens", fields(max_new_tokens="10")),
    call("max-new-tokens-huge", 422, "max_new_tokens", fields(max_new_tokens=10**30)),
    call("seed-string", 422, "seed", fields(seed="1")),
    call("seed-float", 422, "seed", fields(seed=1.5)),
    call("seed-huge", 422, "seed", fields(seed=2**70)),
    call("seed-list", 422, "seed", fields(seed=[1])),
    call("reference-id-number", 422, "reference_id", fields(reference_id=1)),
    call("reference-id-empty", 422, "reference_id", fields(reference_id="")),
    call("reference-id-slash", 422, "reference_id", fields(reference_id="a/b")),
    call("reference-id-traversal", 422, "reference_id", fields(reference_id="../../etc/passwd")),
    call("reference-id-too-long", 422, "reference_id", fields(reference_id="a" * 65)),
    call("reference-id-unknown", 404, "reference_id", fields(reference_id="nobody")),
    call("references-string", 422, "references", fields(references="x")),
    call("references-number-item", 422, "references[0]", fields(references=[1])),
    call("references-audio-number", 422, "references[0].audio", fields(references=[{"audio": 1, "text": "t"}])),
    call("references-no-text", 422, "references[0].text", fields(references=[{"audio": b64(WAV)}])),
    call("references-no-audio", 422, "references[0].audio", fields(references=[{"text": "t"}])),
    call("references-bad-base64", 422, "references[0].audio", fields(references=[{"audio": "!!", "text": "t"}])),
    call("references-empty-base64", 422, "references[0].audio", fields(references=[{"audio": "", "text": "t"}])),
    call("references-empty-text", 422, "references[0].text", fields(references=[{"audio": b64(WAV), "text": ""}])),
    call("references-extra-field", 422, "references[0].extra",
         fields(references=[{"audio": b64(WAV), "text": "t", "extra": 1}])),
    call("references-not-audio", 400, "references[0].audio",
         fields(references=[{"audio": b64(b"just some text"), "text": "t"}])),
    call("references-png", 400, "references[0].audio",
         fields(references=[{"audio": b64(b"\x89PNG\r\n\x1a\n" + bytes(64)), "text": "t"}])),
    call("references-header-only", 400, "references[0].audio",
         fields(references=[{"audio": b64(WAV[:44]), "text": "t"}])),
    call("references-data-url-junk", 400, "references[0].audio",
         fields(references=[{"audio": "data:audio/wav;base64,AAAA", "text": "t"}])),
    call("references-second-bad", 400, "references[1].audio",
         fields(references=[{"audio": b64(WAV), "text": "t"}, {"audio": b64(b"junk"), "text": "t"}])),
    call("references-too-many", 422, "references", fields(references=[{"audio": b64(WAV), "text": "t"}] * 17)),
    # within max_reference_seconds (30 s), but more than the tiny model's context holds
    call("references-too-long", 400, "prompt", fields(references=[{"audio": b64(sine_wav(2.0)), "text": "t"}])),
    # 7 KB whose header says an hour: refused from the header, before any decoding
    call("references-past-the-limit", 413, "references[0].audio",
         fields(references=[{"audio": b64(sine_wav(3600, rate=1)), "text": "t"}])),
    call("format-unknown", 422, "format", fields(format="wav2")),
    call("format-number", 422, "format", fields(format=1)),
    call("format-aac", 422, "format", fields(format="aac")),
    call("format-empty", 422, "format", fields(format="")),
    call("streaming-list", 422, "streaming", fields(streaming=[1])),
    call("streaming-word", 422, "streaming", fields(streaming="maybe")),
    call("chunk-length-zero", 422, "chunk_length", fields(chunk_length=0)),
    call("chunk-length-large", 422, "chunk_length", fields(chunk_length=1000)),
    call("normalize-word", 422, "normalize", fields(normalize="maybe")),
    call("unknown-field", 422, "voice", fields(voice="alloy")),
    # --- msgpack, under each of its media types
    call("msgpack-reserved-byte", 400, "body", b"\xc1", MSGPACK),
    call("msgpack-truncated", 400, "body", b"\xdd\xff\xff\xff\xff", MSGPACK),
    call("msgpack-int-key", 400, "body", msgpack.packb({1: "int key"}), MSGPACK),
    call("msgpack-empty", 400, "body", b"", MSGPACK),
    call("msgpack-array", 422, "body", msgpack.packb([1, 2]), MSGPACK),
    call("msgpack-string", 422, "body", msgpack.packb("a string"), "application/msgpack"),
    call("msgpack-text-bytes", 422, "text", {"text": b"\xff\xfe"}, "application/vnd.msgpack"),
    call("msgpack-text-null", 422, "text", {"text": None}, MSGPACK),
    call("msgpack-audio-number", 422, "references[0].audio", {"text": "a", "references": [{"audio": 12, "text": "t"}]},
         MSGPACK),
    call("msgpack-audio-junk", 400, "references[0].audio",
         {"text": "a", "references": [{"audio": b"junk", "text": "t"}]}, MSGPACK),
    call("msgpack-temperature-string", 422, "temperature", fields(temperature="hot"), MSGPACK),
    # --- plain text
    call("text-plain-empty", 400, "body", b"", TEXT),
    call("text-plain-spaces", 400, "body", b"   \n\t", TEXT),
    call("text-plain-bad-utf8", 400, "body", b"caf\xe9", TEXT),
    call("text-plain-too-long", 400, "text", b"x" * 10_001, f"{TEXT}; charset=utf-8"),
    # --- JSON lines with no line at all
    call("jsonl-empty", 400, "body", b"", JSONL),
    call("jsonl-blank-lines", 400, "body", b"\n\n\n", JSONL),
    call("jsonl-spaces", 400, "body", b"   \n  \r\n", "application/x-jsonlines"),
    # --- content types that are not served: 415
    call("type-xml", 415, "content-type", b"<text>hi</text>", "application/xml"),
    call("type-png", 415, "content-type", b"\x89PNG", "image/png"),
    call("type-octet-stream", 415, "content-type", json.dumps(GOOD).encode(), "application/octet-stream"),
    call("type-form", 415, "content-type", b"text=hi", "application/x-www-form-urlencoded"),
    call("type-multipart", 415, "content-type", b"--x\r\n", "multipart/form-data; boundary=x"),
    call("type-audio", 415, "content-type", WAV, "audio/wav"),
    call("type-html", 415, "content-type", b"<p>hi</p>", "text/html"),
    call("type-csv", 415, "content-type", b"text\nhi\n", "text/csv"),
    call("type-garbage", 415, "content-type", b"{}", ";;;"),
    call("type-almost-json", 415, "content-type", b"{}", "application/jsonx"),
    # --- Accept headers that offer nothing we make: 406
    call("accept-video", 406, "accept", fields(), Accept="video/mp4"),
    call("accept-html", 406, "accept", fields(), Accept="text/html"),
    call("accept-xml", 406, "accept", fields(), Accept="application/xml"),
    call("accept-audio-refused", 406, "accept", fields(), Accept="audio/*;q=0"),
    call("accept-only-refused", 406, "accept", fields(), Accept="audio/wav;q=0, video/mp4"),
    call("accept-bad-quality", 406, "accept", fields(), Accept="audio/wav;q=high"),
    call("accept-aac", 406, "accept", fields(), Accept="audio/aac"),
    call("accept-audio-for-jsonl", 406, "accept", json.dumps(GOOD).encode() + b"\n", JSONL, Accept="audio/wav"),
    # --- too large: 413
    call("oversize-text", 413, "body", b"x" * (PAYLOAD_LIMIT + 1), TEXT),
    call("oversize-json", 413, "body", json.dumps(fields(text="y" * PAYLOAD_LIMIT)).encode()),
    call("oversize-jsonl", 413, "body", (json.dumps(GOOD) + "\n").encode() * (PAYLOAD_LIMIT // 40), JSONL),
    call("realtime-text-too-long", 413, "text", fields(text="This sentence is long enough. " * 40), **REALTIME),
    # --- a streaming call (response stream API) is validated before any byte is sent
    call("stream-text-empty", 422, "text", fields(text=""), **STREAM),
    call("stream-bad-temperature", 422, "temperature", fields(temperature=9), **STREAM),
    call("stream-unknown-voice", 404, "reference_id", fields(reference_id="nobody"), **STREAM),
    call("stream-custom-attribute-bad-body", 400, "body", b"{", **{"X-Amzn-SageMaker-Custom-Attributes": "stream=true"}),
]


@pytest.mark.parametrize("body, headers, status, field", INVOCATIONS)
def test_bad_invocation_names_the_field_and_rule(front, body, headers, status, field):
    response = front.client.post("/invocations", content=body, headers=headers)
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["field"] == field, error
    assert error["message"].startswith(f"{field}: ") and len(error["message"]) > len(field) + 2, error
    assert "Traceback" not in response.text


def test_front_serves_after_bad_invocations(front):
    _wav(front.client.post("/invocations", json=GOOD))
    assert front.client.get("/ping").status_code == 200
    log = front.log()
    assert "Traceback" not in log and "invocation failed" not in log, log[-3000:]


# Not errors: what the front does with unusual but valid headers (documented in the README:
# custom attributes other than stream=true are ignored; Accept may list types with q-values).
ACCEPTED = [
    pytest.param({"Accept": "audio/wav, application/json"}, "audio/wav", id="accept-list"),
    pytest.param({"Accept": "video/mp4, audio/flac;q=0.5"}, "audio/flac", id="accept-list-second"),
    pytest.param({"Accept": "application/json;q=0.2, audio/mpeg;q=0.9"}, "audio/mpeg", id="accept-quality-order"),
    pytest.param({"Accept": "audio/*"}, "audio/wav", id="accept-audio-wildcard"),
    pytest.param({"Accept": "AUDIO/WAV"}, "audio/wav", id="accept-upper-case"),
    pytest.param({"Accept": "application/jsonlines"}, "application/jsonlines", id="accept-jsonlines-single"),
    pytest.param({"X-Amzn-SageMaker-Custom-Attributes": ";;==,stream"}, "audio/wav", id="custom-attributes-garbage"),
    pytest.param({"X-Amzn-SageMaker-Custom-Attributes": "a=" + "x" * 1024}, "audio/wav", id="custom-attributes-long"),
    pytest.param({"X-Amzn-SageMaker-Custom-Attributes": "stream=false"}, "audio/wav", id="custom-attributes-no-stream"),
    pytest.param({"X-Amzn-SageMaker-Forwarded-Api": "Unknown"}, "audio/wav", id="forwarded-api-unknown"),
]


@pytest.mark.parametrize("headers, media_type", ACCEPTED)
def test_unusual_valid_headers_are_served(front, headers, media_type):
    response = front.client.post("/invocations", json=GOOD, headers=headers)
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"].split(";")[0] == media_type
    if media_type == "application/jsonlines":
        (line,) = response.text.rstrip("\n").split("\n")
        assert "audio" in json.loads(line)


# ---------------------------------------------------------------- batch: bad lines in place

BAD_LINES = [  # (id, line, status, field)
    ("broken-json", b'{"text": ', 400, "body"),
    ("not-an-object", b"[1, 2]", 422, "body"),
    ("null", b"null", 422, "body"),
    ("blank", b"", 400, "body"),
    ("spaces", b"   ", 400, "body"),
    ("bad-utf8", b'{"text": "caf\xe9"}', 400, "body"),
    ("text-missing", b'{"seed": 1}', 422, "text"),
    ("text-empty", b'{"text": ""}', 422, "text"),
    ("text-too-long", json.dumps({"text": "x" * 10_001}).encode(), 400, "text"),
    ("top-p", b'{"text": "a", "top_p": 3}', 422, "top_p"),
    ("temperature-nan", b'{"text": "a", "temperature": NaN}', 422, "temperature"),
    ("seed-huge", json.dumps({"text": "a", "seed": 2**70}).encode(), 422, "seed"),
    ("max-new-tokens-one", b'{"text": "a", "max_new_tokens": 1}', 422, "max_new_tokens"),
    ("unknown-voice", b'{"text": "a", "reference_id": "nobody"}', 404, "reference_id"),
    ("bad-voice-id", b'{"text": "a", "reference_id": "../x"}', 422, "reference_id"),
    ("bad-base64", b'{"text": "a", "references": [{"audio": "%%%", "text": "t"}]}', 422, "references[0].audio"),
    ("not-audio", json.dumps({"text": "a", "references": [{"audio": b64(b"junk"), "text": "t"}]}).encode(), 400,
     "references[0].audio"),
    ("unknown-field", b'{"text": "a", "voice": "x"}', 422, "voice"),
    ("format", b'{"text": "a", "format": "aac"}', 422, "format"),
    ("msgpack-in-jsonl", msgpack.packb({"text": "a"}), 400, "body"),
]


def test_batch_bad_lines_are_errors_in_place(front):
    # good lines around every bad one; one good line holds U+2028 and U+0085 in its text,
    # which str.splitlines would have cut in two, and one ends in \r\n
    lines: list[bytes] = []
    expected: list[tuple[str, int, str] | None] = []
    for i, (name, line, status, field) in enumerate(BAD_LINES):
        lines.append(json.dumps({"text": f"Good line {i}.", "seed": i, "max_new_tokens": 8}).encode())
        expected.append(None)
        lines.append(line)
        expected.append((name, status, field))
    lines.append(json.dumps({"text": "Separators \u2028 and \u0085 inside.", "max_new_tokens": 8},
                            ensure_ascii=False).encode() + b"\r")
    expected.append(None)
    response = front.client.post("/invocations", content=b"\n".join(lines) + b"\n",
                                     headers={"Content-Type": JSONL}, timeout=300)
    assert response.status_code == 200 and response.headers["content-type"].startswith(JSONL), response.text[:500]
    out = response.content.decode().rstrip("\n").split("\n")
    assert len(out) == len(lines)
    for number, (line, want) in enumerate(zip(out, expected), start=1):
        record = json.loads(line)
        if want is None:
            assert "audio" in record, (number, record)
            audio, rate = sf.read(io.BytesIO(base64.b64decode(record["audio"])))
            assert rate == 44100 and len(audio) == record["frames"] * TINY_FRAME > 0
            continue
        name, status, field = want
        error = record["error"]
        assert (error["status"], error["field"]) == (status, field), (name, error)
        assert error["message"].startswith(f"line {number}: {field}: "), (name, error)
    _wav(front.client.post("/invocations", json=GOOD))


# ---------------------------------------------------------------- property-based fuzzing

CONTENT_TYPES = st.sampled_from([JSON, MSGPACK, "application/msgpack", TEXT, JSONL, "application/jsonl", "",
                                 "application/vnd.api+json", "TEXT/PLAIN; charset=utf-8", "application/xml", ";",
                                 "image/png"]) | st.text(max_size=30)
VALUES = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=3), max_leaves=8)
FIELDS = st.fixed_dictionaries({}, optional={name: VALUES for name in (
    "text", "format", "temperature", "top_p", "repetition_penalty", "max_new_tokens", "seed", "reference_id",
    "references", "streaming", "chunk_length", "normalize", "use_memory_cache", "voice")})
BODIES = (st.binary(max_size=300) | FIELDS.map(lambda d: json.dumps(d).encode()) | FIELDS.map(msgpack.packb)
          | st.lists(FIELDS.map(json.dumps), max_size=4).map(lambda lines: "\n".join(lines).encode())
          | st.text(max_size=100).map(str.encode))


@settings(max_examples=800, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=BODIES, content_type=CONTENT_TYPES)
def test_fuzzed_input_fn_parses_or_names_the_field(body, content_type):
    try:
        parsed = input_fn(body, content_type)
    except APIError as error:
        assert error.status in (400, 413, 415, 422) and error.field, vars(error)
        assert error.message.startswith(f"{error.field}: "), vars(error)
        return
    assert isinstance(parsed, (Invocation, Records))
    for item in parsed.items if isinstance(parsed, Records) else []:
        if isinstance(item, APIError):
            assert item.status in (400, 422) and item.field and item.message.startswith(f"{item.field}: "), vars(item)


def _prediction() -> Prediction:
    audio = np.zeros(4 * TINY_FRAME, dtype=np.float32)
    return Prediction(input_fn(json.dumps(GOOD).encode(), JSON), TTSResponse(True, (44100, audio)))


ACCEPTS = (st.text(alphabet=string.printable, max_size=60)
           | st.lists(st.sampled_from(["audio/wav", "audio/flac", "application/json", "*/*", "audio/*", "video/mp4",
                                       "text/html", "application/jsonlines", "application/*"])
                      .flatmap(lambda kind: st.sampled_from([kind, f"{kind};q=0", f"{kind};q=0.5", f"{kind};q=x"])),
                      max_size=4).map(", ".join))


@settings(max_examples=600, deadline=None, database=None, derandomize=True)
@given(accept=ACCEPTS)
def test_fuzzed_accept_headers_answer_or_406(accept):
    for prediction in (_prediction(), [_prediction()]):
        try:
            body, media_type = output_fn(prediction, accept)
        except APIError as error:
            assert (error.status, error.field) == (406, "accept") and error.message.startswith("accept: ")
            continue
        assert body and media_type in ("audio/wav", "audio/flac", "audio/mpeg", "audio/ogg", "audio/pcm",
                                       "application/json", "application/jsonlines")


def test_fuzzed_bodies_over_http_never_5xx(front):
    statuses: dict[int, int] = {}

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(body=BODIES, content_type=CONTENT_TYPES)
    def run(body, content_type):
        try:
            headers = {"Content-Type": content_type}
            response = front.client.post("/invocations", content=body, headers=headers)
        except ValueError:  # a header value httpx itself refuses to send (e.g. a newline)
            return
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code in (200, 400, 404, 413, 415, 422), (response.status_code, response.text[:300])
        if response.status_code != 200:
            error = response.json()["error"]
            assert error["field"] and error["message"].startswith(f"{error['field']}: "), error

    run()
    assert statuses.get(200, 0) > 0 and len(statuses) > 2, statuses
    _wav(front.client.post("/invocations", json=GOOD))
