"""Async inference end to end: a real boto3 ``invoke_endpoint_async`` to the local SageMaker
runtime, which reads the request from S3 (a moto server), calls the REAL container front
(tiny random checkpoint) and writes the answer, or the failure, back to S3."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import soundfile as sf

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (the test extra)")

import botocore.config  # noqa: E402

from server_utils import ROOT, free_port  # noqa: E402
from test_sagemaker_front import TINY_FRAME, Container, build_model_tar, extract  # noqa: E402

ENDPOINT = "s1-mini-async"
BUCKET = "s1-mini-async"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
NO_RETRIES = botocore.config.Config(retries={"max_attempts": 1})


def _client(service: str, endpoint_url: str):
    return boto3.client(service, endpoint_url=endpoint_url, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing", config=NO_RETRIES)


@pytest.fixture(scope="module")
def s3() -> Iterator:
    """A moto server on a free port, with the bucket made; the S3 client talks to it over HTTP."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = _client("s3", f"http://{host}:{port}")
    client.create_bucket(Bucket=BUCKET)
    client.endpoint = f"http://{host}:{port}"
    try:
        yield client
    finally:
        server.stop()


@pytest.fixture(scope="module")
def container(tmp_path_factory) -> Iterator[Container]:
    from s1_mini.testing.make_checkpoint import make_checkpoint

    tmp = tmp_path_factory.mktemp("async-container")
    model_tar = build_model_tar(make_checkpoint(tmp / "checkpoint", "tiny", seed=0), tmp / "model.tar.gz")
    c = Container(extract(model_tar, tmp / "ml"), tmp)
    assert c.pings()[-1] == 200
    yield c
    assert c.stop() == 0, c.log()


