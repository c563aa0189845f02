"""Register model.tar.gz + image as a model package (versioned in a package group).

Creates the model package group when missing, then a new model package version with
the inference specification (image, model data, request content types, response MIME
types, supported real-time and transform instance types), an approval status, and
metadata: the git commit (detected from the working tree unless given), and customer
metadata such as benchmark figures (--metadata KEY=VALUE, --benchmark-json FILE).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions

from s1_mini.deploy.aws import AwsContext, DeployError
from s1_mini.deploy.deploy import (
    NAME_RE,
    parse_env,
    validate_environment,
    validate_instance_type,
)

CONTENT_TYPES = ["application/json", "application/jsonlines", "text/plain", "application/x-msgpack"]
DEFAULT_REALTIME_TYPES = ["ml.g5.xlarge", "ml.g5.2xlarge", "ml.g6.xlarge", "ml.g6e.xlarge", "ml.g4dn.xlarge"]
DEFAULT_TRANSFORM_TYPES = ["ml.g5.xlarge", "ml.g5.2xlarge", "ml.g6.xlarge", "ml.g4dn.xlarge"]
APPROVAL_STATUSES = ("Approved", "Rejected", "PendingManualApproval")


def response_types() -> list[str]:
    """The audio formats the container can write, then its JSON answers."""
    from s1_mini.server.audio_formats import KNOWN, SUPPORTED

    return [KNOWN[name].media_type for name in SUPPORTED] + ["application/json", "application/jsonlines"]


@dataclass
class RegisterResult:
    group_name: str
    model_package_arn: str | None
    group_created: bool


def git_commit(repo: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo or Path(__file__).resolve().parents[2],
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def flatten_benchmark(path: str | Path) -> dict[str, str]:
    """Numbers and strings of a benchmark JSON file as ``bench.<dotted.key>`` metadata."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DeployError(f"benchmark_json: cannot read {path}: {exc}") from None
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
            out[prefix] = str(value)

    walk("bench", data)
    return out


def validate_metadata(metadata: dict[str, str]) -> None:
    # SageMaker's CustomerMetadataProperties: keys 1-128 chars, values 1-256, at most 50 entries
    if len(metadata) > 50:
        raise DeployError(f"metadata: at most 50 entries, got {len(metadata)}; pass fewer benchmark figures")
    for key, value in metadata.items():
        if not 1 <= len(key) <= 128 or key.startswith("aws:"):
            raise DeployError(f"metadata: key {key!r} must be 1-128 characters and not start with aws:")
        if not 1 <= len(value) <= 256:
            raise DeployError(f"metadata: value of {key} must be 1-256 characters, got {len(value)}")


def ensure_group(ctx: AwsContext, group_name: str, description: str | None) -> bool:
    """Create the package group when missing; True when it was created."""
    try:
        if ctx.call("sagemaker", "describe_model_package_group", ModelPackageGroupName=group_name) or ctx.dry_run:
            return ctx.dry_run
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("ValidationException", "ResourceNotFound"):
            raise
    params: dict[str, Any] = {"ModelPackageGroupName": group_name}
    if description:
        params["ModelPackageGroupDescription"] = description
    ctx.call("sagemaker", "create_model_package_group", **params)
    return True


