"""``python -m s1_mini.deploy <subcommand>``: a thin CLI over the step modules.

Each step module has ``add_arguments(parser)`` and ``run(args, ctx) -> int``; the
options every subcommand shares (region, profile, endpoints, dry run) are here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import botocore.exceptions
from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

from s1_mini.deploy.aws import AwsContext, DeployError

# Subcommands, in the order a deployment runs them (each is s1_mini.deploy.<name>).
STEPS: list[str] = ["package", "upload", "register", "deploy", "autoscale", "invoke", "invoke-async", "batch", "teardown"]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--region", help="AWS region (default: the profile's or AWS_REGION)")
    common.add_argument("--profile", help="AWS profile")
    common.add_argument("--endpoint-url", help="one endpoint for every AWS service (e.g. a local moto server)")
    common.add_argument("--runtime-endpoint-url", help="sagemaker-runtime endpoint (e.g. the local runtime)")
    common.add_argument("--dry-run", action="store_true", help="print the AWS calls instead of making them")
    parser = argparse.ArgumentParser(prog="python -m s1_mini.deploy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name in STEPS:
        module = importlib.import_module(f"s1_mini.deploy.{name.replace('-', '_')}")
        step = sub.add_parser(name, parents=[common], help=module.__doc__.strip().splitlines()[0],
                              description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(step)
        step.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for name, url in (("endpoint-url", args.endpoint_url), ("runtime-endpoint-url", args.runtime_endpoint_url)):
            # botocore would raise a bare ValueError on the first call instead
            if url is not None and not (url.startswith(("http://", "https://"))
                                        and (is_valid_endpoint_url(url) or is_valid_ipv6_endpoint_url(url))):
                raise DeployError(f"{name}: must be an http:// or https:// URL, got {url!r}")
        ctx = AwsContext(region=args.region, profile=args.profile, endpoint_url=args.endpoint_url,
                         runtime_endpoint_url=args.runtime_endpoint_url, dry_run=args.dry_run)
        return args.run(args, ctx) or 0
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (botocore.exceptions.InvalidRegionError, botocore.exceptions.ProfileNotFound) as exc:
        print(f"error: {'region' if isinstance(exc, botocore.exceptions.InvalidRegionError) else 'profile'}: {exc}",
              file=sys.stderr)
        return 2
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        print(f"error: {exc.operation_name}: {error.get('Code')}: {error.get('Message')}", file=sys.stderr)
        return 1
    except botocore.exceptions.BotoCoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