class Runtime:
    """``python -m s1_mini.sagemaker.local_runtime`` as its own process, AWS settings from the environment."""

    def __init__(self, container_url: str, log_dir: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"runtime-{self.port}.log"
        self._log = open(self.log_path, "wb")
        env = {**os.environ, **CREDENTIALS, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "s1_mini.sagemaker.local_runtime", "--container-url", container_url,
             "--port", str(self.port), "--endpoint-name", ENDPOINT, *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, self.log()
            try:
                if httpx.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"runtime not ready:\n{self.log()}"
            time.sleep(0.1)
        self.client = _client("sagemaker-runtime", self.url)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self._log.close()


@pytest.fixture(scope="module")
def runtime(container, s3, tmp_path_factory) -> Iterator[Runtime]:
    r = Runtime(container.url, tmp_path_factory.mktemp("async-runtime"),
                "--async-output-path", f"s3://{BUCKET}/out", "--async-failure-path", f"s3://{BUCKET}/failures",
                "--s3-endpoint-url", s3.endpoint)
    yield r
    r.stop()


def _wait_for(s3, uri: str, runtime: Runtime, timeout: float = 60.0) -> dict:
    """The object at ``uri`` once it exists (its body read into ``["Bytes"]``)."""
    assert uri.startswith(f"s3://{BUCKET}/")
    key = uri[len(f"s3://{BUCKET}/"):]
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = s3.get_object(Bucket=BUCKET, Key=key)
            found["Bytes"] = found["Body"].read()
            return found
        except s3.exceptions.NoSuchKey:
            pass
        assert time.monotonic() < deadline, f"nothing at {uri} after {timeout} s; runtime log:\n{runtime.log()}"
        time.sleep(0.1)


def _absent(s3, uri: str) -> bool:
    key = uri[len(f"s3://{BUCKET}/"):]
    return s3.list_objects_v2(Bucket=BUCKET, Prefix=key).get("KeyCount", 0) == 0


def _assert_wav(data: bytes) -> None:
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == 44100 and len(audio) > 0 and len(audio) % TINY_FRAME == 0


def test_async_invocation_writes_the_wav_to_s3(runtime, s3):
    s3.put_object(Bucket=BUCKET, Key="in/req.json", Body=json.dumps({"text": "Hello, async SageMaker.", "seed": 1}))
    answer = runtime.client.invoke_endpoint_async(EndpointName=ENDPOINT, InputLocation=f"s3://{BUCKET}/in/req.json",
                                                  ContentType="application/json", Accept="audio/wav")
    assert answer["ResponseMetadata"]["HTTPStatusCode"] == 202
    inference_id = answer["InferenceId"]
    assert answer["OutputLocation"] == f"s3://{BUCKET}/out/{inference_id}.out"
    assert answer["FailureLocation"] == f"s3://{BUCKET}/failures/{inference_id}-error.out"
    result = _wait_for(s3, answer["OutputLocation"], runtime)
    assert result["ContentType"] == "audio/wav"
    _assert_wav(result["Bytes"])
    assert _absent(s3, answer["FailureLocation"])


def _async_members() -> set[str]:
    model = boto3.session.Session().client("sagemaker-runtime", region_name="us-east-1")._service_model
    return set(model.operation_model("InvokeEndpointAsync").input_shape.members)


@pytest.mark.skipif(not {"Body", "S3OutputPathExtension"} <= _async_members(),
                    reason="this botocore's InvokeEndpointAsync has no inline Body / S3OutputPathExtension")
def test_inline_body_with_an_inference_id_and_path_extension(runtime, s3):
    answer = runtime.client.invoke_endpoint_async(
        EndpointName=ENDPOINT, Body=json.dumps({"text": "Inline async body.", "seed": 2}).encode(),
        ContentType="application/json", Accept="application/json", InferenceId="inline-1",
        S3OutputPathExtension="runs/a", InvocationTimeoutSeconds=120)
    assert answer["InferenceId"] == "inline-1"
    assert answer["OutputLocation"] == f"s3://{BUCKET}/out/runs/a/inline-1.out"
    record = json.loads(_wait_for(s3, answer["OutputLocation"], runtime)["Bytes"])
    audio, rate = sf.read(io.BytesIO(__import__("base64").b64decode(record["audio"])))
    assert rate == record["sample_rate"] == 44100 and len(audio) == record["frames"] * TINY_FRAME


def test_bad_request_body_lands_in_the_failure_location(runtime, s3):
    s3.put_object(Bucket=BUCKET, Key="in/bad.json", Body=json.dumps({"text": "hi", "top_p": 7}))
    answer = runtime.client.invoke_endpoint_async(EndpointName=ENDPOINT, InputLocation=f"s3://{BUCKET}/in/bad.json",
                                                  ContentType="application/json", InferenceId="bad-top-p")
    assert answer["FailureLocation"] == f"s3://{BUCKET}/failures/bad-top-p-error.out"
    failure = _wait_for(s3, answer["FailureLocation"], runtime)
    assert failure["ContentType"].startswith("application/json")
    error = json.loads(failure["Bytes"])["error"]
    assert error["field"] == "top_p" and error["message"]
    assert _absent(s3, answer["OutputLocation"])


def test_missing_input_object_is_a_clear_failure(runtime, s3):
    answer = runtime.client.invoke_endpoint_async(EndpointName=ENDPOINT,
                                                  InputLocation=f"s3://{BUCKET}/in/nothing-here.json",
                                                  ContentType="application/json")
    failure = json.loads(_wait_for(s3, answer["FailureLocation"], runtime)["Bytes"])
    assert failure["ErrorCode"] == "InputNotFound"
    assert f"s3://{BUCKET}/in/nothing-here.json" in failure["Message"] and "does not exist" in failure["Message"]
    assert failure["InferenceId"] == answer["InferenceId"]
    assert _absent(s3, answer["OutputLocation"])


def test_invalid_calls_are_validation_errors(runtime):
    client = runtime.client
    if "Body" in _async_members():
        with pytest.raises(client.exceptions.ValidationError, match="exactly one"):
            client.invoke_endpoint_async(EndpointName=ENDPOINT, InputLocation=f"s3://{BUCKET}/in/req.json",
                                         Body=b"{}")
    with pytest.raises(client.exceptions.ValidationError, match="exactly one"):
        client.invoke_endpoint_async(EndpointName=ENDPOINT)
    with pytest.raises(client.exceptions.ValidationError, match="not found"):
        client.invoke_endpoint_async(EndpointName="other", InputLocation=f"s3://{BUCKET}/in/req.json")
    # boto3 checks the documented ranges itself; a raw caller meets the runtime's own check
    r = httpx.post(f"{runtime.url}/endpoints/{ENDPOINT}/async-invocations",
                   headers={"X-Amzn-SageMaker-InputLocation": f"s3://{BUCKET}/in/req.json",
                            "X-Amzn-SageMaker-InvocationTimeoutSeconds": "3601"})
    assert r.status_code == 400 and r.headers["x-amzn-errortype"].startswith("ValidationError")
    assert "3600" in r.json()["Message"]


def test_runtime_without_output_path_refuses_async_calls(container, tmp_path):
    r = Runtime(container.url, tmp_path)
    try:
        with pytest.raises(r.client.exceptions.ValidationError, match="--async-output-path"):
            r.client.invoke_endpoint_async(EndpointName=ENDPOINT, InputLocation=f"s3://{BUCKET}/in/req.json")
    finally:
        r.stop()


# ------------------------------------------------------------------ against the fake container
# test_local_runtime's fake container echoes each request's headers and body, or sleeps first.


@pytest.fixture(scope="module")
def echo_runtime(s3, tmp_path_factory) -> Iterator[Runtime]:
    logs = tmp_path_factory.mktemp("async-echo")
    port = free_port()
    log = open(logs / "fake-container.log", "wb")
    fake = subprocess.Popen([sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "tests"),
                             "test_local_runtime:fake_container", "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    try:
        r = Runtime(f"http://127.0.0.1:{port}", logs, "--async-output-path", f"s3://{BUCKET}/echo",
                    "--s3-endpoint-url", s3.endpoint)
        yield r
        r.stop()
    finally:
        fake.terminate()
        fake.wait(10)
        log.close()


def test_async_forwards_what_sagemaker_forwards(echo_runtime, s3):
    s3.put_object(Bucket=BUCKET, Key="in/echo.txt", Body=b"plain words")
    answer = echo_runtime.client.invoke_endpoint_async(
        EndpointName=ENDPOINT, InputLocation=f"s3://{BUCKET}/in/echo.txt", ContentType="text/plain",
        Accept="audio/flac", CustomAttributes="trace=7", InferenceId="echo-1")
    assert answer["OutputLocation"] == f"s3://{BUCKET}/echo/echo-1.out"
    # no --async-failure-path: failures go next to the outputs
    assert answer["FailureLocation"] == f"s3://{BUCKET}/echo/echo-1-error.out"
    echoed = json.loads(_wait_for(s3, answer["OutputLocation"], echo_runtime)["Bytes"])
    headers = echoed["headers"]
    assert echoed["body"] == "plain words"
    assert headers["content-type"] == "text/plain" and headers["accept"] == "audio/flac"
    assert headers["x-amzn-sagemaker-forwarded-api"] == "InvokeEndpointAsync"
    assert headers["x-amzn-sagemaker-custom-attributes"] == "trace=7"
    assert headers["x-amzn-sagemaker-inference-id"] == "echo-1"
    assert not {"authorization", "x-amzn-sagemaker-inputlocation", "x-amz-date"} & set(headers)


def test_async_past_its_invocation_timeout_is_a_failure(echo_runtime, s3):
    s3.put_object(Bucket=BUCKET, Key="in/slow.json", Body=json.dumps({"sleep": 5}))
    start = time.monotonic()
    answer = echo_runtime.client.invoke_endpoint_async(
        EndpointName=ENDPOINT, InputLocation=f"s3://{BUCKET}/in/slow.json", ContentType="application/json",
        InvocationTimeoutSeconds=1)
    assert time.monotonic() - start < 1  # 202 before the container is even called
    failure = json.loads(_wait_for(s3, answer["FailureLocation"], echo_runtime, timeout=10)["Bytes"])
    assert failure["ErrorCode"] == "ModelInvocationTimeExceeded" and "1 s" in failure["Message"]
    assert time.monotonic() - start < 4
    assert _absent(s3, answer["OutputLocation"])
