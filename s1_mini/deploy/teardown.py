"""Delete an endpoint, its endpoint configs and models (and optionally model packages).

Finds what belongs to the endpoint: its autoscaling policies and targets (removed
first, as AWS asks), its current config, and every endpoint config
that `deploy` tagged with the endpoint's name (earlier deploys); the models of those
configs; with --delete-model-packages, the model packages those models were made from.
Prints the plan and asks for confirmation (--yes to skip). An unknown endpoint is an
error; nothing is deleted then.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import botocore.exceptions

from s1_mini.deploy.aws import AwsContext, DeployError, check_number
from s1_mini.deploy.deploy import NAME_RE, TAG_KEY, describe_endpoint


@dataclass
class TeardownPlan:
    endpoint_name: str
    endpoint_configs: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    model_packages: list[str] = field(default_factory=list)
    scalable_targets: list[str] = field(default_factory=list)  # autoscaling resource ids
    scaling_policies: list[tuple[str, str]] = field(default_factory=list)  # (resource id, policy name)

    def describe(self) -> str:
        lines = [f"endpoint:         {self.endpoint_name}"]
        lines += [f"scaling policy:   {n} ({r})" for r, n in self.scaling_policies]
        lines += [f"scalable target:  {n}" for n in self.scalable_targets]
        lines += [f"endpoint config:  {n}" for n in self.endpoint_configs]
        lines += [f"model:            {n}" for n in self.models]
        lines += [f"model package:    {n}" for n in self.model_packages]
        return "\n".join(lines)


def _tagged_for(ctx: AwsContext, arn: str, endpoint_name: str) -> bool:
    tags = ctx.call("sagemaker", "list_tags", ResourceArn=arn).get("Tags", [])
    return any(t.get("Key") == TAG_KEY and t.get("Value") == endpoint_name for t in tags)


def plan_teardown(ctx: AwsContext, endpoint_name: str, delete_model_packages: bool = False) -> TeardownPlan:
    endpoint = describe_endpoint(ctx, endpoint_name)
    if endpoint is None and not ctx.dry_run:
        raise DeployError(f"endpoint: {endpoint_name} does not exist in {ctx.region_name}; check the name "
                          "(list_endpoints) and --region")
    plan = TeardownPlan(endpoint_name)
    if ctx.dry_run:
        return plan
    prefix = f"endpoint/{endpoint_name}/variant/"
    pages = ctx.client("application-autoscaling").get_paginator("describe_scalable_targets").paginate(
        ServiceNamespace="sagemaker")
    plan.scalable_targets = [t["ResourceId"] for page in pages for t in page.get("ScalableTargets", [])
                             if t["ResourceId"].startswith(prefix)]
    pages = ctx.client("application-autoscaling").get_paginator("describe_scaling_policies").paginate(
        ServiceNamespace="sagemaker")
    plan.scaling_policies = [(p["ResourceId"], p["PolicyName"]) for page in pages
                             for p in page.get("ScalingPolicies", []) if p["ResourceId"].startswith(prefix)]
    configs = [endpoint["EndpointConfigName"]]
    paginator = ctx.client("sagemaker").get_paginator("list_endpoint_configs")
    for page in paginator.paginate(NameContains=endpoint_name):
        for item in page.get("EndpointConfigs", []):
            name = item["EndpointConfigName"]
            if name not in configs and _tagged_for(ctx, item["EndpointConfigArn"], endpoint_name):
                configs.append(name)
    for name in configs:
        try:
            config = ctx.call("sagemaker", "describe_endpoint_config", EndpointConfigName=name)
        except botocore.exceptions.ClientError:
            continue  # already gone
        plan.endpoint_configs.append(name)
        for variant in config.get("ProductionVariants", []):
            if variant.get("ModelName") and variant["ModelName"] not in plan.models:
                plan.models.append(variant["ModelName"])
    if delete_model_packages:
        for name in list(plan.models):
            try:
                model = ctx.call("sagemaker", "describe_model", ModelName=name)
            except botocore.exceptions.ClientError:
                plan.models.remove(name)
                continue
            containers = [model.get("PrimaryContainer", {})] + model.get("Containers", [])
            for c in containers:
                arn = c.get("ModelPackageName")
                if arn and arn not in plan.model_packages:
                    plan.model_packages.append(arn)
    return plan


def _ask(text: str) -> bool:
    return input(f"{text}\nDelete all of this? [y/N] ").strip().lower() in ("y", "yes")


def teardown_endpoint(ctx: AwsContext, endpoint_name: str, *, delete_model_packages: bool = False,
                      yes: bool = False, confirm: Callable[[str], bool] | None = None,
                      timeout: float = 1800, poll: float = 15) -> TeardownPlan:
    """Delete the endpoint and what `deploy` created for it, after confirmation."""
    if not NAME_RE.match(endpoint_name or ""):
        raise DeployError(f"endpoint_name: {endpoint_name!r} must be 1-63 letters, digits and hyphens")
    check_number("timeout", timeout, 0, above=True)
    check_number("poll", poll, 0, above=True)
    plan = plan_teardown(ctx, endpoint_name, delete_model_packages)
    print(("[dry-run] would delete " if ctx.dry_run else "will delete:\n") + plan.describe(), file=ctx.out)
    if not yes and not ctx.dry_run:
        if confirm is None:
            if not sys.stdin.isatty():
                raise DeployError("confirmation: stdin is not a terminal; pass --yes to delete without asking")
            confirm = _ask
        if not confirm(plan.describe()):
            raise DeployError("confirmation: not confirmed; nothing was deleted")
    for resource_id, policy in plan.scaling_policies:
        ctx.call("application-autoscaling", "delete_scaling_policy", ServiceNamespace="sagemaker",
                 ResourceId=resource_id, ScalableDimension="sagemaker:variant:DesiredInstanceCount",
                 PolicyName=policy)
    for resource_id in plan.scalable_targets:  # AWS asks for this before the endpoint goes
        ctx.call("application-autoscaling", "deregister_scalable_target", ServiceNamespace="sagemaker",
                 ResourceId=resource_id, ScalableDimension="sagemaker:variant:DesiredInstanceCount")
    ctx.call("sagemaker", "delete_endpoint", EndpointName=endpoint_name)
    if not ctx.dry_run:
        delay = max(1, int(poll))
        try:
            ctx.client("sagemaker").get_waiter("endpoint_deleted").wait(
                EndpointName=endpoint_name,
                WaiterConfig={"Delay": delay, "MaxAttempts": max(1, math.ceil(timeout / delay))})
        except botocore.exceptions.WaiterError as exc:
            raise DeployError(f"endpoint: {endpoint_name} was not deleted within {timeout:.0f}s ({exc}); "
                              "run teardown again later") from None
    for name in plan.endpoint_configs:
        ctx.call("sagemaker", "delete_endpoint_config", EndpointConfigName=name)
    for name in plan.models:
        ctx.call("sagemaker", "delete_model", ModelName=name)
    for arn in plan.model_packages:
        ctx.call("sagemaker", "delete_model_package", ModelPackageName=arn)
    print(f"deleted endpoint {endpoint_name}, {len(plan.endpoint_configs)} endpoint config(s), "
          f"{len(plan.models)} model(s), {len(plan.model_packages)} model package(s)", file=ctx.out)
    return plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint-name", required=True, help="endpoint to delete")
    parser.add_argument("--delete-model-packages", action="store_true",
                        help="also delete the model packages the endpoint's models were made from")
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the endpoint to go")


def run(args: argparse.Namespace, ctx: AwsContext) -> int:
    teardown_endpoint(ctx, args.endpoint_name, delete_model_packages=args.delete_model_packages, yes=args.yes,
                      timeout=args.timeout)
    return 0
