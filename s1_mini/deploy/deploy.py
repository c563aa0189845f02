"""Create or update a SageMaker endpoint serving S1-mini.

From an approved model package (--model-package-arn) or from a raw image and model
data (--image-uri + --model-data-url). Every deploy creates a new model and a new,
timestamped endpoint config; an existing endpoint is updated to it (blue/green
traffic shifting and auto-rollback alarms where given), a new one is created. Then
waits for InService (with a timeout) and prints the status and failure reason. GPU
instances only (ml.g4dn/g5/g6/g6e/p3/p4d/p5); serverless is refused (no GPUs there).
A call that fails after a resource was created deletes what this run created.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import botocore.exceptions

from s1_mini.deploy.aws import AwsContext, DeployError, check_number

DEFAULT_INSTANCE_TYPE = "ml.g5.xlarge"
# SageMaker real-time hosting sizes of the GPU families S1-mini runs on.
GPU_INSTANCE_FAMILIES: dict[str, tuple[str, ...]] = {
    "g4dn": ("xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge"),
    "g5": ("xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge", "24xlarge", "48xlarge"),
    "g6": ("xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge", "24xlarge", "48xlarge"),
    "g6e": ("xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge", "24xlarge", "48xlarge"),
    "p3": ("2xlarge", "8xlarge", "16xlarge"),
    "p4d": ("24xlarge",),
    "p5": ("48xlarge",),
}
GPU_INSTANCE_TYPES = frozenset(f"ml.{fam}.{size}" for fam, sizes in GPU_INSTANCE_FAMILIES.items() for size in sizes)
TAG_KEY = "s1-mini:endpoint"  # on the models and endpoint configs a deploy creates (teardown finds them)
# Convenience flags → EngineConfig variables of the container.
ENV_FLAGS = {"precision": "S1_MINI_PRECISION", "max_new_tokens": "S1_MINI_MAX_NEW_TOKENS",
             "max_batch_size": "S1_MINI_MAX_BATCH_SIZE", "max_queue_size": "S1_MINI_MAX_QUEUE_SIZE",
             "kv_cache_gb": "S1_MINI_KV_CACHE_GB", "request_timeout": "S1_MINI_REQUEST_TIMEOUT",
             "compile": "S1_MINI_COMPILE"}
NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
ROLE_RE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/.+")


@dataclass
class BlueGreen:
    """Blue/green traffic shifting for update_endpoint."""
    mode: str = "ALL_AT_ONCE"  # ALL_AT_ONCE | CANARY | LINEAR
    step_percent: int | None = None  # canary size / linear step, % of capacity
    wait_seconds: int = 300  # between traffic shifts (baking period)
    termination_wait_seconds: int = 0  # before the old fleet is terminated
    max_execution_seconds: int | None = None


@dataclass
class DeployResult:
    endpoint_name: str
    model_name: str
    endpoint_config_name: str
    action: str  # "create" | "update"
    status: str | None = None
    failure_reason: str | None = None
    recorded: list[dict[str, Any]] = field(default_factory=list)


def validate_instance_type(instance_type: str) -> None:
    match = re.fullmatch(r"ml\.([a-z0-9]+)\.([a-z0-9]+)", instance_type or "")
    families = ", ".join(f"ml.{f}" for f in GPU_INSTANCE_FAMILIES)
    if not match:
        raise DeployError(f"instance_type: {instance_type!r} is not a SageMaker instance type "
                          f"(ml.<family>.<size>); S1-mini needs a GPU family: {families}")
    family, size = match.groups()
    if family not in GPU_INSTANCE_FAMILIES:
        raise DeployError(f"instance_type: {instance_type} is not in a GPU family S1-mini supports; "
                          f"use one of {families} (default {DEFAULT_INSTANCE_TYPE})")
    if instance_type not in GPU_INSTANCE_TYPES:
        raise DeployError(f"instance_type: ml.{family} has no size {size!r}; sizes: "
                          f"{', '.join(GPU_INSTANCE_FAMILIES[family])}")


def validate_environment(env: dict[str, str]) -> None:
    """Refuse unknown or invalid ``S1_MINI_*`` variables before anything is created."""
    from dataclasses import fields

    from s1_mini.config import ENV_ALIASES, ENV_PREFIX, EngineConfig, EngineConfigError

    known = {ENV_PREFIX + f.name.upper() for f in fields(EngineConfig)} | set(ENV_ALIASES.values())
    for key, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise DeployError(f"env: {key!r} is not a valid variable name")
        if not isinstance(value, str):
            raise DeployError(f"env: {key} must be a string, got {value!r}")
        if key.startswith(ENV_PREFIX) and key not in known:
            raise DeployError(f"env: {key} is not an EngineConfig variable; known: {', '.join(sorted(known))}")
    try:
        EngineConfig.from_env(environ={k: v for k, v in env.items() if k.startswith(ENV_PREFIX)})
    except EngineConfigError as exc:
        raise DeployError(f"env: {exc}") from None


def resource_names(endpoint_name: str, now: datetime | None = None) -> str:
    """``<endpoint>-YYYYmmdd-HHMMSS-mmm``, cut to SageMaker's 63 characters."""
    now = now or datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%d-%H%M%S-") + f"{now.microsecond // 1000:03d}"
    return f"{endpoint_name[:63 - len(stamp) - 1].rstrip('-')}-{stamp}"


def _not_found(exc: botocore.exceptions.ClientError) -> bool:
    message = exc.response.get("Error", {}).get("Message", "")
    return exc.response.get("Error", {}).get("Code") in ("ValidationException", "ResourceNotFound") and \
        ("Could not find" in message or "does not exist" in message or "not found" in message.lower())


def describe_endpoint(ctx: AwsContext, name: str) -> dict[str, Any] | None:
    """The endpoint's description, or None when there is none (or in dry-run mode)."""
    try:
        return ctx.call("sagemaker", "describe_endpoint", EndpointName=name) or None
    except botocore.exceptions.ClientError as exc:
        if _not_found(exc):
            return None
        raise


def wait_in_service(ctx: AwsContext, name: str, timeout: float, poll: float) -> dict[str, Any]:
    """Wait with the ``endpoint_in_service`` waiter; return the final description."""
    waiter = ctx.client("sagemaker").get_waiter("endpoint_in_service")
    delay = max(1, int(poll))
    try:
        waiter.wait(EndpointName=name, WaiterConfig={"Delay": delay,
                                                     "MaxAttempts": max(1, math.ceil(timeout / delay))})
    except botocore.exceptions.WaiterError:
        pass  # the description below says why
    return ctx.call("sagemaker", "describe_endpoint", EndpointName=name)


def deploy_endpoint(ctx: AwsContext, endpoint_name: str, *, role_arn: str | None,
                    model_package_arn: str | None = None, image_uri: str | None = None,
                    model_data_url: str | None = None, instance_type: str = DEFAULT_INSTANCE_TYPE,
                    instance_count: int = 1, variant_name: str = "AllTraffic",
                    environment: dict[str, str] | None = None, async_output_path: str | None = None,
                    async_failure_path: str | None = None, async_max_concurrent: int | None = None,
                    serverless: bool = False, blue_green: BlueGreen | None = None,
                    rollback_alarms: list[str] | None = None, tags: dict[str, str] | None = None,
                    wait: bool = True, timeout: float = 3600, poll: float = 30) -> DeployResult:
    """Create or update ``endpoint_name``; see the module docstring."""
    # --- everything is checked before the first call that creates anything
    if serverless:
        raise DeployError("serverless: SageMaker serverless inference has no GPUs and S1-mini needs one; "
                          f"deploy to a real-time GPU instance (--instance-type, default {DEFAULT_INSTANCE_TYPE})")
    if not NAME_RE.match(endpoint_name or ""):
        raise DeployError(f"endpoint_name: {endpoint_name!r} must be 1-63 letters, digits and hyphens")
    if not role_arn:
        raise DeployError("role_arn: required; pass --role-arn with an IAM role SageMaker can assume "
                          "(needs S3 read of the model data and ECR pull of the image)")
    if not ROLE_RE.match(role_arn):
        raise DeployError(f"role_arn: {role_arn!r} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
    if model_package_arn and (image_uri or model_data_url):
        raise DeployError("model: pass either --model-package-arn or --image-uri + --model-data-url, not both")
    if not model_package_arn and not (image_uri and model_data_url):
        raise DeployError("model: pass --model-package-arn (an approved package) or both --image-uri and "
                          "--model-data-url")
    if model_data_url and not model_data_url.startswith("s3://"):
        raise DeployError(f"model_data_url: must be an s3:// URL of model.tar.gz, got {model_data_url!r}")
    validate_instance_type(instance_type)
    if instance_count < 1:
        raise DeployError(f"instance_count: must be >= 1, got {instance_count}")
    check_number("timeout", timeout, 0, above=True)
    check_number("poll", poll, 0, above=True)
    environment = dict(environment or {})
    validate_environment(environment)
    if async_max_concurrent is not None and not async_output_path:
        raise DeployError("async_max_concurrent: needs --async-output-path (async inference)")
    if async_max_concurrent is not None:
        check_number("async_max_concurrent", async_max_concurrent, 1)
    if async_output_path and not async_output_path.startswith("s3://"):
        raise DeployError(f"async_output_path: must be an s3:// URL, got {async_output_path!r}")
    if blue_green and blue_green.mode not in ("ALL_AT_ONCE", "CANARY", "LINEAR"):
        raise DeployError(f"blue_green: mode must be ALL_AT_ONCE, CANARY or LINEAR, got {blue_green.mode!r}")
    if blue_green and blue_green.mode != "ALL_AT_ONCE" and not 1 <= (blue_green.step_percent or 0) <= 99:
        raise DeployError(f"blue_green: {blue_green.mode} needs a step of 1-99 percent (--traffic-step-percent)")
    if blue_green:
        check_number("traffic_wait_seconds", blue_green.wait_seconds, 0)
        check_number("termination_wait_seconds", blue_green.termination_wait_seconds, 0)

    if model_package_arn and not ctx.dry_run:
        try:
            package = ctx.call("sagemaker", "describe_model_package", ModelPackageName=model_package_arn)
        except botocore.exceptions.ClientError as exc:
            raise DeployError(f"model_package_arn: {model_package_arn} not found "
                              f"({exc.response.get('Error', {}).get('Message')})") from None
        if package.get("ModelApprovalStatus") != "Approved":
            raise DeployError(f"model_package_arn: {model_package_arn} is {package.get('ModelApprovalStatus')}, "
                              "not Approved; approve it (register --approval Approved, or "
                              "update_model_package) before deploying")

    existing = describe_endpoint(ctx, endpoint_name)
    if existing and existing.get("EndpointStatus") == "Failed":
        raise DeployError(f"endpoint: {endpoint_name} is Failed ({existing.get('FailureReason')}); SageMaker "
                          "cannot update a failed endpoint: run teardown, then deploy again")
    if existing and existing.get("EndpointStatus") != "InService":
        raise DeployError(f"endpoint: {endpoint_name} is {existing.get('EndpointStatus')}; wait until it is "
                          "InService before deploying again")
    action = "update" if existing else "create"
    name = resource_names(endpoint_name)
    tag_list = [{"Key": TAG_KEY, "Value": endpoint_name}] + [{"Key": k, "Value": v} for k, v in (tags or {}).items()]
    container: dict[str, Any] = {"ModelPackageName": model_package_arn} if model_package_arn else \
        {"Image": image_uri, "ModelDataUrl": model_data_url}
    if environment:
        container["Environment"] = environment
    variant = {"VariantName": variant_name, "ModelName": name, "InstanceType": instance_type,
               "InitialInstanceCount": instance_count, "InitialVariantWeight": 1.0}
    config_params: dict[str, Any] = {"EndpointConfigName": name, "ProductionVariants": [variant], "Tags": tag_list}
    if async_output_path:
        output: dict[str, Any] = {"S3OutputPath": async_output_path}
        if async_failure_path:
            output["S3FailurePath"] = async_failure_path
        config_params["AsyncInferenceConfig"] = {"OutputConfig": output}
        if async_max_concurrent is not None:
            config_params["AsyncInferenceConfig"]["ClientConfig"] = {
                "MaxConcurrentInvocationsPerInstance": async_max_concurrent}

    created: list[tuple[str, str]] = []  # (delete operation, name), undone in reverse on failure
    result = DeployResult(endpoint_name, name, name, action)
    try:
        ctx.call("sagemaker", "create_model", ModelName=name, ExecutionRoleArn=role_arn,
                 PrimaryContainer=container, Tags=tag_list)
        created.append(("delete_model", name))
        ctx.call("sagemaker", "create_endpoint_config", **config_params)
        created.append(("delete_endpoint_config", name))
        if action == "create":
            ctx.call("sagemaker", "create_endpoint", EndpointName=endpoint_name, EndpointConfigName=name,
                     Tags=tag_list)
        else:
            params: dict[str, Any] = {"EndpointName": endpoint_name, "EndpointConfigName": name}
            deployment = deployment_config(blue_green, rollback_alarms)
            if deployment:
                params["DeploymentConfig"] = deployment
            ctx.call("sagemaker", "update_endpoint", **params)
    except BaseException:
        _undo(ctx, created)
        raise
    print(f"{action} endpoint {endpoint_name} -> config {name} ({instance_count} x {instance_type})", file=ctx.out)
    if ctx.dry_run or not wait:
        result.recorded = list(ctx.recorded)
        return result
    final = wait_in_service(ctx, endpoint_name, timeout, poll)
    result.status, result.failure_reason = final.get("EndpointStatus"), final.get("FailureReason")
    print(f"endpoint {endpoint_name}: {result.status}"
          + (f"; failure reason: {result.failure_reason}" if result.failure_reason else ""), file=ctx.out)
    if result.status != "InService":
        hint = "run teardown to remove it" if action == "create" else "the update did not complete"
        raise DeployError(f"endpoint: {endpoint_name} is {result.status} after the deploy"
                          + (f" ({result.failure_reason})" if result.failure_reason else "") + f"; {hint}")
    if final.get("EndpointConfigName") != name:
        _undo(ctx, created)
        raise DeployError(f"endpoint: {endpoint_name} is InService on config {final.get('EndpointConfigName')}, "
                          f"not {name}: the update was rolled back"
                          + (f" ({result.failure_reason})" if result.failure_reason else "")
                          + "; the new model and config were deleted")
    return result


def deployment_config(blue_green: BlueGreen | None, rollback_alarms: list[str] | None) -> dict[str, Any] | None:
    """update_endpoint's DeploymentConfig (None when neither is asked for)."""
    if not blue_green and not rollback_alarms:
        return None
    bg = blue_green or BlueGreen()
    routing: dict[str, Any] = {"Type": bg.mode, "WaitIntervalInSeconds": bg.wait_seconds}
    if bg.mode == "CANARY":
        routing["CanarySize"] = {"Type": "CAPACITY_PERCENT", "Value": bg.step_percent}
    elif bg.mode == "LINEAR":
        routing["LinearStepSize"] = {"Type": "CAPACITY_PERCENT", "Value": bg.step_percent}
    policy: dict[str, Any] = {"TrafficRoutingConfiguration": routing,
                              "TerminationWaitInSeconds": bg.termination_wait_seconds}
    if bg.max_execution_seconds:
        policy["MaximumExecutionTimeoutInSeconds"] = bg.max_execution_seconds
    config: dict[str, Any] = {"BlueGreenUpdatePolicy": policy}
    if rollback_alarms:
        config["AutoRollbackConfiguration"] = {"Alarms": [{"AlarmName": a} for a in rollback_alarms]}
    return config


def _undo(ctx: AwsContext, created: list[tuple[str, str]]) -> None:
    for operation, name in reversed(created):
        key = "ModelName" if operation == "delete_model" else "EndpointConfigName"
        try:
            ctx.call("sagemaker", operation, **{key: name})
        except botocore.exceptions.ClientError as exc:  # report, keep undoing
            print(f"warning: could not {operation} {name}: {exc}", file=sys.stderr)


def parse_env(pairs: list[str], what: str = "env") -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DeployError(f"{what}: {pair!r} must be KEY=VALUE")
        env[key] = value
    return env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint-name", required=True, help="endpoint to create or update")
    parser.add_argument("--role-arn", help="IAM execution role for the model (required)")
    source = parser.add_argument_group("model source (a package, or an image + model data)")
    source.add_argument("--model-package-arn", help="an approved model package (from `register`)")
    source.add_argument("--image-uri", help="serving image in ECR")
    source.add_argument("--model-data-url", help="s3:// URL of model.tar.gz (from `upload`)")
    parser.add_argument("--instance-type", default=DEFAULT_INSTANCE_TYPE,
                        help=f"GPU instance type (default {DEFAULT_INSTANCE_TYPE}; families: "
                             f"{', '.join('ml.' + f for f in GPU_INSTANCE_FAMILIES)})")
    parser.add_argument("--instance-count", type=int, default=1)
    parser.add_argument("--variant-name", default="AllTraffic")
    parser.add_argument("--serverless", action="store_true", help="refused: serverless inference has no GPUs")
    env = parser.add_argument_group("container environment (EngineConfig S1_MINI_* variables)")
    env.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    env.add_argument("--precision", help="S1_MINI_PRECISION (float16, bfloat16, float32)")
    env.add_argument("--max-new-tokens", type=int, help="S1_MINI_MAX_NEW_TOKENS")
    env.add_argument("--max-batch-size", type=int, help="S1_MINI_MAX_BATCH_SIZE")
    env.add_argument("--max-queue-size", type=int, help="S1_MINI_MAX_QUEUE_SIZE")
    env.add_argument("--kv-cache-gb", type=float, help="S1_MINI_KV_CACHE_GB")
    env.add_argument("--request-timeout", type=float, help="S1_MINI_REQUEST_TIMEOUT (seconds)")
    env.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="S1_MINI_COMPILE")
    asy = parser.add_argument_group("async inference")
    asy.add_argument("--async-output-path", help="s3:// prefix for results (makes the endpoint asynchronous)")
    asy.add_argument("--async-failure-path", help="s3:// prefix for errors")
    asy.add_argument("--async-max-concurrent", type=int, help="max concurrent invocations per instance")
    upd = parser.add_argument_group("update of an existing endpoint")
    upd.add_argument("--traffic-routing", choices=["all-at-once", "canary", "linear"],
                     help="blue/green traffic shifting")
    upd.add_argument("--traffic-step-percent", type=int, help="canary size / linear step (%% of capacity)")
    upd.add_argument("--traffic-wait-seconds", type=int, default=300, help="wait between shifts")
    upd.add_argument("--termination-wait-seconds", type=int, default=0)
    upd.add_argument("--rollback-alarm", action="append", default=[], help="CloudWatch alarm (repeatable)")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-wait", action="store_true", help="return once the call is accepted")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for InService")
    parser.add_argument("--poll", type=float, default=30, help="seconds between status checks")


def run(args: argparse.Namespace, ctx: AwsContext) -> int:
    env = parse_env(args.env)
    for flag, var in ENV_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            env[var] = str(value).lower() if isinstance(value, bool) else str(value)
    blue_green = None
    if args.traffic_routing:
        blue_green = BlueGreen(mode=args.traffic_routing.upper().replace("-", "_"),
                               step_percent=args.traffic_step_percent, wait_seconds=args.traffic_wait_seconds,
                               termination_wait_seconds=args.termination_wait_seconds)
    deploy_endpoint(ctx, args.endpoint_name, role_arn=args.role_arn, model_package_arn=args.model_package_arn,
                    image_uri=args.image_uri, model_data_url=args.model_data_url,
                    instance_type=args.instance_type, instance_count=args.instance_count,
                    variant_name=args.variant_name, environment=env, async_output_path=args.async_output_path,
                    async_failure_path=args.async_failure_path, async_max_concurrent=args.async_max_concurrent,
                    serverless=args.serverless, blue_green=blue_green, rollback_alarms=args.rollback_alarm,
                    tags=parse_env(args.tag, "tag"), wait=not args.no_wait, timeout=args.timeout, poll=args.poll)
    return 0
