"""The local SageMaker runtime (``s1_mini.sagemaker.local_runtime``) driven by real boto3
``sagemaker-runtime`` clients, in front of a fake container that uvicorn serves in its own
process (``fake_container`` below); and the event stream encoder read back by botocore."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType

import boto3
import botocore.config
import botocore.session
import httpx
import pytest
from botocore.client import BaseClient
from botocore.eventstream import EventStreamBuffer
from botocore.exceptions import EventStreamError
from botocore.parsers import EventStreamJSONParser
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

# s1_mini is imported inside the tests only: the fake container process imports this
# module, and s1_mini's package import pulls in torch.

ROOT = Path(__file__).resolve().parents[1]
ENDPOINT = "s1-mini-test"
LIMIT = 6_291_456
TIMEOUT_S = 3.0  # the runtime's invocation timeout here (SageMaker's is 60 s), so timeouts test quickly


# ------------------------------------------------------------------ the fake container
# /invocations obeys a JSON body: {"bad": true} -> 400; {"sleep": s} -> waits, then echoes;
# {"size": n} -> n bytes; {"chunks": n, "interval": s, "then": "break"|"hang"} -> n chunks
# streamed; anything else -> echoes the request's headers and body as JSON.

async def _ping(request: Request) -> Response:
    return Response("ok")


async def _invocations(request: Request) -> Response:
    body = await request.body()
    command = json.loads(body) if body.startswith(b"{") else {}
    if command.get("bad"):
        return JSONResponse({"error": "bad input"}, status_code=400)
    if "size" in command:
        return Response(b"x" * command["size"], media_type="application/octet-stream")
    if "chunks" in command:
        return StreamingResponse(_chunks(command["chunks"], command.get("interval", 0), command.get("then")),
                                 media_type="application/jsonlines")
    await asyncio.sleep(command.get("sleep", 0))
    attributes = request.headers.get("x-amzn-sagemaker-custom-attributes", "")
    return JSONResponse({"headers": dict(request.headers), "body": body.decode()},
                        headers={"X-Amzn-SageMaker-Custom-Attributes": f"echo:{attributes}"})


async def _chunks(count: int, interval: float, then: str | None) -> AsyncIterator[bytes]:
    for index in range(count):
        if index:
            await asyncio.sleep(interval)
        yield (json.dumps({"index": index, "sent": time.time()}) + "\n").encode()
    if then == "break":
        raise RuntimeError("the fake container breaks its stream on purpose")
    if then == "hang":
        await asyncio.sleep(60)


fake_container = Starlette(routes=[Route("/ping", _ping), Route("/invocations", _invocations, methods=["POST"])])


# ------------------------------------------------------------------ processes and clients

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Service:
    """A subprocess whose output goes to a log file."""

    def __init__(self, command: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.process.args} exited with {self.process.returncode}:\n"
                               f"{self.log_path.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


@pytest.fixture(scope="module")
def runtime_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("local-runtime")
    container_port, runtime_port = _free_port(), _free_port()
    container = _Service([sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "tests"),
                          "test_local_runtime:fake_container", "--host", "127.0.0.1", "--port", str(container_port),
                          "--log-level", "warning"], logs / "container.log")
    runtime = _Service([sys.executable, "-m", "s1_mini.sagemaker.local_runtime",
                        "--container-url", f"http://127.0.0.1:{container_port}", "--port", str(runtime_port),
                        "--endpoint-name", ENDPOINT, "--timeout", str(TIMEOUT_S), "--log-level", "warning"],
                       logs / "runtime.log")
    url = f"http://127.0.0.1:{runtime_port}"
    try:
        _wait_until_pinged(url, [container, runtime], timeout=60.0)
        yield url
    finally:
        runtime.stop()
        container.stop()


def _wait_until_pinged(url: str, services: list[_Service], timeout: float) -> None:
    """The runtime's /ping passes through, so 200 means both processes serve."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for service in services:
            service.check_alive()
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the runtime at {url} did not answer /ping with 200 within {timeout} s")


@pytest.fixture(scope="module")
def client(runtime_url: str) -> BaseClient:
    # One attempt: a retried error would hide what the runtime answered the first time.
    return boto3.client("sagemaker-runtime", endpoint_url=runtime_url, region_name="us-east-1",
                        aws_access_key_id="x", aws_secret_access_key="x",
                        config=botocore.config.Config(retries={"total_max_attempts": 1}, read_timeout=30))


@pytest.fixture(scope="module")
def eventstream() -> ModuleType:
    from s1_mini.sagemaker import eventstream

    return eventstream


