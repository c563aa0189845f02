"""A local stand-in for the SageMaker runtime API in front of any container's ``/invocations``.

Real boto3 ``sagemaker-runtime`` clients made with ``endpoint_url=`` pointing here can call
``invoke_endpoint``, ``invoke_endpoint_with_response_stream`` and ``invoke_endpoint_async``
(see "Async inference" below); each call is forwarded to
``{container_url}/invocations`` as SageMaker would forward it, and the answer comes back in
the shapes of botocore's ``sagemaker-runtime`` service model. Credentials are not checked
(SigV4 signatures are ignored), so any dummy keys do.

What is forwarded: ``Content-Type``, ``Accept`` (the streaming API takes it as
``X-Amzn-SageMaker-Accept``), ``X-Amzn-SageMaker-Custom-Attributes``,
``X-Amzn-SageMaker-Inference-Id``, ``X-Amzn-SageMaker-Session-Id``, plus
``X-Amzn-SageMaker-Forwarded-Api: InvokeEndpoint | InvokeEndpointWithResponseStream``.
Every other client header (``Authorization``, ``X-Amz-Date``, ...) is dropped.

Errors, as SageMaker reports them:

- request body over 6,291,456 bytes, or an endpoint name other than ``--endpoint-name``:
  ``ValidationError`` (400);
- container status outside 2xx: ``ModelError`` (424) with ``OriginalStatusCode``,
  ``OriginalMessage`` (the container's body) and ``LogStreamArn``; the streaming API
  answers a container's error status the same way, since no event has been sent yet;
- no answer within ``--timeout`` (60 s), a container that cannot be reached, or an
  ``InvokeEndpoint`` response over 6,291,456 bytes: ``ModelError`` with
  ``OriginalStatusCode`` 0 (SageMaker's "Received server error (0)");
- a stream that breaks, or does not finish within ``--timeout``: a ``ModelStreamError``
  event (``StreamBroken`` / ``ModelInvocationTimeExceeded``) after the parts sent so far.

Async inference (``InvokeEndpointAsync``, ``POST /endpoints/{name}/async-invocations``) needs
``--async-output-path s3://bucket/prefix`` (else every async call is a ``ValidationError``);
``--async-failure-path`` defaults to the output path, ``--s3-endpoint-url`` points the S3 client
elsewhere (e.g. a moto server), and region and credentials come from the environment as for
any boto3 client. The call is answered at once with 202, ``InferenceId`` (the caller's or a new
UUID), ``OutputLocation`` ``<output path>[/<S3OutputPathExtension>]/<Filename or id.out>`` and
``FailureLocation`` ``<failure path>[/<S3OutputPathExtension>]/<id>-error.out``. Then, in the
background: the request is read from ``InputLocation`` (``s3://`` or an ``https://`` S3 URL, at
most 1 GB) or taken from the inline ``Body`` (at most 128,000 bytes); it waits for one of
``--async-max-concurrent-invocations`` slots (SageMaker's MaxConcurrentInvocationsPerInstance),
expiring after ``RequestTTLSeconds`` (default 21,600); it goes to ``/invocations`` with the
caller's ``ContentType`` and ``Accept``, custom attributes, the inference id and
``X-Amzn-SageMaker-Forwarded-Api: InvokeEndpointAsync``; the container has
``InvocationTimeoutSeconds`` (1-3,600, default ``--async-invocation-timeout``, 900). A 2xx body
is written to the output location with the container's content type; a container error status
writes the container's body (and content type) to the failure location; anything else (input
missing or too large, timeout, expired, unreachable container, response over 1 GB) writes
``{"ErrorCode": ..., "Message": ...}`` as JSON to the failure location.

Usage: ``python -m s1_mini.sagemaker.local_runtime --container-url http://127.0.0.1:8080``
``[--async-output-path s3://bucket/out --s3-endpoint-url http://127.0.0.1:5000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from s1_mini.sagemaker import eventstream

MAX_PAYLOAD_BYTES = 6_291_456
INVOKE_ENDPOINT = "InvokeEndpoint"
INVOKE_STREAM = "InvokeEndpointWithResponseStream"
INVOKE_ASYNC = "InvokeEndpointAsync"
MAX_ASYNC_PAYLOAD_BYTES = 1_073_741_824  # async inference: input (and here output) up to 1 GB
MAX_ASYNC_INLINE_BYTES = 128_000  # InvokeEndpointAsync's inline Body
ASYNC_TIMEOUT_S = 900  # InvocationTimeoutSeconds: default 15 minutes ...
MAX_ASYNC_TIMEOUT_S = 3600  # ... at most an hour
ASYNC_TTL_S = 21_600  # RequestTTLSeconds: default (and most) 6 hours in the queue
MIN_ASYNC_TTL_S = 60

log = logging.getLogger("s1_mini.sagemaker.local_runtime")

# Request headers forwarded as they are (boto3 sends them under these names for both APIs).
_PASSED_HEADERS = ("content-type", "x-amzn-sagemaker-custom-attributes", "x-amzn-sagemaker-inference-id",
                   "x-amzn-sagemaker-session-id")
# Where each API carries the caller's Accept; the container always gets it as Accept.
_ACCEPT_HEADER = {INVOKE_ENDPOINT: "accept", INVOKE_STREAM: "x-amzn-sagemaker-accept",
                  INVOKE_ASYNC: "x-amzn-sagemaker-accept"}
# httpx adds these to every request; SageMaker sends the container only what it forwards.
_HTTPX_DEFAULT_HEADERS = ("accept", "accept-encoding", "user-agent")
# SageMaker's error type header; botocore keeps the part before the colon as the error code.
_ERROR_TYPE_SUFFIX = ":http://internal.amazon.com/coral/com.amazon.sagemaker/"


@dataclass(frozen=True)
class RuntimeConfig:
    """Where to forward and how to present the endpoint."""

    container_url: str
    endpoint_name: str | None = None  # None: any endpoint name is accepted
    variant_name: str = "AllTraffic"
    container_name: str = "primary"  # SageMaker's name for a single-container model in messages
    region: str = "us-east-1"
    account: str = "000000000000"
    timeout_s: float = 60.0
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    # Async inference: no output path, no async calls.
    async_output_path: str | None = None  # s3://bucket/prefix
    async_failure_path: str | None = None  # default: async_output_path
    s3_endpoint_url: str | None = None  # e.g. a moto server; None: AWS
    async_timeout_s: float = ASYNC_TIMEOUT_S  # when the call names no InvocationTimeoutSeconds
    async_max_concurrency: int = 4  # MaxConcurrentInvocationsPerInstance
    async_max_payload_bytes: int = MAX_ASYNC_PAYLOAD_BYTES


class _ResponseTooLarge(Exception):
    pass


def create_app(config: RuntimeConfig) -> FastAPI:
    """The runtime API app; one pooled httpx client to the container for its lifetime."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # No httpx timeouts: each call gets one deadline of config.timeout_s instead.
        async with httpx.AsyncClient(base_url=config.container_url, timeout=None) as client:
            for name in _HTTPX_DEFAULT_HEADERS:
                del client.headers[name]
            app.state.container = client
            app.state.s3 = _s3_client(config) if config.async_output_path else None
            app.state.async_slots = asyncio.Semaphore(max(config.async_max_concurrency, 1))
            app.state.async_tasks = set()
            try:
                yield
            finally:
                tasks = app.state.async_tasks
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    app = FastAPI(title="SageMaker runtime (local)", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.get("/ping")
    async def ping(request: Request) -> Response:
        try:
            answer = await asyncio.wait_for(request.app.state.container.get("/ping"), config.timeout_s)
        except (httpx.TransportError, asyncio.TimeoutError) as exc:
            return Response(f"container unreachable: {_describe(exc)}\n", status_code=502, media_type="text/plain")
        return Response(answer.content, status_code=answer.status_code, headers=_content_type(answer.headers))

    @app.post("/endpoints/{endpoint_name}/invocations")
    async def invoke_endpoint(endpoint_name: str, request: Request) -> Response:
        body = await request.body()
        refusal = _validate(config, endpoint_name, body)
        if refusal is not None:
            return refusal
        client: httpx.AsyncClient = request.app.state.container
        outgoing = _container_request(client, request, body, INVOKE_ENDPOINT)
        try:
            status, headers, content = await asyncio.wait_for(
                _exchange(client, outgoing, config.max_payload_bytes), config.timeout_s)
        except asyncio.TimeoutError:
            return _model_error(config, endpoint_name, 0, _timeout_message(config))
        except httpx.TransportError as exc:
            return _model_error(config, endpoint_name, 0, _unreachable_message(config, exc))
        except _ResponseTooLarge:
            return _model_error(config, endpoint_name, 0,
                                f"Response payload exceeds the maximum of {config.max_payload_bytes} bytes.")
        if not 200 <= status < 300:
            return _model_error(config, endpoint_name, status, _text(content))
        return Response(content, headers={**_content_type(headers), **_response_headers(config, headers)})

    @app.post("/endpoints/{endpoint_name}/invocations-response-stream")
    async def invoke_stream(endpoint_name: str, request: Request) -> Response:
        body = await request.body()
        refusal = _validate(config, endpoint_name, body)
        if refusal is not None:
            return refusal
        client: httpx.AsyncClient = request.app.state.container
        outgoing = _container_request(client, request, body, INVOKE_STREAM)
        deadline = asyncio.get_running_loop().time() + config.timeout_s
        try:
            answer = await asyncio.wait_for(client.send(outgoing, stream=True), config.timeout_s)
        except asyncio.TimeoutError:
            return _model_error(config, endpoint_name, 0, _timeout_message(config))
        except httpx.TransportError as exc:
            return _model_error(config, endpoint_name, 0, _unreachable_message(config, exc))
        if not 200 <= answer.status_code < 300:
            # Nothing has been streamed yet, so the failure can still be an HTTP error.
            try:
                content = await asyncio.wait_for(_read_capped(answer, config.max_payload_bytes), _left(deadline))
            except (asyncio.TimeoutError, httpx.TransportError, _ResponseTooLarge):
                content = b""
            finally:
                await answer.aclose()
            return _model_error(config, endpoint_name, answer.status_code, _text(content))
        headers = _response_headers(config, answer.headers)
        if "content-type" in answer.headers:
            headers["X-Amzn-SageMaker-Content-Type"] = answer.headers["content-type"]
        return StreamingResponse(_events(config, answer, deadline), media_type=eventstream.CONTENT_TYPE,
                                 headers=headers)

    @app.post("/endpoints/{endpoint_name}/async-invocations")
    async def invoke_async(endpoint_name: str, request: Request) -> Response:
        body = await request.body()
        refusal = _validate(config, endpoint_name, b"")
        if refusal is not None:
            return refusal
        job = _async_job(config, request, body)
        if isinstance(job, Response):
            return job
        task = asyncio.create_task(_run_async(config, request.app.state, job))
        request.app.state.async_tasks.add(task)
        task.add_done_callback(request.app.state.async_tasks.discard)
        return JSONResponse({"InferenceId": job.inference_id}, status_code=202, headers={
            "X-Amzn-SageMaker-OutputLocation": _s3_uri(*job.output),
            "X-Amzn-SageMaker-FailureLocation": _s3_uri(*job.failure),
            "x-amzn-RequestId": str(uuid.uuid4())})

    return app


# ------------------------------------------------------------------ async inference

@dataclass(frozen=True)
class _AsyncJob:
    inference_id: str
    input: tuple[str, str] | None  # (bucket, key) to read, or None for an inline body
    body: bytes | None
    headers: dict[str, str]  # for the container
    output: tuple[str, str]
    failure: tuple[str, str]
    timeout_s: float
    expires_at: float  # time.monotonic() past which a queued request is dropped


_S3_URI = re.compile(r"^s3://([^/]+)/?(.*)$")
# https://bucket.s3[.-]region.amazonaws.com/key (virtual-hosted) or https://s3[...]/bucket/key (path-style)
_S3_VIRTUAL_HOST = re.compile(r"^(.+)\.s3(?:[.-][a-z0-9-]+)*\.amazonaws\.com(?:\.cn)?$")
_INFERENCE_ID = re.compile(r"^\S[\x20-\x7e]*$")
_PATH_EXTENSION = re.compile(r"^(?!s3:|https:)[a-zA-Z0-9!_.*'()/-]+$")
_FILENAME = re.compile(r"^(?!.*\..*\.)[a-zA-Z0-9][a-zA-Z0-9-_.]*$")


def parse_s3_location(location: str) -> tuple[str, str] | None:
    """``(bucket, key)`` of an ``s3://`` URI or an ``https://`` S3 object URL; None if it is neither."""
    match = _S3_URI.match(location)
    if match:
        return match.group(1), match.group(2)
    if not location.startswith("https://"):
        return None
    parts = urlsplit(location)
    host, path = parts.hostname or "", parts.path.lstrip("/")
    virtual = _S3_VIRTUAL_HOST.match(host)
    if virtual:
        return virtual.group(1), path
    bucket, _, key = path.partition("/")
    return (bucket, key) if bucket else None


def _s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def _join(prefix: str, *names: str) -> str:
    return "/".join(part.strip("/") for part in (prefix, *names) if part.strip("/"))


def _async_job(config: RuntimeConfig, request: Request, body: bytes) -> _AsyncJob | Response:
    """The call checked as SageMaker checks it before answering 202, or the ValidationError."""

    def invalid(message: str) -> Response:
        return _error(400, "ValidationError", {"Message": message})

    if not config.async_output_path:
        return invalid("This endpoint has no AsyncInferenceConfig: start the local runtime with "
                       "--async-output-path s3://bucket/prefix to accept InvokeEndpointAsync.")
    headers = request.headers
    location = headers.get("x-amzn-sagemaker-inputlocation")
    if location is not None and body:
        return invalid("Provide exactly one of InputLocation and Body, not both.")
    if location is None and not body:
        return invalid("Provide exactly one of InputLocation and Body.")
    source = None
    if location is not None:
        source = parse_s3_location(location)
        if source is None or not source[1]:
            return invalid(f"InputLocation {location!r} is not an S3 object URI (s3://bucket/key).")
    elif len(body) > MAX_ASYNC_INLINE_BYTES:
        return invalid(f"Inline Body of {len(body)} bytes exceeds the maximum of {MAX_ASYNC_INLINE_BYTES} bytes; "
                       "upload the input to S3 and pass InputLocation.")
    inference_id = headers.get("x-amzn-sagemaker-inference-id") or str(uuid.uuid4())
    if len(inference_id) > 64 or not _INFERENCE_ID.match(inference_id):
        return invalid("InferenceId must be 1 to 64 printable characters, not starting with a space.")
    for name in ("x-amzn-sagemaker-content-type", "x-amzn-sagemaker-accept", "x-amzn-sagemaker-custom-attributes"):
        value = headers.get(name)
        if value is not None and (len(value) > 1024 or not value.isascii()):
            return invalid(f"{name} must be at most 1024 ASCII characters.")
    extension = headers.get("x-amzn-sagemaker-s3outputpathextension", "")
    if extension and (len(extension) > 512 or not _PATH_EXTENSION.match(extension)):
        return invalid(f"S3OutputPathExtension {extension!r} is not a valid S3 path extension.")
    filename = headers.get("x-amzn-sagemaker-filename")
    if filename is not None and (len(filename) > 32 or not _FILENAME.match(filename)):
        return invalid(f"Filename {filename!r} is not a valid file name (at most 32 characters, one dot).")
    try:
        timeout_s = _int_header(headers, "x-amzn-sagemaker-invocationtimeoutseconds", 1, MAX_ASYNC_TIMEOUT_S)
        ttl_s = _int_header(headers, "x-amzn-sagemaker-requestttlseconds", MIN_ASYNC_TTL_S, ASYNC_TTL_S)
    except ValueError as exc:
        return invalid(str(exc))
    output_bucket, output_prefix = parse_s3_location(config.async_output_path)  # checked at start-up
    failure_bucket, failure_prefix = parse_s3_location(config.async_failure_path or config.async_output_path)
    forwarded = {"x-amzn-sagemaker-inference-id": inference_id, "x-amzn-sagemaker-forwarded-api": INVOKE_ASYNC}
    for source_name, target in (("x-amzn-sagemaker-content-type", "content-type"),
                                ("x-amzn-sagemaker-accept", "accept"),
                                ("x-amzn-sagemaker-custom-attributes", "x-amzn-sagemaker-custom-attributes")):
        if source_name in headers:
            forwarded[target] = headers[source_name]
    return _AsyncJob(
        inference_id=inference_id, input=source, body=body if source is None else None, headers=forwarded,
        output=(output_bucket, _join(output_prefix, extension, filename or f"{inference_id}.out")),
        failure=(failure_bucket, _join(failure_prefix, extension, f"{inference_id}-error.out")),
        timeout_s=float(timeout_s) if timeout_s is not None else config.async_timeout_s,
        expires_at=time.monotonic() + (ttl_s if ttl_s is not None else ASYNC_TTL_S))


def _int_header(headers: Any, name: str, low: int, high: int) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {raw!r}.") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, not {value}.")
    return value


