"""``register`` against a local moto server with real boto3: package group created
once, model package versions with the inference specification and metadata."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import moto_utils
import pytest
from moto_utils import REGION, context

from s1_mini.deploy.aws import DeployError
from s1_mini.deploy.cli import main
from s1_mini.deploy.register import (
    CONTENT_TYPES,
    DEFAULT_REALTIME_TYPES,
    register_model,
)

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/s1-mini:1.0"
DATA = "s3://models/s1-mini/model.tar.gz"

moto_url, moto = moto_utils.moto_url, moto_utils.moto  # the fixtures these tests use


def sm(url: str):
    return boto3.client("sagemaker", region_name=REGION, endpoint_url=url)


def test_register_group_and_versions(moto: str) -> None:
    first = register_model(context(moto), "s1-mini", image_uri=IMAGE, model_data_url=DATA, approval_status="Approved",
                           description="S1-mini TTS", environment={"S1_MINI_PRECISION": "bfloat16"},
                           commit="abc123", repository="https://github.com/example/s1-mini",
                           metadata={"bench.rtf": "0.05", "bench.ttfb_ms": "180"})
    assert first.group_created and first.model_package_arn
    second = register_model(context(moto), "s1-mini", image_uri=IMAGE, model_data_url=DATA)
    assert not second.group_created
    client = sm(moto)
    assert [g["ModelPackageGroupName"] for g in client.list_model_package_groups()["ModelPackageGroupSummaryList"]] \
        == ["s1-mini"]
    versions = client.list_model_packages(ModelPackageGroupName="s1-mini")["ModelPackageSummaryList"]
    assert len(versions) == 2
    package = client.describe_model_package(ModelPackageName=first.model_package_arn)
    assert package["ModelApprovalStatus"] == "Approved"
    spec = package["InferenceSpecification"]
    assert spec["Containers"][0]["Image"] == IMAGE and spec["Containers"][0]["ModelDataUrl"] == DATA
    assert spec["Containers"][0]["Environment"] == {"S1_MINI_PRECISION": "bfloat16"}
    assert spec["SupportedContentTypes"] == CONTENT_TYPES
    assert spec["SupportedResponseMIMETypes"][0] == "audio/wav"
    assert spec["SupportedRealtimeInferenceInstanceTypes"] == DEFAULT_REALTIME_TYPES
    assert "ml.g5.xlarge" in spec["SupportedTransformInstanceTypes"]
    assert package["MetadataProperties"]["CommitId"] == "abc123"
    assert package["CustomerMetadataProperties"] == {"bench.rtf": "0.05", "bench.ttfb_ms": "180"}
    assert client.describe_model_package(ModelPackageName=second.model_package_arn)["ModelApprovalStatus"] == \
        "PendingManualApproval"


@pytest.mark.parametrize("kwargs, message", [
    (dict(approval_status="Yes"), "approval_status: must be one of"),
    (dict(model_data_url="models/m.tar.gz"), "model_data_url: must be an s3:// URL"),
    (dict(realtime_instance_types=["ml.m5.large"]), "instance_type: ml.m5.large is not in a GPU family"),
    (dict(environment={"S1_MINI_NOPE": "1"}), "S1_MINI_NOPE is not an EngineConfig variable"),
    (dict(metadata={"k": "x" * 300}), "metadata: value of k must be 1-256"),
])
def test_bad_input_creates_nothing(moto: str, kwargs: dict, message: str) -> None:
    params = dict(image_uri=IMAGE, model_data_url=DATA)
    params.update(kwargs)
    with pytest.raises(DeployError, match=message):
        register_model(context(moto), "s1-mini", **params)
    assert sm(moto).list_model_package_groups()["ModelPackageGroupSummaryList"] == []


def test_cli_register_with_benchmark_json(moto: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rtf": 0.04, "latency": {"p50_ms": 210, "p99_ms": 480}, "ok": True}))
    common = ["--region", REGION, "--endpoint-url", moto, "--group", "s1-mini", "--image-uri", IMAGE,
              "--model-data-url", DATA]
    assert main(["register", "--dry-run", *common]) == 0
    assert "[dry-run] sagemaker.create_model_package(" in capsys.readouterr().out
    assert sm(moto).list_model_package_groups()["ModelPackageGroupSummaryList"] == []
    assert main(["register", *common, "--approval", "Approved", "--benchmark-json", str(bench),
                 "--metadata", "gpu=A10G"]) == 0
    arn = sm(moto).list_model_packages(ModelPackageGroupName="s1-mini")["ModelPackageSummaryList"][0]["ModelPackageArn"]
    package = sm(moto).describe_model_package(ModelPackageName=arn)
    assert package["CustomerMetadataProperties"] == {"bench.rtf": "0.04", "bench.latency.p50_ms": "210",
                                                     "bench.latency.p99_ms": "480", "gpu": "A10G"}
    assert len(package["MetadataProperties"]["CommitId"]) == 40  # this checkout's HEAD
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses it, naming the choices
        main(["register", *common, "--approval", "maybe"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'maybe'" in capsys.readouterr().err
