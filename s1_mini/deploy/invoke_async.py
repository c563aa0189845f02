"""Invoke an asynchronous endpoint (``invoke_endpoint_async``) and optionally wait for the result.

The request is ``--text`` or a local JSON request file (``--request``), uploaded first to
``--upload-prefix`` (an ``s3://bucket/prefix``), or an object already in S3
(``--input-location``). Prints the output and failure locations; ``--wait`` polls S3
until one of them appears and writes the audio to ``--out`` (a failure: its message and
exit code 2).

  python -m s1_mini.deploy invoke-async --endpoint s1-mini-async --text "Hello." \\
      --upload-prefix s3://my-bucket/async-in --wait --out hello.wav
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions

from s1_mini.deploy.aws import S3_URI, AwsContext, DeployError, check_number
from s1_mini.deploy.invoke import AUDIO_TYPES, describe_error, load_request



@dataclass
class AsyncInvocation:
    inference_id: str
    input_location: str
    output_location: str
    failure_location: str | None


@dataclass
class AsyncResult:
    succeeded: bool
    location: str
    body: bytes
    content_type: str
    waited_s: float


def split_s3_uri(uri: str, what: str) -> tuple[str, str]:
    match = S3_URI.match(uri or "")
    if not match:
        raise DeployError(f"{what}: {uri!r} is not an s3://bucket/key URI")
    return match.group(1), (match.group(2) or "")


def invoke_async(ctx: AwsContext, endpoint: str, *, request: dict[str, Any] | None = None,
                 input_location: str | None = None, upload_prefix: str | None = None,
                 accept: str | None = None, inference_id: str | None = None,
                 invocation_timeout_s: int | None = None) -> AsyncInvocation | None:
    """Start one async invocation (uploading ``request`` first); None in dry-run mode."""
    if (request is None) == (input_location is None):
        raise DeployError("request: give exactly one of --text/--request (uploaded) or --input-location s3://...")
    if invocation_timeout_s is not None:
        check_number("invocation-timeout", invocation_timeout_s, 1, 3600)  # SageMaker's range
    if input_location is not None:
        split_s3_uri(input_location, "input-location")
    else:
        if not upload_prefix:
            raise DeployError("upload-prefix: a local request must be uploaded first; pass --upload-prefix "
                              "s3://bucket/prefix (or --input-location for an object already in S3)")
        bucket, prefix = split_s3_uri(upload_prefix, "upload-prefix")
        key = f"{prefix.strip('/')}/{inference_id or uuid.uuid4()}.json".lstrip("/")
        ctx.call("s3", "put_object", Bucket=bucket, Key=key, Body=json.dumps(request).encode(),
                 ContentType="application/json")
        input_location = f"s3://{bucket}/{key}"
    params: dict[str, Any] = dict(EndpointName=endpoint, InputLocation=input_location,
                                  ContentType="application/json")
    fmt = str((request or {}).get("format", "wav"))
    params["Accept"] = accept or AUDIO_TYPES.get(fmt, "audio/wav")
    if inference_id:
        params["InferenceId"] = inference_id
    if invocation_timeout_s:
        params["InvocationTimeoutSeconds"] = invocation_timeout_s
    try:
        answer = ctx.call("sagemaker-runtime", "invoke_endpoint_async", **params)
    except botocore.exceptions.ClientError as exc:
        message = exc.response.get("Error", {}).get("Message", "")
        if "not found" in message.lower() and endpoint in message:
            raise DeployError(f"endpoint: {endpoint!r} not found (or not asynchronous) in this region; check "
                              "--endpoint and --region") from None
        raise
    if ctx.dry_run:
        return None
    return AsyncInvocation(answer["InferenceId"], input_location, answer["OutputLocation"],
                           answer.get("FailureLocation"))


def _get(ctx: AwsContext, uri: str) -> dict[str, Any] | None:
    bucket, key = split_s3_uri(uri, "location")
    try:
        found = ctx.client("s3").get_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    found["Bytes"] = found["Body"].read()
    return found


def failure_message(body: bytes) -> str:
    """The container's error (field: message) or the runtime's (ErrorCode: Message) from a failure object."""
    try:
        failure = json.loads(body)
    except ValueError:
        return body.decode("utf-8", errors="replace")[:500]
    error = failure.get("error") if isinstance(failure, dict) else None
    if isinstance(error, dict):
        return describe_error(error)
    if isinstance(failure, dict) and "ErrorCode" in failure:
        return f"{failure['ErrorCode']}: {failure.get('Message')}"
    return json.dumps(failure)[:500]


def check_wait(timeout_s: float, poll_s: float) -> None:
    check_number("timeout", timeout_s, 0, above=True)
    check_number("poll", poll_s, 0, above=True)


def wait_for_result(ctx: AwsContext, invocation: AsyncInvocation, *, timeout_s: float = 900, poll_s: float = 2,
                    out: Path | None = None) -> AsyncResult:
    """Poll S3 for the output (written to ``out``) or the failure object; a DeployError on failure or timeout."""
    check_wait(timeout_s, poll_s)
    start = time.monotonic()
    while True:
        found = _get(ctx, invocation.output_location)
        if found is not None:
            if out is not None:
                Path(out).write_bytes(found["Bytes"])
            return AsyncResult(True, invocation.output_location, found["Bytes"], found.get("ContentType", ""),
                               time.monotonic() - start)
        if invocation.failure_location:
            failed = _get(ctx, invocation.failure_location)
            if failed is not None:
                raise DeployError(f"invoke-async: inference {invocation.inference_id} failed "
                                  f"({invocation.failure_location}): {failure_message(failed['Bytes'])}")
        if time.monotonic() - start > timeout_s:
            raise DeployError(f"invoke-async: no result at {invocation.output_location} after {timeout_s:.0f} s "
                              "(--timeout); it may still come: check the location later")
        time.sleep(poll_s)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--endpoint", required=True, help="async endpoint name")
    a("--text", help="the words to speak")
    a("--request", type=Path, help="a local JSON request file (the /v1/tts body)")
    a("--seed", type=int, help="sampling seed (overrides the request's)")
    a("--format", dest="audio_format", choices=sorted(AUDIO_TYPES), help="audio format (default wav)")
    a("--input-location", help="s3:// URI of a request already in S3 (instead of --text/--request)")
    a("--upload-prefix", help="s3://bucket/prefix where a local request is uploaded first")
    a("--accept", help="Accept (default: the audio type of the format)")
    a("--inference-id", help="InferenceId (default: SageMaker makes one)")
    a("--invocation-timeout", type=int, help="InvocationTimeoutSeconds (1-3600)")
    a("--wait", action="store_true", help="poll S3 until the output or the failure appears")
    a("--timeout", type=float, default=900, help="seconds --wait waits (default 900)")
    a("--poll", type=float, default=2, help="seconds between S3 checks (default 2)")
    a("--out", type=Path, default=Path("speech.wav"), help="where --wait writes the audio (speech.wav)")


def run(args: argparse.Namespace, ctx: AwsContext) -> int:
    request = None
    if args.input_location is None:
        request = load_request(args.text, args.request, seed=args.seed, audio_format=args.audio_format)
    elif args.text is not None or args.request is not None:
        raise DeployError("input-location: give either --input-location or --text/--request, not both")
    if args.wait:  # before the invocation, not after it
        check_wait(args.timeout, args.poll)
    invocation = invoke_async(ctx, args.endpoint, request=request, input_location=args.input_location,
                              upload_prefix=args.upload_prefix, accept=args.accept, inference_id=args.inference_id,
                              invocation_timeout_s=args.invocation_timeout)
    if invocation is None:
        return 0
    print(f"inference {invocation.inference_id}: input {invocation.input_location}", file=ctx.out)
    print(f"output location: {invocation.output_location}", file=ctx.out)
    if invocation.failure_location:
        print(f"failure location: {invocation.failure_location}", file=ctx.out)
    if not args.wait:
        return 0
    result = wait_for_result(ctx, invocation, timeout_s=args.timeout, poll_s=args.poll, out=args.out)
    print(f"wrote {args.out} ({len(result.body)} bytes, {result.content_type}) after {result.waited_s:.1f} s",
          file=ctx.out)
    return 0