class _AsyncFailure(Exception):
    """A failure SageMaker reports itself (not the container's body)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


async def _run_async(config: RuntimeConfig, state: Any, job: _AsyncJob) -> None:
    """The whole life of one async request after its 202; every outcome ends as one S3 object."""
    try:
        try:
            status, content_type, content = await _async_attempt(config, state, job)
        except _AsyncFailure as failure:
            log.warning("async inference %s failed: %s: %s", job.inference_id, failure.code, failure.message)
            await _put(state.s3, job.failure, json.dumps({"ErrorCode": failure.code, "Message": failure.message,
                                                          "InferenceId": job.inference_id}).encode(),
                       "application/json")
            return
        if 200 <= status < 300:
            await _put(state.s3, job.output, content, content_type)
            log.info("async inference %s: %d bytes to %s", job.inference_id, len(content), _s3_uri(*job.output))
        else:
            await _put(state.s3, job.failure, content, content_type)
            log.warning("async inference %s: container status %d, body to %s", job.inference_id, status,
                        _s3_uri(*job.failure))
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - an S3 write that fails has nowhere else to go
        log.exception("async inference %s: could not write its result to S3", job.inference_id)


async def _async_attempt(config: RuntimeConfig, state: Any, job: _AsyncJob) -> tuple[int, str | None, bytes]:
    body = job.body if job.input is None else await _read_input(state.s3, job.input,
                                                                config.async_max_payload_bytes)
    wait = job.expires_at - time.monotonic()
    try:
        await asyncio.wait_for(state.async_slots.acquire(), max(wait, 0.0))
    except asyncio.TimeoutError:
        raise _AsyncFailure("RequestExpired", "The request spent longer than its RequestTTLSeconds in the queue "
                                              "and was not processed.") from None
    try:
        client: httpx.AsyncClient = state.container
        outgoing = client.build_request("POST", "/invocations", content=body, headers=job.headers)
        try:
            status, headers, content = await asyncio.wait_for(
                _exchange(client, outgoing, config.async_max_payload_bytes), job.timeout_s)
        except asyncio.TimeoutError:
            raise _AsyncFailure("ModelInvocationTimeExceeded",
                                f"Inference request exceeded the InvocationTimeoutSeconds of {job.timeout_s:g} s: "
                                f"container {config.container_name} did not answer in time.") from None
        except httpx.TransportError as exc:
            raise _AsyncFailure("ModelError", _unreachable_message(config, exc)) from None
        except _ResponseTooLarge:
            raise _AsyncFailure("ModelError", f"Response payload exceeds the maximum of "
                                              f"{config.async_max_payload_bytes} bytes.") from None
        return status, headers.get("content-type"), content
    finally:
        state.async_slots.release()


async def _read_input(s3: Any, source: tuple[str, str], limit: int) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = source

    def read() -> bytes:
        head = s3.head_object(Bucket=bucket, Key=key)
        if head["ContentLength"] > limit:
            raise _AsyncFailure("ValidationError", f"Input {_s3_uri(bucket, key)} is {head['ContentLength']} "
                                                   f"bytes, over the maximum of {limit} bytes.")
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()

    try:
        return await asyncio.to_thread(read)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code", "ClientError")
        if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            raise _AsyncFailure("InputNotFound", f"Failed to download the input: {_s3_uri(bucket, key)} "
                                                 "does not exist.") from None
        raise _AsyncFailure("InputDownloadFailed", f"Failed to download the input from {_s3_uri(bucket, key)}: "
                                                   f"{code} {error.get('Message', '')}".strip()) from None
    except BotoCoreError as exc:
        raise _AsyncFailure("InputDownloadFailed", f"Failed to download the input from {_s3_uri(bucket, key)}: "
                                                   f"{_describe(exc)}") from None


async def _put(s3: Any, target: tuple[str, str], content: bytes, content_type: str | None) -> None:
    bucket, key = target
    extra = {"ContentType": content_type} if content_type else {}
    await asyncio.to_thread(s3.put_object, Bucket=bucket, Key=key, Body=content, **extra)


def _s3_client(config: RuntimeConfig) -> Any:
    """boto3's S3 client: region and credentials from the environment as boto3 finds them."""
    import boto3
    import botocore.config

    session = boto3.session.Session()
    options: dict[str, Any] = {}
    if config.s3_endpoint_url:
        options["endpoint_url"] = config.s3_endpoint_url
        options["config"] = botocore.config.Config(s3={"addressing_style": "path"})
    return session.client("s3", region_name=session.region_name or config.region, **options)