def _raw_stream_messages(runtime_url: str, command: dict) -> list[tuple[dict, bytes]]:
    """The streaming API's messages as sent, headers and payload, read without boto3 (whose
    EventStreamError keeps only the code and message of an exception event)."""
    buffer = EventStreamBuffer()
    with httpx.stream("POST", f"{runtime_url}/endpoints/{ENDPOINT}/invocations-response-stream",
                      content=json.dumps(command), headers={"content-type": "application/json"},
                      timeout=30) as answer:
        assert answer.status_code == 200
        for data in answer.iter_raw():
            buffer.add_data(data)
    return [(message.headers, message.payload) for message in buffer]


# ------------------------------------------------------------------ the event stream encoder

def test_events_round_trip_through_botocore(eventstream: ModuleType) -> None:
    shape = (botocore.session.get_session().get_service_model("sagemaker-runtime")
             .operation_model("InvokeEndpointWithResponseStream").output_shape.members["Body"])
    parts = [b"first", b"", bytes(range(256)) * 40, "é\n".encode()]
    wire = b"".join(map(eventstream.payload_part, parts)) + eventstream.model_stream_error("it broke", "StreamBroken")
    buffer = EventStreamBuffer()
    for start in range(0, len(wire), 7):  # message boundaries must not depend on how reads split
        buffer.add_data(wire[start:start + 7])
    messages = list(buffer)
    parser = EventStreamJSONParser()
    parsed = [parser.parse(message.to_response_dict(), shape) for message in messages]

    assert parsed[:-1] == [{"PayloadPart": {"Bytes": part}} for part in parts]
    assert parsed[-1]["Error"] == {"Code": "ModelStreamError", "Message": "it broke"}
    assert json.loads(messages[-1].payload) == {"Message": "it broke", "ErrorCode": "StreamBroken"}


def test_encoder_refuses_what_the_format_cannot_carry(eventstream: ModuleType) -> None:
    with pytest.raises(ValueError, match="payload"):
        eventstream.payload_part(b"x" * (eventstream.MAX_PAYLOAD_BYTES + 1))
    with pytest.raises(ValueError, match="header name"):
        eventstream.encode_message({"n" * 256: "v"}, b"")


# ------------------------------------------------------------------ InvokeEndpoint

def test_invoke_endpoint_forwards_what_sagemaker_forwards(client: BaseClient) -> None:
    answer = client.invoke_endpoint(EndpointName=ENDPOINT, Body=b'{"text": "hello"}', ContentType="application/json",
                                    Accept="application/json", CustomAttributes="voice=alice",
                                    InferenceId="inference-1")
    echoed = json.loads(answer["Body"].read())
    headers = echoed["headers"]

    assert echoed["body"] == '{"text": "hello"}'
    assert answer["ContentType"] == "application/json"
    assert answer["CustomAttributes"] == "echo:voice=alice"
    assert answer["InvokedProductionVariant"] == "AllTraffic"
    assert headers["x-amzn-sagemaker-forwarded-api"] == "InvokeEndpoint"
    assert headers["content-type"] == "application/json"
    assert headers["accept"] == "application/json"
    assert headers["x-amzn-sagemaker-custom-attributes"] == "voice=alice"
    assert headers["x-amzn-sagemaker-inference-id"] == "inference-1"
    assert not {"authorization", "x-amz-date", "user-agent", "accept-encoding"} & set(headers)


@pytest.mark.parametrize("api", ["invoke_endpoint", "invoke_endpoint_with_response_stream"])
def test_container_error_is_model_error(client: BaseClient, api: str) -> None:
    with pytest.raises(client.exceptions.ModelError) as caught:
        getattr(client, api)(EndpointName=ENDPOINT, Body=b'{"bad": true}', ContentType="application/json")
    error = caught.value.response

    assert error["OriginalStatusCode"] == 400
    assert json.loads(error["OriginalMessage"]) == {"error": "bad input"}
    assert error["LogStreamArn"].endswith(f":log-group:/aws/sagemaker/Endpoints/{ENDPOINT}")
    assert error["Error"]["Message"].startswith("Received client error (400) from primary with message")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 424


def test_timeout_is_model_error(client: BaseClient) -> None:
    with pytest.raises(client.exceptions.ModelError) as caught:
        client.invoke_endpoint(EndpointName=ENDPOINT, Body=json.dumps({"sleep": TIMEOUT_S + 5}))
    assert caught.value.response["OriginalStatusCode"] == 0
    assert "timed out while waiting for a response from container primary" in caught.value.response["OriginalMessage"]


