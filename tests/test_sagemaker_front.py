"""The SageMaker serving front as a real process on 127.0.0.1, serving a real
model.tar.gz (tiny random checkpoint + code/inference.py) extracted into an
/opt/ml-style tree."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from s1_mini.testing.make_checkpoint import make_checkpoint
from server_utils import ROOT, free_port

TINY_FRAME = 64  # samples per frame of the tiny codec


def build_model_tar(checkpoint: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        for item in sorted(checkpoint.iterdir()):
            tar.add(item, arcname=item.name)
        tar.add(ROOT / "code" / "inference.py", arcname="code/inference.py")
    return out


def extract(model_tar: Path, base_dir: Path) -> Path:
    model_dir = base_dir / "model"
    model_dir.mkdir(parents=True)
    with tarfile.open(model_tar) as tar:
        tar.extractall(model_dir, filter="data")
    return base_dir


class Container:
    def __init__(self, base_dir: Path, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"front-{self.port}.log"
        environment = {**os.environ, "SAGEMAKER_BASE_DIR": str(base_dir), "S1_MINI_DEVICE": "cpu",
                       "S1_MINI_PRECISION": "float32", "S1_MINI_COMPILE": "false", "S1_MINI_MAX_NEW_TOKENS": "24",
                       "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "s1_mini.sagemaker.serve", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=environment)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def pings(self, timeout: float = 90) -> list[int]:
        """/ping statuses from the first answer until 200 (or a failed load)."""
        seen: list[int] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                r = self.client.get("/ping")
                seen.append(r.status_code)
                if r.status_code == 200 or r.json().get("status") == "failed":
                    return seen
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"not ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(35)
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="module")
def model_tar(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sagemaker")
    checkpoint = make_checkpoint(tmp / "checkpoint", "tiny", seed=0)
    return build_model_tar(checkpoint, tmp / "model.tar.gz")


@pytest.fixture(scope="module")
def container(model_tar, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("opt-ml")
    c = Container(extract(model_tar, tmp / "ml"), tmp)
    statuses = c.pings()
    assert statuses[-1] == 200 and set(statuses[:-1]) <= {503}
    yield c
    assert c.stop() == 0, c.log()


def _wav(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    audio, rate = sf.read(io.BytesIO(response.content), dtype="float32")
    assert rate == 44100 and len(audio) > 0 and len(audio) % TINY_FRAME == 0
    assert np.isfinite(audio).all()
    return audio


def test_invocation_returns_wav(container):
    r = container.client.post("/invocations", json={"text": "Hello from SageMaker.", "seed": 1},
                              headers={"Accept": "audio/wav"})
    assert r.headers["content-type"] == "audio/wav"
    _wav(r)


def test_content_types_and_accepts(container):
    text = container.client.post("/invocations", content=b"Plain text body.", headers={"Content-Type": "text/plain"})
    _wav(text)
    import msgpack

    packed = container.client.post("/invocations", content=msgpack.packb({"text": "Msgpack body.", "format": "flac"}),
                                   headers={"Content-Type": "application/x-msgpack"})
    assert packed.status_code == 200 and packed.headers["content-type"] == "audio/flac"
    as_json = container.client.post("/invocations", json={"text": "JSON out.", "seed": 2},
                                    headers={"Accept": "application/json"}).json()
    audio, rate = sf.read(io.BytesIO(__import__("base64").b64decode(as_json["audio"])))
    assert rate == as_json["sample_rate"] == 44100 and len(audio) == as_json["frames"] * TINY_FRAME


@pytest.mark.parametrize("kwargs, status, field", [
    (dict(content=b"{not json", headers={"Content-Type": "application/json"}), 400, "body"),
    (dict(json={"text": "hi", "temperature": 5}), 422, "temperature"),
    (dict(json={"text": ""}), 422, "text"),
    (dict(json={"text": "hi", "reference_id": "../../etc/passwd"}), 422, "reference_id"),
    (dict(json={"text": "hi", "reference_id": "nobody"}), 404, "reference_id"),
    (dict(content=b"abc", headers={"Content-Type": "image/png"}), 415, "content-type"),
    (dict(json={"text": "hi"}, headers={"Accept": "video/mp4"}), 406, "accept"),
    (dict(content=b"x" * (6 * 1024 * 1024 + 1), headers={"Content-Type": "text/plain"}), 413, "body"),
])
def test_bad_invocations_name_the_field(container, kwargs, status, field):
    r = container.client.post("/invocations", **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["field"] == field and error["message"]
    assert "Traceback" not in r.text
    _wav(container.client.post("/invocations", json={"text": "Still serving."}))


def test_realtime_invocation_refuses_text_too_long_for_its_limits(container):
    long_text = "This sentence is here to make the text long. " * 30
    r = container.client.post("/invocations", json={"text": long_text},
                              headers={"X-Amzn-SageMaker-Forwarded-Api": "InvokeEndpoint"})
    assert r.status_code == 413
    error = r.json()["error"]
    assert error["field"] == "text" and "InvokeEndpointWithResponseStream" in error["message"]


def test_multi_record_jsonl_keeps_every_line_in_order(container):
    lines = []
    for i in range(52):
        if i % 7 == 3:
            lines.append('{"text": ')  # broken JSON
        elif i % 7 == 5:
            lines.append(json.dumps({"text": f"line {i}", "top_p": 3}))  # invalid value
        else:
            lines.append(json.dumps({"text": f"Record number {i}.", "seed": i}))
    r = container.client.post("/invocations", content="\n".join(lines).encode(),
                              headers={"Content-Type": "application/jsonlines"}, timeout=300)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/jsonlines")
    out = r.text.rstrip("\n").split("\n")
    assert len(out) == len(lines)
    for i, line in enumerate(out):
        record = json.loads(line)
        if i % 7 in (3, 5):
            assert record["error"]["message"].startswith(f"line {i + 1}: ")
        else:
            audio, rate = sf.read(io.BytesIO(__import__("base64").b64decode(record["audio"])))
            assert rate == 44100 and len(audio) == record["frames"] * TINY_FRAME
    # the same record alone gives the same audio: order is kept
    alone = container.client.post("/invocations", json={"text": "Record number 11.", "seed": 11},
                                  headers={"Accept": "application/json"}).json()
    def samples(record):
        return sf.read(io.BytesIO(__import__("base64").b64decode(record["audio"])), dtype="float32")[0]

    # batched codec decode differs from a lone one by float rounding only (16-bit WAV: 1 LSB)
    np.testing.assert_allclose(samples(json.loads(out[11])), samples(alone), atol=2 / 32768)


def test_concurrent_invocations_share_batches(container):
    results = [None] * 16

    def call(i):
        results[i] = container.client.post("/invocations", json={"text": f"Concurrent request {i}.", "seed": i})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        _wav(r)
    assert container.client.get("/ping").json()["peak_batch"] > 1


def test_streaming_invocation(container):
    headers = {"X-Amzn-SageMaker-Forwarded-Api": "InvokeEndpointWithResponseStream"}
    with container.client.stream("POST", "/invocations", json={"text": "A streamed answer.", "seed": 3},
                                 headers=headers) as r:
        assert r.status_code == 200
        chunks = list(r.iter_bytes())
    body = b"".join(chunks)
    assert body[:4] == b"RIFF" and len(body) > 44


def test_execution_parameters(container):
    params = container.client.get("/execution-parameters").json()
    assert params["BatchStrategy"] == "MULTI_RECORD" and params["MaxPayloadInMB"] <= 6


def test_broken_model_reports_unhealthy(tmp_path, model_tar):
    base = extract(model_tar, tmp_path / "ml")
    (base / "model" / "model.pth").write_bytes(b"truncated")
    c = Container(base, tmp_path)
    try:
        statuses = c.pings()
        assert statuses[-1] == 503
        body = c.client.get("/ping").json()
        assert body["status"] == "failed" and "model.pth" in body["error"]
        assert c.client.post("/invocations", json={"text": "hi"}).status_code == 503
    finally:
        c.stop()


def test_sigterm_under_load_ends_cleanly(tmp_path, model_tar):
    c = Container(extract(model_tar, tmp_path / "ml"), tmp_path)
    assert c.pings()[-1] == 200
    codes: list[int] = []

    def call(i):
        try:
            codes.append(httpx.post(f"{c.url}/invocations", json={"text": f"Load {i}.", "seed": i}, timeout=60).status_code)
        except httpx.TransportError:
            codes.append(-1)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    start = time.monotonic()
    assert c.stop() == 0, c.log()
    assert time.monotonic() - start < 30
    for t in threads:
        t.join(30)
    assert len(codes) == 8 and all(code in (200, 503, -1) for code in codes), codes


# ---------------------------------------------------------------- through real boto3


@pytest.fixture(scope="module")
def runtime(container, tmp_path_factory):
    """The local SageMaker runtime in front of the container, as its own process."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("runtime") / "runtime.log", "wb")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-m", "s1_mini.sagemaker.local_runtime", "--container-url",
                                container.url, "--port", str(port), "--endpoint-name", "s1-mini"],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    import boto3
    import botocore.config

    client = boto3.client("sagemaker-runtime", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="x", config=botocore.config.Config(retries={"max_attempts": 1}))
    yield client
    process.terminate()
    process.wait(10)
    log.close()


