"""The whole deploy path through the CLI, as CI runs it, against a local moto server:
package → upload → register → deploy → autoscale → teardown; and --help everywhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import boto3
import moto_utils
import pytest
from moto_utils import REGION, ROLE_ARN

from s1_mini.deploy.cli import main
from s1_mini.testing.make_checkpoint import make_checkpoint

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/s1-mini:1.0"
MY_STEPS = ("package", "upload", "register", "deploy", "autoscale", "teardown")

moto_url, moto = moto_utils.moto_url, moto_utils.moto  # the fixtures these tests use


def test_pipeline(moto: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_checkpoint(tmp_path / "ckpt", "tiny", seed=0)
    aws = ["--region", REGION, "--endpoint-url", moto]
    archive = tmp_path / "model.tar.gz"
    boto3.client("s3", region_name=REGION, endpoint_url=moto).create_bucket(Bucket="models")
    sm = boto3.client("sagemaker", region_name=REGION, endpoint_url=moto)

    assert main(["package", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(archive), "--no-progress"]) == 0
    assert main(["upload", *aws, "--file", str(archive), "--s3-uri", "s3://models/s1-mini/", "--no-progress"]) == 0
    data = "s3://models/s1-mini/model.tar.gz"
    assert main(["register", *aws, "--group", "s1-mini", "--image-uri", IMAGE, "--model-data-url", data,
                 "--approval", "Approved", "--metadata", "bench.rtf=0.05"]) == 0
    arn = sm.list_model_packages(ModelPackageGroupName="s1-mini")["ModelPackageSummaryList"][0]["ModelPackageArn"]
    assert main(["deploy", *aws, "--endpoint-name", "s1-mini-staging", "--role-arn", ROLE_ARN,
                 "--model-package-arn", arn, "--max-new-tokens", "1024", "--poll", "1"]) == 0
    assert sm.describe_endpoint(EndpointName="s1-mini-staging")["EndpointStatus"] == "InService"
    assert main(["autoscale", *aws, "--endpoint-name", "s1-mini-staging", "--min-instances", "1",
                 "--max-instances", "4", "--metric", "concurrency", "--target", "6"]) == 0
    assert main(["teardown", *aws, "--endpoint-name", "s1-mini-staging", "--yes"]) == 0
    assert sm.list_endpoints()["Endpoints"] == [] and sm.list_models()["Models"] == []
    assert sm.list_endpoint_configs()["EndpointConfigs"] == []
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("step", MY_STEPS)
def test_every_step_has_help(step: str) -> None:
    out = subprocess.run([sys.executable, "-m", "s1_mini.deploy", step, "--help"], capture_output=True,
                         text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    for option in ("--dry-run", "--region", "--profile"):
        assert option in out.stdout
