"""Invoke a real-time endpoint once and write the audio (a smoke test, or a quick listen).

``invoke_endpoint`` by default (prints the latency); ``--stream`` uses
``invoke_endpoint_with_response_stream`` and writes the audio as it arrives (prints the
time to first byte and the total). The request is ``--text`` (with ``--seed``/``--format``)
or a JSON request file (``--request``, the body of ``POST /v1/tts``).

  python -m s1_mini.deploy invoke --endpoint s1-mini-staging --text "Hello." --out hello.wav
  python -m s1_mini.deploy invoke --endpoint s1-mini-staging --request req.json --out a.wav --stream
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions

from s1_mini.deploy.aws import AwsContext, DeployError

AUDIO_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "opus": "audio/ogg",
               "pcm": "audio/pcm"}


@dataclass
class InvokeResult:
    out: Path | None  # None in dry-run mode
    bytes: int
    content_type: str
    latency_s: float  # the whole call, until the last byte
    first_byte_s: float | None = None  # streaming only


def load_request(text: str | None = None, request_file: Path | None = None, *, seed: int | None = None,
                 audio_format: str | None = None) -> dict[str, Any]:
    """The request body: ``{"text": ...}`` from ``text``, or the JSON object in ``request_file``."""
    if (text is None) == (request_file is None):
        raise DeployError("request: give exactly one of --text or --request FILE")
    if request_file is not None:
        try:
            request = json.loads(Path(request_file).read_text())
        except OSError as exc:
            raise DeployError(f"request: cannot read {request_file}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise DeployError(f"request: {request_file} is not JSON ({exc}); write the /v1/tts request body "
                              'as a JSON object, e.g. {"text": "Hello."}') from None
        if not isinstance(request, dict) or not isinstance(request.get("text"), str):
            raise DeployError(f'request: {request_file} must be a JSON object with a "text" string')
    else:
        if not text.strip():
            raise DeployError("text: empty; pass the words to speak with --text")
        request = {"text": text}
    if seed is not None:
        request["seed"] = seed
    if audio_format is not None:
        request["format"] = audio_format
    return request


def describe_error(error: dict[str, Any]) -> str:
    """``[status] field: message`` from the container's ``{"error": {...}}`` (the field named once)."""
    message = str(error.get("message", ""))
    field = error.get("field")
    where = f"{field}: " if field and not message.startswith(f"{field}:") else ""
    status = f"{error['status']} " if error.get("status") else ""
    return f"{status}{where}{message}"


def model_error_message(exc: botocore.exceptions.ClientError) -> str:
    """The container's own error (status, field, message) from a ModelError, else boto's message."""
    response = exc.response
    status = response.get("OriginalStatusCode")
    try:
        error = json.loads(response.get("OriginalMessage", ""))["error"]
        return f"the model refused the request: {describe_error({'status': status, **error})}"
    except (ValueError, KeyError, TypeError):
        err = response.get("Error", {})
        return f"{err.get('Code')}: {err.get('Message')}" + (f" (status {status})" if status else "")


def invoke(ctx: AwsContext, endpoint: str, request: dict[str, Any], out: Path, *, stream: bool = False,
           accept: str | None = None, custom_attributes: str | None = None) -> InvokeResult:
    """Invoke ``endpoint`` with ``request`` (JSON) and write the audio to ``out``."""
    accept = accept or AUDIO_TYPES.get(str(request.get("format", "wav")), "audio/wav")
    params: dict[str, Any] = dict(EndpointName=endpoint, ContentType="application/json", Accept=accept,
                                  Body=json.dumps(request).encode())
    if custom_attributes:
        params["CustomAttributes"] = custom_attributes
    out = Path(out)
    if out.parent and not out.parent.exists():
        raise DeployError(f"out: folder {out.parent} does not exist; create it or pass another --out")
    if out.is_dir():
        raise DeployError(f"out: {out} is a directory; pass a file name such as {out / 'speech.wav'}")
    start = time.monotonic()
    try:
        if not stream:
            answer = ctx.call("sagemaker-runtime", "invoke_endpoint", **params)
            if ctx.dry_run:
                return InvokeResult(None, 0, accept, 0.0)
            body = answer["Body"].read()
            latency = time.monotonic() - start
            out.write_bytes(body)
            return InvokeResult(out, len(body), answer.get("ContentType", accept), latency)
        answer = ctx.call("sagemaker-runtime", "invoke_endpoint_with_response_stream", **params)
        if ctx.dry_run:
            return InvokeResult(None, 0, accept, 0.0, 0.0)
        first = None
        size = 0
        with open(out, "wb") as f:
            for event in answer["Body"]:
                part = event.get("PayloadPart")
                if part is None:
                    error = event.get("ModelStreamError") or event.get("InternalStreamFailure") or event
                    raise DeployError(f"invoke: the stream broke after {size} bytes: {error}")
                if first is None:
                    first = time.monotonic() - start
                f.write(part["Bytes"])
                size += len(part["Bytes"])
        if size == 0:
            raise DeployError("invoke: the endpoint streamed no audio")
        return InvokeResult(out, size, answer.get("ContentType", accept), time.monotonic() - start, first)
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "ModelError":
            raise DeployError(f"invoke: {model_error_message(exc)}") from None
        if code in ("ValidationError", "ValidationException") and "not found" in str(exc).lower():
            raise DeployError(f"endpoint: {endpoint!r} not found in this region; check --endpoint and --region") \
                from None
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", required=True, help="endpoint name")
    parser.add_argument("--text", help="the words to speak")
    parser.add_argument("--request", type=Path, help="a JSON request file (the /v1/tts body) instead of --text")
    parser.add_argument("--seed", type=int, help="sampling seed (overrides the request's)")
    parser.add_argument("--format", dest="audio_format", choices=sorted(AUDIO_TYPES),
                        help="audio format (overrides the request's; default wav)")
    parser.add_argument("--accept", help="Accept header (default: the audio type of the format)")
    parser.add_argument("--stream", action="store_true",
                        help="use invoke_endpoint_with_response_stream and print the time to first byte")
    parser.add_argument("--out", type=Path, default=Path("speech.wav"), help="where the audio goes (speech.wav)")


def run(args: argparse.Namespace, ctx: AwsContext) -> int:
    request = load_request(args.text, args.request, seed=args.seed, audio_format=args.audio_format)
    result = invoke(ctx, args.endpoint, request, args.out, stream=args.stream, accept=args.accept)
    if result.out is None:
        return 0
    line = f"wrote {result.out} ({result.bytes} bytes, {result.content_type}); "
    if result.first_byte_s is not None:
        line += f"time to first byte {result.first_byte_s * 1000:.0f} ms, "
    print(line + f"total {result.latency_s * 1000:.0f} ms", file=ctx.out)
    return 0