def test_boto3_invoke_endpoint_returns_wav(runtime):
    response = runtime.invoke_endpoint(EndpointName="s1-mini", ContentType="application/json", Accept="audio/wav",
                                       Body=json.dumps({"text": "Hello through boto3.", "seed": 4}))
    assert response["ContentType"] == "audio/wav"
    audio, rate = sf.read(io.BytesIO(response["Body"].read()))
    assert rate == 44100 and len(audio) > 0 and len(audio) % TINY_FRAME == 0


def test_boto3_bad_request_is_a_model_error_naming_the_field(runtime):
    with pytest.raises(runtime.exceptions.ModelError) as info:
        runtime.invoke_endpoint(EndpointName="s1-mini", ContentType="application/json",
                                Body=json.dumps({"text": "hi", "top_p": 7}))
    error = info.value.response
    assert error["OriginalStatusCode"] == 422
    assert json.loads(error["OriginalMessage"])["error"]["field"] == "top_p"


def test_boto3_response_stream_first_event_before_the_end(runtime):
    start = time.monotonic()
    response = runtime.invoke_endpoint_with_response_stream(
        EndpointName="s1-mini", ContentType="application/json",
        Body=json.dumps({"text": "A long streamed answer for boto3 to read piece by piece.", "seed": 5,
                         "max_new_tokens": 200}))
    arrivals, parts = [], []
    for event in response["Body"]:
        parts.append(event["PayloadPart"]["Bytes"])
        arrivals.append(time.monotonic() - start)
    body = b"".join(parts)
    assert len(parts) >= 3 and body[:4] == b"RIFF"
    assert arrivals[0] < arrivals[-1]  # the first audio left before generation ended
    samples = np.frombuffer(body[44:], dtype="<i2")
    assert len(samples) > 0 and len(samples) % TINY_FRAME == 0
