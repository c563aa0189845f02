"""AWS clients for the deploy steps, and the dry-run recorder.

Every step gets an :class:`AwsContext`; it hands out boto3 clients (region, profile,
and an ``endpoint_url`` for tests against a local moto server or the local SageMaker
runtime) and, in dry-run mode, records the calls a step would make instead of making
them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

import boto3
import botocore.config


class DeployError(RuntimeError):
    """A deploy step that cannot go on; the message names what is wrong and what to do."""


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
