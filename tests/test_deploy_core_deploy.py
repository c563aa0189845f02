"""``deploy`` and ``teardown`` against a local moto server with real boto3 clients.

moto 5.2.5 does not implement ``update_endpoint`` (it answers 500). The update tests
therefore check the exact wire request we send with a botocore ``before-call`` event
hook on that one operation (it returns a canned 200 instead of sending); every other
call goes to moto. The hook can also play AWS's part by moving moto's endpoint to the
new config (a successful update) or leave it (a rolled-back one). One test injects a
server-side failure of ``create_endpoint`` (a moto backend method wrapped in this
process) to check that the model and config of that run are deleted again. Teardown
with ``--delete-model-packages`` checks its ``delete_model_package`` request the same
way (moto lacks that operation too).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import moto_utils
import pytest
from botocore.awsrequest import AWSResponse
from moto.sagemaker.exceptions import ValidationError
from moto.sagemaker.models import SageMakerModelBackend, sagemaker_backends
from moto_utils import REGION, ROLE_ARN, context

from s1_mini.deploy.autoscale import autoscale_endpoint
from s1_mini.deploy.aws import AwsContext, DeployError
from s1_mini.deploy.cli import main
from s1_mini.deploy.deploy import BlueGreen, deploy_endpoint
from s1_mini.deploy.teardown import teardown_endpoint

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/s1-mini:1.0"
DATA = "s3://models/s1-mini/model.tar.gz"

moto_url, moto = moto_utils.moto_url, moto_utils.moto  # the fixtures these tests use


def sm(url: str):
    return boto3.client("sagemaker", region_name=REGION, endpoint_url=url)


def state(url: str) -> dict[str, list[str]]:
    client = sm(url)
    return {"models": sorted(m["ModelName"] for m in client.list_models()["Models"]),
            "configs": sorted(c["EndpointConfigName"] for c in client.list_endpoint_configs()["EndpointConfigs"]),
            "endpoints": sorted(e["EndpointName"] for e in client.list_endpoints()["Endpoints"])}


EMPTY = {"models": [], "configs": [], "endpoints": []}


def raw(ctx: AwsContext, name: str = "tts", **kwargs: Any):
    return deploy_endpoint(ctx, name, role_arn=ROLE_ARN, image_uri=IMAGE, model_data_url=DATA, poll=1,
                           timeout=10, **kwargs)


class UpdateHook:
    """Answers UpdateEndpoint locally (moto lacks it) and keeps the request body."""

    def __init__(self, ctx: AwsContext, apply: bool) -> None:
        self.requests: list[dict[str, Any]] = []
        self.apply = apply
        ctx.client("sagemaker").meta.events.register("before-call.sagemaker.UpdateEndpoint", self)

    def __call__(self, params: dict[str, Any], **_: Any):
        body = json.loads(params["body"])
        self.requests.append(body)
        if self.apply:  # what AWS does once the new fleet is in service
            endpoint = sagemaker_backends["123456789012"][REGION].endpoints[body["EndpointName"]]
            endpoint.endpoint_config_name = body["EndpointConfigName"]
        arn = f"arn:aws:sagemaker:{REGION}:123456789012:endpoint/{body['EndpointName']}"
        return AWSResponse(params["url"], 200, {}, None), {"EndpointArn": arn}


def test_create_from_image_and_model_data(moto: str) -> None:
    result = raw(context(moto), environment={"S1_MINI_MAX_NEW_TOKENS": "512", "OTHER": "x"},
                 async_output_path="s3://models/async-out/", async_max_concurrent=4)
    assert (result.action, result.status) == ("create", "InService")
    client = sm(moto)
    endpoint = client.describe_endpoint(EndpointName="tts")
    assert endpoint["EndpointConfigName"] == result.endpoint_config_name
    assert result.endpoint_config_name.startswith("tts-20")
    config = client.describe_endpoint_config(EndpointConfigName=result.endpoint_config_name)
    variant = config["ProductionVariants"][0]
    assert (variant["InstanceType"], variant["InitialInstanceCount"], variant["ModelName"]) == \
        ("ml.g5.xlarge", 1, result.model_name)
    assert config["AsyncInferenceConfig"] == {
        "OutputConfig": {"S3OutputPath": "s3://models/async-out/"},
        "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 4}}
    model = client.describe_model(ModelName=result.model_name)
    assert model["ExecutionRoleArn"] == ROLE_ARN
    assert model["PrimaryContainer"]["Image"] == IMAGE and model["PrimaryContainer"]["ModelDataUrl"] == DATA
    assert model["PrimaryContainer"]["Environment"] == {"S1_MINI_MAX_NEW_TOKENS": "512", "OTHER": "x"}


def test_update_sends_blue_green_and_rollback_alarms(moto: str) -> None:
    first = raw(context(moto))
    ctx = context(moto)
    hook = UpdateHook(ctx, apply=True)
    second = raw(ctx, blue_green=BlueGreen("CANARY", step_percent=10, wait_seconds=600, termination_wait_seconds=60),
                 rollback_alarms=["tts-5xx", "tts-latency"])
    assert (second.action, second.status) == ("update", "InService")
    assert hook.requests == [{
        "EndpointName": "tts", "EndpointConfigName": second.endpoint_config_name,
        "DeploymentConfig": {
            "BlueGreenUpdatePolicy": {
                "TrafficRoutingConfiguration": {"Type": "CANARY", "WaitIntervalInSeconds": 600,
                                                "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 10}},
                "TerminationWaitInSeconds": 60},
            "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": "tts-5xx"}, {"AlarmName": "tts-latency"}]}}}]
    # a new config per deploy; the old one stays until teardown
    assert state(moto)["configs"] == sorted([first.endpoint_config_name, second.endpoint_config_name])
    assert sm(moto).describe_endpoint(EndpointName="tts")["EndpointConfigName"] == second.endpoint_config_name


def test_rolled_back_update_is_an_error_and_cleans_up(moto: str) -> None:
    first = raw(context(moto))
    ctx = context(moto)
    UpdateHook(ctx, apply=False)  # the endpoint stays on the old config, as after an auto-rollback
    with pytest.raises(DeployError, match="rolled back"):
        raw(ctx, rollback_alarms=["tts-5xx"])
    assert state(moto) == {"models": [first.model_name], "configs": [first.endpoint_config_name],
                           "endpoints": ["tts"]}


@pytest.mark.parametrize("kwargs, message", [
    (dict(role_arn=None), "role_arn: required"),
    (dict(role_arn="admin"), "not an IAM role ARN"),
    (dict(instance_type="ml.m5.xlarge"), "not in a GPU family S1-mini supports; use one of ml.g4dn, ml.g5"),
    (dict(instance_type="ml.g5.3xlarge"), "ml.g5 has no size '3xlarge'"),
    (dict(instance_type="g5.xlarge"), "not a SageMaker instance type"),
    (dict(serverless=True), "serverless inference has no GPUs"),
    (dict(environment={"S1_MINI_PRECISON": "float16"}), "S1_MINI_PRECISON is not an EngineConfig variable"),
    (dict(environment={"S1_MINI_MAX_BATCH_SIZE": "lots"}), "S1_MINI_MAX_BATCH_SIZE: must be a int"),
    (dict(model_data_url=None), "pass --model-package-arn"),
    (dict(async_max_concurrent=2), "needs --async-output-path"),
])
def test_bad_input_creates_nothing(moto: str, kwargs: dict[str, Any], message: str) -> None:
    params = dict(role_arn=ROLE_ARN, image_uri=IMAGE, model_data_url=DATA)
    params.update(kwargs)
    with pytest.raises(DeployError, match=message):
        deploy_endpoint(context(moto), "tts", **params)
    assert state(moto) == EMPTY


def test_unapproved_or_missing_package_is_refused(moto: str) -> None:
    client = sm(moto)
    client.create_model_package_group(ModelPackageGroupName="s1-mini")
    arn = client.create_model_package(
        ModelPackageGroupName="s1-mini", ModelApprovalStatus="PendingManualApproval",
        InferenceSpecification={"Containers": [{"Image": IMAGE, "ModelDataUrl": DATA}],
                                "SupportedContentTypes": ["application/json"],
                                "SupportedResponseMIMETypes": ["audio/wav"]})["ModelPackageArn"]
    with pytest.raises(DeployError, match="not Approved"):
        deploy_endpoint(context(moto), "tts", role_arn=ROLE_ARN, model_package_arn=arn)
    with pytest.raises(DeployError, match="not found"):
        deploy_endpoint(context(moto), "tts", role_arn=ROLE_ARN, model_package_arn=arn + "-nope")
    assert state(moto) == EMPTY
    client.update_model_package(ModelPackageArn=arn, ModelApprovalStatus="Approved")
    result = deploy_endpoint(context(moto), "tts", role_arn=ROLE_ARN, model_package_arn=arn, poll=1)
    assert result.status == "InService"
    model = client.describe_model(ModelName=result.model_name)
    assert model["PrimaryContainer"]["ModelPackageName"] == arn


@pytest.fixture
def failing_create_endpoint() -> Iterator[None]:
    original = SageMakerModelBackend.create_endpoint

    def fail(self, *args: Any, **kwargs: Any):
        raise ValidationError(message="The account-level service limit 'ml.g5.xlarge for endpoint usage' is 0")

    SageMakerModelBackend.create_endpoint = fail  # type: ignore[method-assign]
    try:
        yield
    finally:
        SageMakerModelBackend.create_endpoint = original  # type: ignore[method-assign]


def test_failed_create_endpoint_deletes_this_runs_model_and_config(moto: str, failing_create_endpoint: None,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy", "--region", REGION, "--endpoint-url", moto, "--endpoint-name", "tts",
                 "--role-arn", ROLE_ARN, "--image-uri", IMAGE, "--model-data-url", DATA]) == 1
    err = capsys.readouterr().err
    assert "CreateEndpoint" in err and "service limit" in err and "Traceback" not in err
    assert state(moto) == EMPTY


def test_cli_deploy_dry_run_and_env_flags(moto: str, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--region", REGION, "--endpoint-url", moto, "--endpoint-name", "tts", "--role-arn", ROLE_ARN,
              "--image-uri", IMAGE, "--model-data-url", DATA, "--max-new-tokens", "700", "--no-compile",
              "--env", "S1_MINI_PRECISION=bfloat16", "--poll", "1"]
    assert main(["deploy", "--dry-run", *common]) == 0
    out = capsys.readouterr().out
    for op in ("describe_endpoint", "create_model", "create_endpoint_config", "create_endpoint"):
        assert f"[dry-run] sagemaker.{op}(" in out
    assert state(moto) == EMPTY
    assert main(["deploy", *common]) == 0
    assert "tts: InService" in capsys.readouterr().out
    model = sm(moto).describe_model(ModelName=state(moto)["models"][0])
    assert model["PrimaryContainer"]["Environment"] == {
        "S1_MINI_PRECISION": "bfloat16", "S1_MINI_MAX_NEW_TOKENS": "700", "S1_MINI_COMPILE": "false"}
    assert main(["deploy", *common[:-2], "--instance-type", "ml.c5.xlarge"]) == 2
    assert "error: instance_type: ml.c5.xlarge" in capsys.readouterr().err


# ------------------------------------------------------------------------------ teardown


def test_teardown_deletes_endpoint_configs_and_models(moto: str) -> None:
    other = raw(context(moto), name="other")  # another endpoint's resources stay
    first = raw(context(moto))
    ctx = context(moto)
    UpdateHook(ctx, apply=True)
    second = raw(ctx)
    autoscale_endpoint(context(moto), "tts", max_instances=3)
    autoscale_endpoint(context(moto), "other", max_instances=2)
    plan = teardown_endpoint(context(moto), "tts", yes=True, poll=1)
    assert plan.scalable_targets == ["endpoint/tts/variant/AllTraffic"]
    aas = boto3.client("application-autoscaling", region_name=REGION, endpoint_url=moto)
    assert [t["ResourceId"] for t in aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]] \
        == ["endpoint/other/variant/AllTraffic"]
    assert [p["ResourceId"] for p in aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]] \
        == ["endpoint/other/variant/AllTraffic"]
    assert sorted(plan.endpoint_configs) == sorted([first.endpoint_config_name, second.endpoint_config_name])
    assert state(moto) == {"models": [other.model_name], "configs": [other.endpoint_config_name],
                           "endpoints": ["other"]}


def test_teardown_confirmation_unknown_endpoint_and_packages(moto: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DeployError, match="endpoint: nope does not exist"):
        teardown_endpoint(context(moto), "nope", yes=True)
    client = sm(moto)
    client.create_model_package_group(ModelPackageGroupName="s1-mini")
    arn = client.create_model_package(
        ModelPackageGroupName="s1-mini", ModelApprovalStatus="Approved",
        InferenceSpecification={"Containers": [{"Image": IMAGE, "ModelDataUrl": DATA}],
                                "SupportedContentTypes": ["application/json"],
                                "SupportedResponseMIMETypes": ["audio/wav"]})["ModelPackageArn"]
    deploy_endpoint(context(moto), "tts", role_arn=ROLE_ARN, model_package_arn=arn, poll=1)
    before = state(moto)
    with pytest.raises(DeployError, match="not confirmed; nothing was deleted"):
        teardown_endpoint(context(moto), "tts", confirm=lambda text: False)
    assert state(moto) == before
    assert main(["teardown", "--region", REGION, "--endpoint-url", moto, "--endpoint-name", "tts", "--dry-run"]) == 0
    assert "[dry-run] sagemaker.delete_endpoint(" in capsys.readouterr().out
    assert state(moto) == before
    # moto lacks delete_model_package (500 NotImplemented): that one request is checked by a hook
    ctx = context(moto)
    deleted: list[dict[str, Any]] = []

    def delete_package(params: dict[str, Any], **_: Any):
        deleted.append(json.loads(params["body"]))
        return AWSResponse(params["url"], 200, {}, None), {}

    ctx.client("sagemaker").meta.events.register("before-call.sagemaker.DeleteModelPackage", delete_package)
    plan = teardown_endpoint(ctx, "tts", delete_model_packages=True, yes=True, poll=1)
    assert plan.model_packages == [arn] and deleted == [{"ModelPackageName": arn}]
    assert state(moto) == EMPTY
    assert main(["teardown", "--region", REGION, "--endpoint-url", moto, "--endpoint-name", "tts", "--yes"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture
def endpoint_fails() -> Iterator[None]:
    """moto's endpoints are InService at once; this plays an endpoint whose container
    never passes /ping (server-side, in moto's backend)."""
    original = SageMakerModelBackend.create_endpoint

    def create(self, *args: Any, **kwargs: Any):
        endpoint = original(self, *args, **kwargs)
        endpoint.endpoint_status = "Failed"
        endpoint.failure_reason = "The primary container for production variant AllTraffic did not pass the ping"
        return endpoint

    SageMakerModelBackend.create_endpoint = create  # type: ignore[method-assign]
    try:
        yield
    finally:
        SageMakerModelBackend.create_endpoint = original  # type: ignore[method-assign]


def test_failed_endpoint_reports_status_and_reason(moto: str, endpoint_fails: None,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DeployError, match="tts is Failed after the deploy .*did not pass the ping.*teardown"):
        raw(context(moto))
    assert "endpoint tts: Failed; failure reason: The primary container" in capsys.readouterr().out
    # a failed endpoint cannot be updated: deploy says to tear it down, and creates nothing
    before = state(moto)
    with pytest.raises(DeployError, match="cannot update a failed endpoint: run teardown"):
        raw(context(moto))
    assert state(moto) == before
    teardown_endpoint(context(moto), "tts", yes=True, poll=1)
    assert state(moto) == EMPTY
