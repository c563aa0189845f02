"""A local stand-in for the SageMaker runtime API in front of any container's ``/invocations``.

Real boto3 ``sagemaker-runtime`` clients made with ``endpoint_url=`` pointing here can call
``invoke_endpoint`` and ``invoke_endpoint_with_response_stream``; each call is forwarded to
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

Usage: ``python -m s1_mini.sagemaker.local_runtime --container-url http://127.0.0.1:8080``.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from s1_mini.sagemaker import eventstream

MAX_PAYLOAD_BYTES = 6_291_456
INVOKE_ENDPOINT = "InvokeEndpoint"
INVOKE_STREAM = "InvokeEndpointWithResponseStream"

# Request headers forwarded as they are (boto3 sends them under these names for both APIs).
_PASSED_HEADERS = ("content-type", "x-amzn-sagemaker-custom-attributes", "x-amzn-sagemaker-inference-id",
                   "x-amzn-sagemaker-session-id")
# Where each API carries the caller's Accept; the container always gets it as Accept.
_ACCEPT_HEADER = {INVOKE_ENDPOINT: "accept", INVOKE_STREAM: "x-amzn-sagemaker-accept"}
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
            yield

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

    return app


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
    a("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"])
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config = RuntimeConfig(container_url=args.container_url, endpoint_name=args.endpoint_name,
                           variant_name=args.variant_name, region=args.region, timeout_s=args.timeout,
                           max_payload_bytes=args.max_payload_bytes)
    import uvicorn

    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