def register_model(ctx: AwsContext, group_name: str, *, image_uri: str, model_data_url: str,
                   approval_status: str = "PendingManualApproval", description: str | None = None,
                   realtime_instance_types: list[str] | None = None,
                   transform_instance_types: list[str] | None = None, environment: dict[str, str] | None = None,
                   commit: str | None = None, repository: str | None = None,
                   metadata: dict[str, str] | None = None) -> RegisterResult:
    """Create (if needed) the group ``group_name`` and a new model package version in it."""
    if not NAME_RE.match(group_name or ""):
        raise DeployError(f"group: {group_name!r} must be 1-63 letters, digits and hyphens")
    if approval_status not in APPROVAL_STATUSES:
        raise DeployError(f"approval_status: must be one of {', '.join(APPROVAL_STATUSES)}, got {approval_status!r}")
    if not image_uri:
        raise DeployError("image_uri: required (the serving image in ECR)")
    if not (model_data_url or "").startswith("s3://"):
        raise DeployError(f"model_data_url: must be an s3:// URL of model.tar.gz, got {model_data_url!r}")
    realtime = realtime_instance_types or DEFAULT_REALTIME_TYPES
    transform = transform_instance_types or DEFAULT_TRANSFORM_TYPES
    for instance_type in realtime + transform:
        validate_instance_type(instance_type)
    environment = dict(environment or {})
    validate_environment(environment)
    metadata = dict(metadata or {})
    validate_metadata(metadata)

    created = ensure_group(ctx, group_name, description)
    container: dict[str, Any] = {"Image": image_uri, "ModelDataUrl": model_data_url}
    if environment:
        container["Environment"] = environment
    params: dict[str, Any] = {
        "ModelPackageGroupName": group_name,
        "ModelApprovalStatus": approval_status,
        "InferenceSpecification": {
            "Containers": [container],
            "SupportedContentTypes": CONTENT_TYPES,
            "SupportedResponseMIMETypes": response_types(),
            "SupportedRealtimeInferenceInstanceTypes": realtime,
            "SupportedTransformInstanceTypes": transform,
        },
    }
    if description:
        params["ModelPackageDescription"] = description
    commit = commit or git_commit()
    if commit or repository:
        params["MetadataProperties"] = {k: v for k, v in
                                        {"CommitId": commit, "Repository": repository,
                                         "GeneratedBy": "s1_mini.deploy register"}.items() if v}
    if metadata:
        params["CustomerMetadataProperties"] = metadata
    try:
        response = ctx.call("sagemaker", "create_model_package", **params)
    except BaseException:
        if created and not ctx.dry_run:  # leave no empty group behind from this run
            ctx.call("sagemaker", "delete_model_package_group", ModelPackageGroupName=group_name)
        raise
    arn = response.get("ModelPackageArn")
    print(f"registered {arn or '(dry-run)'} in {group_name} ({approval_status})", file=ctx.out)
    return RegisterResult(group_name, arn, created)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group", required=True, help="model package group (created when missing)")
    parser.add_argument("--image-uri", required=True, help="serving image in ECR")
    parser.add_argument("--model-data-url", required=True, help="s3:// URL of model.tar.gz (from `upload`)")
    parser.add_argument("--approval", choices=APPROVAL_STATUSES, default="PendingManualApproval",
                        help="approval status (deploy needs Approved)")
    parser.add_argument("--description")
    parser.add_argument("--realtime-instance-type", action="append",
                        help=f"repeatable (default: {', '.join(DEFAULT_REALTIME_TYPES)})")
    parser.add_argument("--transform-instance-type", action="append",
                        help=f"repeatable (default: {', '.join(DEFAULT_TRANSFORM_TYPES)})")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="container environment (EngineConfig S1_MINI_* variables), repeatable")
    parser.add_argument("--commit", help="git commit (default: git rev-parse HEAD of this checkout)")
    parser.add_argument("--repository", help="source repository URL")
    parser.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                        help="customer metadata, repeatable (e.g. bench.rtf=0.05)")
    parser.add_argument("--benchmark-json", help="a benchmark result file; its figures become metadata")


def run(args: argparse.Namespace, ctx: AwsContext) -> int:
    metadata = flatten_benchmark(args.benchmark_json) if args.benchmark_json else {}
    metadata.update(parse_env(args.metadata, "metadata"))
    register_model(ctx, args.group, image_uri=args.image_uri, model_data_url=args.model_data_url,
                   approval_status=args.approval, description=args.description,
                   realtime_instance_types=args.realtime_instance_type,
                   transform_instance_types=args.transform_instance_type, environment=parse_env(args.env),
                   commit=args.commit, repository=args.repository, metadata=metadata)
    return 0
