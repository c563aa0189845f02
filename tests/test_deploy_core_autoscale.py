"""``autoscale`` against a local moto server with real boto3: the scalable target and
the target-tracking policy as Application Auto Scaling stores them."""

from __future__ import annotations

import boto3
import moto_utils
import pytest
from moto_utils import REGION, ROLE_ARN, context

from s1_mini.deploy import autoscale
from s1_mini.deploy.autoscale import autoscale_endpoint
from s1_mini.deploy.aws import DeployError
from s1_mini.deploy.cli import main
from s1_mini.deploy.deploy import deploy_endpoint

moto_url, moto = moto_utils.moto_url, moto_utils.moto  # the fixtures these tests use


def aas(url: str):
    return boto3.client("application-autoscaling", region_name=REGION, endpoint_url=url)


@pytest.fixture
def endpoint(moto: str) -> str:
    deploy_endpoint(context(moto), "tts", role_arn=ROLE_ARN, image_uri="1.dkr.ecr/x:1",
                    model_data_url="s3://m/model.tar.gz", poll=1)
    return "tts"


def policies(url: str) -> list[dict]:
    return aas(url).describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]


def test_invocations_policy(moto: str, endpoint: str) -> None:
    result = autoscale_endpoint(context(moto), endpoint, min_instances=1, max_instances=4, target=40,
                                scale_in_cooldown=600, scale_out_cooldown=30)
    targets = aas(moto).describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert [(t["ResourceId"], t["ScalableDimension"], t["MinCapacity"], t["MaxCapacity"]) for t in targets] == \
        [("endpoint/tts/variant/AllTraffic", "sagemaker:variant:DesiredInstanceCount", 1, 4)]
    [policy] = policies(moto)
    assert policy["PolicyName"] == result.policy_name == "tts-invocations"
    assert policy["PolicyType"] == "TargetTrackingScaling"
    config = policy["TargetTrackingScalingPolicyConfiguration"]
    assert config["TargetValue"] == 40
    assert config["PredefinedMetricSpecification"]["PredefinedMetricType"] == "SageMakerVariantInvocationsPerInstance"
    assert (config["ScaleInCooldown"], config["ScaleOutCooldown"]) == (600, 30)


def test_concurrency_policy_and_custom_metric_fallback(moto: str, endpoint: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    autoscale_endpoint(context(moto), endpoint, metric="concurrency", target=4)
    config = policies(moto)[0]["TargetTrackingScalingPolicyConfiguration"]
    assert config["PredefinedMetricSpecification"]["PredefinedMetricType"] == \
        "SageMakerVariantConcurrentRequestsPerModelHighResolution"
    # an older botocore without that metric type: the CloudWatch metric as a custom spec
    monkeypatch.setattr(autoscale, "known_metric_types", lambda: ["SageMakerVariantInvocationsPerInstance"])
    spec = autoscale.metric_spec("concurrency", "tts", "AllTraffic")
    assert spec["CustomizedMetricSpecification"]["MetricName"] == "ConcurrentRequestsPerModel"


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_instances=3, max_instances=2), "need 0 <= min <= max"),
    (dict(target=0), "target: must be > 0"),
    (dict(metric="cpu"), "metric: must be one of"),
    (dict(variant_name="Blue"), "has no variant 'Blue'"),
])
def test_bad_input_registers_nothing(moto: str, endpoint: str, kwargs: dict, message: str) -> None:
    with pytest.raises(DeployError, match=message):
        autoscale_endpoint(context(moto), endpoint, **kwargs)
    assert aas(moto).describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert policies(moto) == []


def test_cli_autoscale(moto: str, endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--region", REGION, "--endpoint-url", moto, "--endpoint-name", endpoint, "--max-instances", "3"]
    assert main(["autoscale", "--dry-run", *common]) == 0
    out = capsys.readouterr().out
    assert "[dry-run] application-autoscaling.register_scalable_target(" in out
    assert "[dry-run] application-autoscaling.put_scaling_policy(" in out
    assert policies(moto) == []
    assert main(["autoscale", *common]) == 0
    assert len(policies(moto)) == 1
    assert main(["autoscale", "--region", REGION, "--endpoint-url", moto, "--endpoint-name", "nope"]) == 2
    assert "error: endpoint: nope does not exist" in capsys.readouterr().err
