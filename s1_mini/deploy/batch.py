"""Run a batch transform over a JSONL file of requests and check every line came back.

Uploads the JSONL (one ``/v1/tts`` request per line) to S3, creates a transform job
(``SplitType=Line``, ``application/jsonlines`` in and out, ``BatchStrategy=MultiRecord``,
``AssembleWith=Line``), waits for it, downloads ``<input name>.out`` and checks that every
input line has exactly one output line, in order; names the lines that failed (exit code
1 if any failed or the counts differ). ``--audio-dir`` writes each line's audio.

``--local-container-url`` runs the transform locally instead of creating a job, as
SageMaker would: the same mini-batches (at most ``--max-payload-mb`` each,
``--max-concurrent-transforms`` at once) posted to the container's ``/invocations``, the
answers assembled line by line and written where the job would write them.

  python -m s1_mini.deploy batch --input requests.jsonl --s3-prefix s3://my-bucket/batch \\
      --model s1-mini-model --instance-type ml.g5.xlarge --audio-dir out/
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.exceptions

from s1_mini.deploy.aws import S3_URI, AwsContext, DeployError, check_number
from s1_mini.deploy.deploy import NAME_RE

JSONL = "application/jsonlines"
DEFAULT_INSTANCE_TYPE = "ml.g5.xlarge"


@dataclass
class BatchResult:
    job_name: str
    input_uri: str
    output_uri: str
    lines: int  # input lines
    outputs: int  # output lines
    failed: list[tuple[int, str]] = field(default_factory=list)  # (1-based line, message)
    audio_files: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lines == self.outputs and not self.failed


def split_s3_uri(uri: str, what: str = "s3-prefix") -> tuple[str, str]:
    match = S3_URI.match(uri or "")
    if not match:
        raise DeployError(f"{what}: {uri!r} is not an s3://bucket[/prefix] URI")
    return match.group(1), (match.group(2) or "").strip("/")


def read_requests(path: Path) -> list[bytes]:
    """The input's lines (bytes, without newlines); blank lines are refused (SageMaker sends each line)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DeployError(f"input: cannot read {path}: {exc.strerror}") from None
    lines = data.decode("utf-8", errors="strict").splitlines() if data else []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise DeployError(f"input: line {number} of {path} is empty; remove blank lines (every line is sent "
                              "as one request)")
    if not lines:
        raise DeployError(f"input: {path} has no requests; write one JSON request per line")
    return [line.encode() for line in lines]


def mini_batches(lines: list[bytes], max_payload_mb: int) -> list[tuple[int, int]]:
    """[start, end) line ranges whose newline-joined size fits in ``max_payload_mb``, as MultiRecord packs them."""
    limit = max_payload_mb * 1024 * 1024
    batches: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, line in enumerate(lines):
        if len(line) + 1 > limit:
            raise DeployError(f"input: line {i + 1} is {len(line)} bytes, more than --max-payload-mb "
                              f"{max_payload_mb}; shorten it or raise the limit")
        if i > start and size + len(line) + 1 > limit:
            batches.append((start, i))
            start, size = i, 0
        size += len(line) + 1
    batches.append((start, len(lines)))
    return batches


