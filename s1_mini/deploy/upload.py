"""Upload model.tar.gz to S3 (multipart, with progress and a SHA-256 checksum).

The file's SHA-256 is stored as the object's ``sha256`` metadata; when the object
already exists with the same size and checksum the upload is skipped, so re-running a
pipeline costs nothing. The bucket must be in the context's region (SageMaker reads
model data only from its own region).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from s1_mini.deploy.aws import S3_URI, AwsContext, DeployError, check_number
from s1_mini.deploy.progress import byte_bar, sha256_file

MiB = 1024 * 1024
CHECKSUM_KEY = "sha256"


@dataclass
class UploadResult:
    uri: str
    sha256: str
    size: int
    skipped: bool  # an identical object was already there


def parse_s3_uri(uri: str, file_name: str | None = None) -> tuple[str, str]:
    """``s3://bucket/key`` → (bucket, key); a key ending in ``/`` (or none) gets ``file_name``."""
    match = S3_URI.match(uri or "")
    if not match:
        raise DeployError(f"s3 uri: must look like s3://bucket/key (a bucket name is 3-63 lower-case letters, "
                          f"digits, dots and hyphens), got {uri!r}")
    bucket, key = match.group(1), match.group(2) or ""
    if (not key or key.endswith("/")) and file_name:
        key += file_name
    if not key:
        raise DeployError(f"s3 uri: no key in {uri!r}; use s3://{bucket}/path/model.tar.gz")
    return bucket, key


def bucket_region(ctx: AwsContext, bucket: str) -> str | None:
    """The bucket's region (None in dry-run mode); a missing bucket is a DeployError."""
    try:
        response = ctx.call("s3", "get_bucket_location", Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code in ("NoSuchBucket", "404"):
            raise DeployError(f"bucket: s3://{bucket} does not exist; create it in {ctx.region_name} "
                              "or pass another bucket") from None
        raise
    if ctx.dry_run:
        return None
    location = response.get("LocationConstraint")
    return {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(location, location)


def check_bucket_region(ctx: AwsContext, bucket: str) -> None:
    region = bucket_region(ctx, bucket)
    if region is not None and region != ctx.region_name:
        raise DeployError(f"bucket: s3://{bucket} is in {region} but the deploy region is {ctx.region_name}; "
                          f"SageMaker reads model data only from its own region: use a bucket in "
                          f"{ctx.region_name} or pass --region {region}")


def existing_object(ctx: AwsContext, bucket: str, key: str) -> dict | None:
    try:
        return ctx.call("s3", "head_object", Bucket=bucket, Key=key) or None
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def upload_model(ctx: AwsContext, path: str | Path, s3_uri: str, *, chunk_mb: int = 64,
                 max_concurrency: int = 8, progress: bool = True) -> UploadResult:
    """Upload ``path`` to ``s3_uri`` unless an identical object is already there."""
    path = Path(path)
    if path.is_dir():
        raise DeployError(f"file: {path} is a directory; pass the model.tar.gz that `package` wrote")
    if not path.is_file():
        raise DeployError(f"file: {path} does not exist; run `package` first")
    if chunk_mb < 5:
        raise DeployError(f"chunk_mb: S3 multipart parts must be >= 5 MiB, got {chunk_mb}")
    check_number("max_concurrency", max_concurrency, 1)
    bucket, key = parse_s3_uri(s3_uri, path.name)
    uri = f"s3://{bucket}/{key}"
    check_bucket_region(ctx, bucket)
    size = path.stat().st_size
    digest = sha256_file(path, progress)
    head = existing_object(ctx, bucket, key)
    if head and head.get("ContentLength") == size and head.get("Metadata", {}).get(CHECKSUM_KEY) == digest:
        print(f"{uri} is up to date (sha256 {digest[:12]}…); skipped the upload", file=ctx.out)
        return UploadResult(uri, digest, size, skipped=True)
    config = TransferConfig(multipart_threshold=chunk_mb * MiB, multipart_chunksize=chunk_mb * MiB,
                            max_concurrency=max_concurrency)
    with byte_bar(size, f"upload {path.name}", progress and not ctx.dry_run) as bar:
        ctx.call("s3", "upload_file", Filename=str(path), Bucket=bucket, Key=key,
                 ExtraArgs={"Metadata": {CHECKSUM_KEY: digest}}, Config=config, Callback=bar.update)
    print(f"uploaded {path} to {uri} ({size} bytes, sha256 {digest})", file=ctx.out)
    return UploadResult(uri, digest, size, skipped=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", default="model.tar.gz", help="archive to upload (default: model.tar.gz)")
    parser.add_argument("--s3-uri", required=True,
                        help="s3://bucket/key (a key ending in / gets the file name)")
    parser.add_argument("--chunk-mb", type=int, default=64, help="multipart threshold and part size (MiB)")
    parser.add_argument("--max-concurrency", type=int, default=8, help="parallel part uploads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace, ctx: AwsContext) -> int:
    upload_model(ctx, args.file, args.s3_uri, chunk_mb=args.chunk_mb, max_concurrency=args.max_concurrency,
                 progress=not args.no_progress)
    return 0
