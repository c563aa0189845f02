"""AWS clients for the deploy steps, and the dry-run recorder.

Every step gets an :class:`AwsContext`; it hands out boto3 clients (region, profile,
and an ``endpoint_url`` for tests against a local moto server or the local SageMaker
runtime) and, in dry-run mode, records the calls a step would make instead of making
them.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

import boto3
import botocore.config


# s3://bucket[/key]; bucket names are 3-63 lower-case letters, digits, dots and hyphens
S3_URI = re.compile(r"^s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(.*))?$")


class DeployError(RuntimeError):
    """A deploy step that cannot go on; the message names what is wrong and what to do."""


def check_number(name: str, value: float, low: float, high: float = math.inf, *, above: bool = False) -> None:
    """Refuse anything but a finite number in ``[low, high]`` (``(low, high]`` with ``above``),
    naming the option: a NaN passes every ``<`` test, and a NaN or negative poll interval
    or timeout would make a wait loop spin or never end."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if number and (value > low if above else value >= low) and value <= high:
        return
    rule = f"{'>' if above else '>='} {low:g}" + (f" and <= {high:g}" if high != math.inf else "")
    raise DeployError(f"{name}: must be {'' if number else 'a finite number '}{rule}, got {value!r}")


@dataclass
class AwsContext:
    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None  # every service (moto server in tests)
    runtime_endpoint_url: str | None = None  # sagemaker-runtime only (the local runtime)
    dry_run: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)
    recorded: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._session = boto3.Session(profile_name=self.profile, region_name=self.region)
        self._clients: dict[str, Any] = {}

    @property
    def region_name(self) -> str:
        region = self._session.region_name
        if not region:
            raise DeployError("region: not set; pass --region or set AWS_REGION / a profile region")
        return region

    def client(self, service: str) -> Any:
        if service not in self._clients:
            url = self.runtime_endpoint_url if service == "sagemaker-runtime" and self.runtime_endpoint_url \
                else self.endpoint_url
            self._clients[service] = self._session.client(
                service, region_name=self.region_name, endpoint_url=url,
                config=botocore.config.Config(retries={"max_attempts": 3, "mode": "standard"}))
        return self._clients[service]

    def call(self, service: str, operation: str, **params: Any) -> dict[str, Any]:
        """Make (or, in dry-run mode, print and record) one AWS API call."""
        if self.dry_run:
            self.recorded.append({"service": service, "operation": operation, "params": params})
            print(f"[dry-run] {service}.{operation}({json.dumps(params, default=str, sort_keys=True)})",
                  file=self.out)
            return {}
        return getattr(self.client(service), operation)(**params)