def transform_locally(container_url: str, lines: list[bytes], *, max_payload_mb: int = 6,
                      max_concurrent_transforms: int = 1, timeout_s: float = 600) -> bytes:
    """What a MultiRecord transform job does with one ``SplitType=Line`` input: the assembled output."""
    import httpx

    batches = mini_batches(lines, max_payload_mb)

    def post(bounds: tuple[int, int]) -> bytes:
        start, end = bounds
        try:
            answer = httpx.post(f"{container_url.rstrip('/')}/invocations", content=b"\n".join(lines[start:end]),
                                headers={"Content-Type": JSONL, "Accept": JSONL}, timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise DeployError(f"local-container-url: {container_url} did not answer lines {start + 1}-{end}: "
                              f"{exc!r}; is the container running?") from None
        if answer.status_code != 200:
            raise DeployError(f"local transform: the container answered {answer.status_code} for lines "
                              f"{start + 1}-{end} (a transform job would fail): {answer.text[:500]}")
        return answer.content.rstrip(b"\n")

    with ThreadPoolExecutor(max(1, max_concurrent_transforms)) as pool:
        parts = list(pool.map(post, batches))
    return b"\n".join(parts) + b"\n"


def check_output(lines: list[bytes], output: bytes, audio_dir: Path | None = None
                 ) -> tuple[int, list[tuple[int, str]], list[Path]]:
    """(output line count, failed lines, audio files written): one output line per input line, in order."""
    outputs = output.decode("utf-8", errors="replace").splitlines()
    failed: list[tuple[int, str]] = []
    written: list[Path] = []
    if audio_dir is not None:
        audio_dir.mkdir(parents=True, exist_ok=True)
    for number, line in enumerate(outputs, 1):
        try:
            record = json.loads(line)
        except ValueError:
            failed.append((number, f"output line is not JSON: {line[:200]!r}"))
            continue
        if not isinstance(record, dict) or "error" in record or "audio" not in record:
            error = record.get("error") if isinstance(record, dict) else None
            if isinstance(error, dict):
                message = re.sub(r"^line \d+: ", "", str(error.get("message", "")))
                where = f"{error['field']}: " if error.get("field") and not message.startswith(error["field"]) else ""
                failed.append((number, f"{error.get('status', '')} {where}{message}".strip()))
            else:
                failed.append((number, f"no audio in the output line: {line[:200]!r}"))
            continue
        if audio_dir is not None:
            path = audio_dir / f"line-{number:05d}.{record.get('format', 'wav')}"
            path.write_bytes(base64.b64decode(record["audio"]))
            written.append(path)
    return len(outputs), failed, written


def transform_job_request(job_name: str, model: str, input_uri: str, output_uri: str, *, instance_type: str,
                          instance_count: int, max_payload_mb: int, max_concurrent_transforms: int,
                          invocation_timeout_s: int, max_retries: int,
                          environment: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``create_transform_job`` parameters for one JSONL input object."""
    params: dict[str, Any] = dict(
        TransformJobName=job_name, ModelName=model, BatchStrategy="MultiRecord", MaxPayloadInMB=max_payload_mb,
        MaxConcurrentTransforms=max_concurrent_transforms,
        ModelClientConfig={"InvocationsTimeoutInSeconds": invocation_timeout_s, "InvocationsMaxRetries": max_retries},
        TransformInput={"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": input_uri}},
                        "ContentType": JSONL, "CompressionType": "None", "SplitType": "Line"},
        TransformOutput={"S3OutputPath": output_uri, "Accept": JSONL, "AssembleWith": "Line"},
        TransformResources={"InstanceType": instance_type, "InstanceCount": instance_count})
    if environment:
        params["Environment"] = environment
    return params


def wait_for_job(ctx: AwsContext, job_name: str, timeout_s: float, delay_s: float = 30) -> dict[str, Any]:
    """Wait with the boto3 waiter (``timeout_s`` at most); the final description, or a DeployError."""
    waiter = ctx.client("sagemaker").get_waiter("transform_job_completed_or_stopped")
    delay = max(1, int(min(delay_s, timeout_s)))
    try:
        waiter.wait(TransformJobName=job_name,
                    WaiterConfig={"Delay": delay, "MaxAttempts": max(1, int(timeout_s // delay))})
    except botocore.exceptions.WaiterError as exc:
        last = exc.last_response or {}
        if "TransformJobStatus" not in last:
            raise DeployError(f"batch: waiting for transform job {job_name}: {exc}") from None
        if last["TransformJobStatus"] in ("InProgress", "Stopping"):
            raise DeployError(f"batch: transform job {job_name} still {last['TransformJobStatus']} after "
                              f"{timeout_s:.0f} s (--timeout); it goes on: check it with describe-transform-job "
                              "or stop it") from None
    job = ctx.call("sagemaker", "describe_transform_job", TransformJobName=job_name)
    if job["TransformJobStatus"] != "Completed":
        raise DeployError(f"batch: transform job {job_name} {job['TransformJobStatus']}: "
                          f"{job.get('FailureReason') or 'no failure reason given'}")
    return job


def batch(ctx: AwsContext, input_path: Path, s3_prefix: str, *, model: str | None = None,
          job_name: str | None = None, instance_type: str = DEFAULT_INSTANCE_TYPE, instance_count: int = 1,
          max_payload_mb: int = 6, max_concurrent_transforms: int = 1, invocation_timeout_s: int = 600,
          max_retries: int = 1, timeout_s: float = 3600, poll_s: float = 30,
          environment: dict[str, str] | None = None, local_container_url: str | None = None,
          audio_dir: Path | None = None, download_to: Path | None = None) -> BatchResult | None:
    """Upload, transform (a job, or locally against a container), download and check. None in dry-run mode."""
    input_path = Path(input_path)
    bucket, prefix = split_s3_uri(s3_prefix)
    check_number("instance-count", instance_count, 1)
    check_number("invocation-timeout", invocation_timeout_s, 1, 3600)  # SageMaker's range
    check_number("timeout", timeout_s, 0, above=True)
    check_number("poll", poll_s, 0, above=True)
    if job_name is not None and not NAME_RE.match(job_name):
        raise DeployError(f"job-name: {job_name!r} must be 1-63 letters, digits and hyphens")
    if local_container_url is not None and not local_container_url.startswith(("http://", "https://")):
        raise DeployError(f"local-container-url: must be an http:// or https:// URL, got {local_container_url!r}")
    if not 1 <= max_payload_mb <= 100:
        raise DeployError("max-payload-mb: must be between 1 and 100")
    if not 1 <= max_concurrent_transforms:
        raise DeployError("max-concurrent-transforms: must be at least 1")
    if local_container_url is None and not model:
        raise DeployError("model: a transform job needs --model (the SageMaker model name); or pass "
                          "--local-container-url to run the transform locally")
    lines = read_requests(input_path)
    job_name = job_name or f"s1-mini-batch-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    base = f"{prefix}/{job_name}" if prefix else job_name
    input_key = f"{base}/input/{input_path.name}"
    output_prefix = f"{base}/output"
    input_uri = f"s3://{bucket}/{input_key}"
    output_uri = f"s3://{bucket}/{output_prefix}"
    output_key = f"{output_prefix}/{input_path.name}.out"

    ctx.call("s3", "put_object", Bucket=bucket, Key=input_key, Body=b"\n".join(lines) + b"\n",
             ContentType=JSONL)
    print(f"uploaded {len(lines)} requests to {input_uri}", file=ctx.out)
    if local_container_url is not None:
        print(f"running the transform locally against {local_container_url}", file=ctx.out)
        if ctx.dry_run:
            return None
        output = transform_locally(local_container_url, lines, max_payload_mb=max_payload_mb,
                                   max_concurrent_transforms=max_concurrent_transforms,
                                   timeout_s=invocation_timeout_s)
        ctx.call("s3", "put_object", Bucket=bucket, Key=output_key, Body=output, ContentType=JSONL)
    else:
        params = transform_job_request(job_name, model, input_uri, output_uri, instance_type=instance_type,
                                       instance_count=instance_count, max_payload_mb=max_payload_mb,
                                       max_concurrent_transforms=max_concurrent_transforms,
                                       invocation_timeout_s=invocation_timeout_s, max_retries=max_retries,
                                       environment=environment)
        ctx.call("sagemaker", "create_transform_job", **params)
        if ctx.dry_run:
            return None
        print(f"transform job {job_name} created; waiting (at most {timeout_s:.0f} s)", file=ctx.out)
        wait_for_job(ctx, job_name, timeout_s, poll_s)
    try:
        output = ctx.client("s3").get_object(Bucket=bucket, Key=output_key)["Body"].read()
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            raise DeployError(f"batch: the job finished but wrote nothing at s3://{bucket}/{output_key}; "
                              "check the job's CloudWatch logs") from None
        raise
    if download_to is not None:
        Path(download_to).write_bytes(output)
    outputs, failed, written = check_output(lines, output, audio_dir)
    return BatchResult(job_name, input_uri, f"s3://{bucket}/{output_key}", len(lines), outputs, failed, written)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--input", type=Path, required=True, help="local JSONL file, one /v1/tts request per line")
    a("--s3-prefix", required=True, help="s3://bucket/prefix; input and output go under <prefix>/<job name>/")
    a("--model", help="SageMaker model name the job runs (needed unless --local-container-url)")
    a("--job-name", help="transform job name (default s1-mini-batch-<UTC time>)")
    a("--instance-type", default=DEFAULT_INSTANCE_TYPE, help=f"default {DEFAULT_INSTANCE_TYPE}")
    a("--instance-count", type=int, default=1, help="default 1")
    a("--max-payload-mb", type=int, default=6, help="largest mini-batch of lines, MB (default 6)")
    a("--max-concurrent-transforms", type=int, default=1, help="mini-batches per instance at once (default 1)")
    a("--invocation-timeout", type=int, default=600, help="seconds per mini-batch (default 600)")
    a("--timeout", type=float, default=3600, help="seconds to wait for the job (default 3600)")
    a("--poll", type=float, default=30, help="seconds between status checks (default 30)")
    a("--env", action="append", default=[], metavar="KEY=VALUE", help="container environment (repeatable)")
    a("--audio-dir", type=Path, help="write each line's audio here (line-00001.wav, ...)")
    a("--download", type=Path, help="also save the raw output JSONL here")
    a("--local-container-url", help="run the transform locally against this container (e.g. "
                                    "http://127.0.0.1:8080), as SageMaker would, instead of creating a job")


def run(args: argparse.Namespace, ctx: AwsContext) -> int:
    environment = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DeployError(f"env: {item!r} is not KEY=VALUE")
        environment[key] = value
    result = batch(ctx, args.input, args.s3_prefix, model=args.model, job_name=args.job_name,
                   instance_type=args.instance_type, instance_count=args.instance_count,
                   max_payload_mb=args.max_payload_mb, max_concurrent_transforms=args.max_concurrent_transforms,
                   invocation_timeout_s=args.invocation_timeout, timeout_s=args.timeout, poll_s=args.poll,
                   environment=environment or None, local_container_url=args.local_container_url,
                   audio_dir=args.audio_dir, download_to=args.download)
    if result is None:
        return 0
    print(f"output {result.output_uri}: {result.outputs} lines for {result.lines} requests, "
          f"{len(result.failed)} failed", file=ctx.out)
    for number, message in result.failed:
        print(f"  line {number}: {message}", file=ctx.out)
    if result.outputs != result.lines:
        print(f"error: {result.lines} requests but {result.outputs} output lines; the output cannot be matched "
              "to the input", file=sys.stderr)
    if result.audio_files:
        print(f"wrote {len(result.audio_files)} audio files to {args.audio_dir}", file=ctx.out)
    return 0 if result.ok else 1