def _validate(config: RuntimeConfig, endpoint_name: str, body: bytes) -> Response | None:
    if config.endpoint_name is not None and endpoint_name != config.endpoint_name:
        return _error(400, "ValidationError",
                      {"Message": f"Endpoint {endpoint_name} of account {config.account} not found."})
    if len(body) > config.max_payload_bytes:
        return _error(400, "ValidationError", {
            "Message": f"Request payload of {len(body)} bytes exceeds the maximum of {config.max_payload_bytes} bytes."})
    return None


def _container_request(client: httpx.AsyncClient, request: Request, body: bytes, api: str) -> httpx.Request:
    headers = {name: request.headers[name] for name in _PASSED_HEADERS if name in request.headers}
    if _ACCEPT_HEADER[api] in request.headers:
        headers["accept"] = request.headers[_ACCEPT_HEADER[api]]
    headers["x-amzn-sagemaker-forwarded-api"] = api
    return client.build_request("POST", "/invocations", content=body, headers=headers)


async def _exchange(client: httpx.AsyncClient, outgoing: httpx.Request,
                    limit: int) -> tuple[int, httpx.Headers, bytes]:
    answer = await client.send(outgoing, stream=True)
    try:
        return answer.status_code, answer.headers, await _read_capped(answer, limit)
    finally:
        await answer.aclose()