@pytest.mark.parametrize("api", ["invoke_endpoint", "invoke_endpoint_with_response_stream"])
def test_request_over_six_mb_is_refused(client: BaseClient, api: str) -> None:
    with pytest.raises(client.exceptions.ValidationError, match=f"{LIMIT + 1} bytes"):
        getattr(client, api)(EndpointName=ENDPOINT, Body=b"x" * (LIMIT + 1))


def test_response_over_six_mb_is_model_error(client: BaseClient) -> None:
    exact = client.invoke_endpoint(EndpointName=ENDPOINT, Body=json.dumps({"size": LIMIT}))
    assert len(exact["Body"].read()) == LIMIT
    with pytest.raises(client.exceptions.ModelError, match="Response payload exceeds"):
        client.invoke_endpoint(EndpointName=ENDPOINT, Body=json.dumps({"size": LIMIT + 1}))


def test_unknown_endpoint_is_validation_error(client: BaseClient) -> None:
    with pytest.raises(client.exceptions.ValidationError, match="Endpoint elsewhere of account .* not found"):
        client.invoke_endpoint(EndpointName="elsewhere", Body=b"{}")


# ------------------------------------------------------------------ InvokeEndpointWithResponseStream

def test_stream_forwards_accept_and_the_api(client: BaseClient) -> None:
    answer = client.invoke_endpoint_with_response_stream(
        EndpointName=ENDPOINT, Body=b"{}", ContentType="application/json", Accept="application/jsonlines",
        CustomAttributes="a=1")
    echoed = json.loads(b"".join(event["PayloadPart"]["Bytes"] for event in answer["Body"]))

    assert answer["ContentType"] == "application/json"
    assert answer["CustomAttributes"] == "echo:a=1"
    assert answer["InvokedProductionVariant"] == "AllTraffic"
    assert echoed["headers"]["x-amzn-sagemaker-forwarded-api"] == "InvokeEndpointWithResponseStream"
    assert echoed["headers"]["accept"] == "application/jsonlines"


def test_stream_parts_arrive_while_the_container_still_sends(client: BaseClient) -> None:
    started = time.time()
    answer = client.invoke_endpoint_with_response_stream(
        EndpointName=ENDPOINT, Body=json.dumps({"chunks": 5, "interval": 0.3}))
    arrivals, data = [], b""
    for event in answer["Body"]:
        arrivals.append(time.time())
        data += event["PayloadPart"]["Bytes"]
    lines = [json.loads(line) for line in data.decode().splitlines()]

    assert [line["index"] for line in lines] == [0, 1, 2, 3, 4]
    assert answer["ContentType"] == "application/jsonlines"
    assert arrivals[0] - started < 0.5
    assert arrivals[0] < lines[-1]["sent"]
    assert arrivals[-1] - started >= 1.2


def test_broken_stream_is_model_stream_error(client: BaseClient, runtime_url: str) -> None:
    answer = client.invoke_endpoint_with_response_stream(
        EndpointName=ENDPOINT, Body=json.dumps({"chunks": 2, "then": "break"}))
    data = b""
    with pytest.raises(EventStreamError) as caught:
        for event in answer["Body"]:
            data += event["PayloadPart"]["Bytes"]

    assert caught.value.response["Error"]["Code"] == "ModelStreamError"
    assert len(data.decode().splitlines()) == 2
    headers, payload = _raw_stream_messages(runtime_url, {"chunks": 2, "then": "break"})[-1]
    assert headers[":exception-type"] == "ModelStreamError"
    assert json.loads(payload)["ErrorCode"] == "StreamBroken"


def test_stream_past_the_timeout_is_model_stream_error(runtime_url: str) -> None:
    messages = _raw_stream_messages(runtime_url, {"chunks": 1, "then": "hang"})
    (first_headers, _), (last_headers, last_payload) = messages

    assert first_headers[":event-type"] == "PayloadPart"
    assert last_headers[":exception-type"] == "ModelStreamError"
    assert json.loads(last_payload)["ErrorCode"] == "ModelInvocationTimeExceeded"


# ------------------------------------------------------------------ in process

def test_unreachable_container_is_model_error() -> None:
    from fastapi.testclient import TestClient

    from s1_mini.sagemaker.local_runtime import RuntimeConfig, create_app

    app = create_app(RuntimeConfig(container_url=f"http://127.0.0.1:{_free_port()}"))
    with TestClient(app) as test_client:
        answer = test_client.post("/endpoints/any/invocations", content=b"{}")

    assert answer.status_code == 424
    assert answer.headers["x-amzn-errortype"].startswith("ModelError:")
    assert answer.json()["OriginalStatusCode"] == 0
    assert "Could not reach container primary" in answer.json()["OriginalMessage"]
