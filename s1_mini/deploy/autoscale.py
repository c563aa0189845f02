"""Auto scaling for an endpoint variant: a scalable target and a target-tracking policy.

Registers ``endpoint/<name>/variant/<variant>`` (sagemaker:variant:DesiredInstanceCount)
with min/max instance counts, and a target-tracking policy on either invocations per
instance (SageMakerVariantInvocationsPerInstance, per minute) or concurrent requests per
model (SageMakerVariantConcurrentRequestsPerModelHighResolution, when this botocore
knows it; else the same CloudWatch metric as a customized metric spec), with scale-in
and scale-out cooldowns. Re-running updates both in place.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import botocore.session

from s1_mini.deploy.aws import AwsContext, DeployError, check_number
from s1_mini.deploy.deploy import describe_endpoint

DIMENSION = "sagemaker:variant:DesiredInstanceCount"
INVOCATIONS = "SageMakerVariantInvocationsPerInstance"
CONCURRENCY = "SageMakerVariantConcurrentRequestsPerModelHighResolution"
METRICS = {"invocations": INVOCATIONS, "concurrency": CONCURRENCY}


@dataclass
class AutoscaleResult:
    resource_id: str
    policy_name: str
    policy_arn: str | None
    metric: dict[str, Any]


def known_metric_types() -> list[str]:
    model = botocore.session.get_session().get_service_model("application-autoscaling")
    return list(model.shape_for("MetricType").enum)


def metric_spec(metric: str, endpoint_name: str, variant_name: str) -> dict[str, Any]:
    """The metric part of a TargetTrackingScalingPolicyConfiguration."""
    if metric not in METRICS:
        raise DeployError(f"metric: must be one of {', '.join(METRICS)}, got {metric!r}")
    predefined = METRICS[metric]
    if predefined in known_metric_types():
        return {"PredefinedMetricSpecification": {"PredefinedMetricType": predefined}}
    # an older botocore: the CloudWatch metric behind the predefined type
    return {"CustomizedMetricSpecification": {
        "MetricName": "ConcurrentRequestsPerModel", "Namespace": "AWS/SageMaker", "Statistic": "Average",
        "Dimensions": [{"Name": "EndpointName", "Value": endpoint_name},
                       {"Name": "VariantName", "Value": variant_name}]}}


def autoscale_endpoint(ctx: AwsContext, endpoint_name: str, *, variant_name: str = "AllTraffic",
                       min_instances: int = 1, max_instances: int = 2, metric: str = "invocations",
                       target: float = 60.0, scale_in_cooldown: int = 300, scale_out_cooldown: int = 60,
                       policy_name: str | None = None) -> AutoscaleResult:
    """Register the variant as a scalable target and put a target-tracking policy on it."""
    if min_instances < 0 or max_instances < 1 or min_instances > max_instances:
        raise DeployError(f"instances: need 0 <= min <= max and max >= 1, got min {min_instances}, "
                          f"max {max_instances}")
    check_number("target", target, 0, above=True)
    if scale_in_cooldown < 0 or scale_out_cooldown < 0:
        raise DeployError("cooldown: scale-in and scale-out cooldowns must be >= 0 seconds")
    spec = metric_spec(metric, endpoint_name, variant_name)
    endpoint = describe_endpoint(ctx, endpoint_name)
    if endpoint is None and not ctx.dry_run:
        raise DeployError(f"endpoint: {endpoint_name} does not exist in {ctx.region_name}; deploy it first")
    if endpoint is not None:
        variants = [v.get("VariantName") for v in endpoint.get("ProductionVariants", [])]
        if variants and variant_name not in variants:
            raise DeployError(f"variant_name: {endpoint_name} has no variant {variant_name!r}; it has "
                              f"{', '.join(variants)}")
    resource_id = f"endpoint/{endpoint_name}/variant/{variant_name}"
    policy_name = policy_name or f"{endpoint_name}-{metric}"
    ctx.call("application-autoscaling", "register_scalable_target", ServiceNamespace="sagemaker",
             ResourceId=resource_id, ScalableDimension=DIMENSION, MinCapacity=min_instances,
             MaxCapacity=max_instances)
    response = ctx.call("application-autoscaling", "put_scaling_policy", PolicyName=policy_name,
                        ServiceNamespace="sagemaker", ResourceId=resource_id, ScalableDimension=DIMENSION,
                        PolicyType="TargetTrackingScaling",
                        TargetTrackingScalingPolicyConfiguration={
                            "TargetValue": float(target), **spec,
                            "ScaleInCooldown": scale_in_cooldown, "ScaleOutCooldown": scale_out_cooldown})
    print(f"autoscaling {resource_id}: {min_instances}-{max_instances} instances, {metric} target {target:g}, "
          f"cooldowns in {scale_in_cooldown}s / out {scale_out_cooldown}s", file=ctx.out)
    return AutoscaleResult(resource_id, policy_name, response.get("PolicyARN"), spec)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint-name", required=True)
    parser.add_argument("--variant-name", default="AllTraffic")
    parser.add_argument("--min-instances", type=int, default=1)
    parser.add_argument("--max-instances", type=int, default=2)
    parser.add_argument("--metric", choices=sorted(METRICS), default="invocations",
                        help="invocations: per instance per minute; concurrency: concurrent requests per model")
    parser.add_argument("--target", type=float, default=60.0, help="target value of the metric (default 60)")
    parser.add_argument("--scale-in-cooldown", type=int, default=300, help="seconds (default 300)")
    parser.add_argument("--scale-out-cooldown", type=int, default=60, help="seconds (default 60)")
    parser.add_argument("--policy-name", help="default: <endpoint>-<metric>")


def run(args: argparse.Namespace, ctx: AwsContext) -> int:
    autoscale_endpoint(ctx, args.endpoint_name, variant_name=args.variant_name, min_instances=args.min_instances,
                       max_instances=args.max_instances, metric=args.metric, target=args.target,
                       scale_in_cooldown=args.scale_in_cooldown, scale_out_cooldown=args.scale_out_cooldown,
                       policy_name=args.policy_name)
    return 0