async def _read_capped(answer: httpx.Response, limit: int) -> bytes:
    """The whole body, stopping as soon as it passes ``limit`` bytes."""
    chunks, size = [], 0
    async for chunk in answer.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise _ResponseTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def _events(config: RuntimeConfig, answer: httpx.Response, deadline: float) -> AsyncIterator[bytes]:
    """The container's chunks as ``PayloadPart`` events, each sent as soon as it arrives."""
    chunks = answer.aiter_bytes()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(anext(chunks), _left(deadline))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                yield eventstream.model_stream_error(
                    f"Your model {config.container_name} did not complete sending the inference response in the "
                    "allotted time.", "ModelInvocationTimeExceeded")
                return
            except httpx.TransportError as exc:
                yield eventstream.model_stream_error(
                    f"The connection to model {config.container_name} broke before the response stream was "
                    f"complete: {_describe(exc)}", "StreamBroken")
                return
            if chunk:
                yield eventstream.payload_part(chunk)
    finally:
        await answer.aclose()


def _response_headers(config: RuntimeConfig, container_headers: httpx.Headers) -> dict[str, str]:
    headers = {"x-Amzn-Invoked-Production-Variant": config.variant_name, "x-amzn-RequestId": str(uuid.uuid4())}
    if "x-amzn-sagemaker-custom-attributes" in container_headers:
        headers["X-Amzn-SageMaker-Custom-Attributes"] = container_headers["x-amzn-sagemaker-custom-attributes"]
    return headers


