"""``upload`` against a local moto S3 with real boto3: multipart upload, sha256
metadata, idempotent re-runs, and a bucket in another region refused."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import boto3
import moto_utils
import pytest
from moto_utils import REGION, context

from s1_mini.deploy.aws import DeployError
from s1_mini.deploy.cli import main
from s1_mini.deploy.upload import upload_model

moto_url, moto = moto_utils.moto_url, moto_utils.moto  # the fixtures these tests use


def s3(url: str, region: str = REGION):
    return boto3.client("s3", region_name=region, endpoint_url=url)


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / "model.tar.gz"
    path.write_bytes(os.urandom(6 * 1024 * 1024 + 123))  # > one 5 MiB part: multipart
    return path


def test_upload_multipart_checksum_and_skip(moto: str, archive: Path) -> None:
    s3(moto).create_bucket(Bucket="models")
    ctx = context(moto)
    first = upload_model(ctx, archive, "s3://models/s1-mini/", chunk_mb=5, progress=False)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert (first.uri, first.sha256, first.skipped) == ("s3://models/s1-mini/model.tar.gz", digest, False)
    head = s3(moto).head_object(Bucket="models", Key="s1-mini/model.tar.gz")
    assert head["ContentLength"] == archive.stat().st_size
    assert head["Metadata"]["sha256"] == digest
    assert "-" in head["ETag"]  # a multipart ETag ("<md5 of part md5s>-<parts>")
    body = s3(moto).get_object(Bucket="models", Key="s1-mini/model.tar.gz")["Body"].read()
    assert body == archive.read_bytes()

    again = upload_model(ctx, archive, "s3://models/s1-mini/model.tar.gz", chunk_mb=5, progress=False)
    assert again.skipped
    assert s3(moto).head_object(Bucket="models", Key="s1-mini/model.tar.gz")["ETag"] == head["ETag"]

    archive.write_bytes(archive.read_bytes()[:-1] + b"!")  # same size, other bytes: uploaded again
    changed = upload_model(ctx, archive, "s3://models/s1-mini/", chunk_mb=5, progress=False)
    assert not changed.skipped
    assert s3(moto).head_object(Bucket="models", Key="s1-mini/model.tar.gz")["Metadata"]["sha256"] == \
        hashlib.sha256(archive.read_bytes()).hexdigest()


def test_bucket_in_other_region_is_refused(moto: str, archive: Path) -> None:
    s3(moto, "eu-west-1").create_bucket(Bucket="eu-models",
                                        CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    with pytest.raises(DeployError, match="eu-west-1 but the deploy region is us-east-1"):
        upload_model(context(moto), archive, "s3://eu-models/m/", progress=False)
    assert s3(moto).list_objects_v2(Bucket="eu-models").get("KeyCount") == 0


def test_missing_bucket_and_bad_uri(moto: str, archive: Path) -> None:
    with pytest.raises(DeployError, match="does not exist"):
        upload_model(context(moto), archive, "s3://nope/m/", progress=False)
    with pytest.raises(DeployError, match="s3://bucket/key"):
        upload_model(context(moto), archive, "models/m", progress=False)


def test_cli_upload_dry_run_and_real(moto: str, archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s3(moto).create_bucket(Bucket="models")
    common = ["--region", REGION, "--endpoint-url", moto, "--file", str(archive), "--s3-uri", "s3://models/a/",
              "--no-progress"]
    assert main(["upload", "--dry-run", *common]) == 0
    out = capsys.readouterr().out
    assert "[dry-run] s3.get_bucket_location" in out and "[dry-run] s3.upload_file" in out
    assert s3(moto).list_objects_v2(Bucket="models").get("KeyCount") == 0
    assert main(["upload", *common]) == 0
    assert main(["upload", *common]) == 0
    assert "skipped" in capsys.readouterr().out
    assert main(["upload", "--region", REGION, "--endpoint-url", moto, "--file", str(archive.parent / "x"),
                 "--s3-uri", "s3://models/a/"]) == 2
    assert "run `package` first" in capsys.readouterr().err