def _content_type(container_headers: httpx.Headers) -> dict[str, str]:
    # Passed as a header, not as media_type, so that Starlette does not append a charset.
    return {"content-type": container_headers["content-type"]} if "content-type" in container_headers else {}


def _model_error(config: RuntimeConfig, endpoint_name: str, status: int, original_message: str) -> Response:
    """SageMaker's ModelError: 424, the container's status and body, and where its logs are."""
    side = "client" if 400 <= status < 500 else "server"
    log_group = f"/aws/sagemaker/Endpoints/{endpoint_name}"
    console = (f"https://{config.region}.console.aws.amazon.com/cloudwatch/home?region={config.region}"
               f"#logEventViewer:group={log_group}")
    return _error(424, "ModelError", {
        # ErrorCode is not in botocore's model (boto3 ignores it) but SageMaker sends it.
        "ErrorCode": f"{side.upper()}_ERROR_FROM_MODEL",
        "LogStreamArn": f"arn:aws:logs:{config.region}:{config.account}:log-group:{log_group}",
        "Message": (f'Received {side} error ({status}) from {config.container_name} with message '
                    f'"{original_message}". See {console} in account {config.account} for more information.'),
        "OriginalMessage": original_message,
        "OriginalStatusCode": status,
    })


def _error(status: int, error_type: str, members: dict[str, object]) -> Response:
    return JSONResponse(members, status_code=status, headers={
        "x-amzn-ErrorType": error_type + _ERROR_TYPE_SUFFIX, "x-amzn-RequestId": str(uuid.uuid4())})


def _timeout_message(config: RuntimeConfig) -> str:
    # SageMaker's wording for an invocation that passes its 60 s.
    return (f"Your invocation timed out while waiting for a response from container {config.container_name}. "
            "Review the latency metrics for each container in Amazon CloudWatch, resolve the issue, and try again.")


def _unreachable_message(config: RuntimeConfig, exc: httpx.TransportError) -> str:
    return f"Could not reach container {config.container_name} at {config.container_url}: {_describe(exc)}"


def _left(deadline: float) -> float:
    return max(deadline - asyncio.get_running_loop().time(), 0.0)


def _text(content: bytes) -> str:
    return content.decode("utf-8", errors="replace")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m s1_mini.sagemaker.local_runtime", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--container-url", required=True, help="base URL of the container, e.g. http://127.0.0.1:8080")
    a("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    a("--port", type=int, default=8081, help="listen port (default 8081)")
    a("--endpoint-name", help="accept only this endpoint name (default: any)")
    a("--variant-name", default="AllTraffic", help="reported as InvokedProductionVariant (default AllTraffic)")
    a("--region", default="us-east-1", help="region named in ModelError log links (default us-east-1)")
    a("--timeout", type=float, default=60.0, help="seconds the container has per invocation (default 60)")
    a("--max-payload-bytes", type=int, default=MAX_PAYLOAD_BYTES,
      help=f"request and InvokeEndpoint response limit (default {MAX_PAYLOAD_BYTES})")
    a("--async-output-path", help="s3://bucket/prefix where async results go (default: no async inference)")
    a("--async-failure-path", help="s3://bucket/prefix where async failures go (default: the output path)")
    a("--s3-endpoint-url", help="S3 endpoint for async inference, e.g. a moto server (default: AWS)")
    a("--async-invocation-timeout", type=int, default=ASYNC_TIMEOUT_S,
      help=f"seconds an async invocation may take when the call names none (1-{MAX_ASYNC_TIMEOUT_S}, "
           f"default {ASYNC_TIMEOUT_S})")
    a("--async-max-concurrent-invocations", type=int, default=4,
      help="async requests sent to the container at once (MaxConcurrentInvocationsPerInstance, default 4)")
    a("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"])
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    for option, value in (("--async-output-path", args.async_output_path),
                          ("--async-failure-path", args.async_failure_path)):
        if value is not None and not _S3_URI.match(value):
            parser.error(f"{option} must be an s3://bucket[/prefix] URI, not {value!r}")
    if args.async_failure_path and not args.async_output_path:
        parser.error("--async-failure-path needs --async-output-path")
    if not 1 <= args.async_invocation_timeout <= MAX_ASYNC_TIMEOUT_S:
        parser.error(f"--async-invocation-timeout must be between 1 and {MAX_ASYNC_TIMEOUT_S}")
    if not 1 <= args.async_max_concurrent_invocations <= 1000:
        parser.error("--async-max-concurrent-invocations must be between 1 and 1000")
    config = RuntimeConfig(container_url=args.container_url, endpoint_name=args.endpoint_name,
                           variant_name=args.variant_name, region=args.region, timeout_s=args.timeout,
                           max_payload_bytes=args.max_payload_bytes, async_output_path=args.async_output_path,
                           async_failure_path=args.async_failure_path, s3_endpoint_url=args.s3_endpoint_url,
                           async_timeout_s=args.async_invocation_timeout,
                           async_max_concurrency=args.async_max_concurrent_invocations)
    import uvicorn

    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
