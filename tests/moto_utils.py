"""A local moto server for the deploy tests: real boto3 clients talk to it over HTTP.

moto 5.2.5's SageMaker backend validates the instance type of an endpoint config's
production variants against a short hard-coded list (a local variable inside
``FakeEndpointConfig.validate_instance_type``) that has no ``ml.g4dn/g5/g6/g6e/p4d/p5``
sizes. S1-mini is served on GPU instances (default ``ml.g5.xlarge``), so
:func:`allow_gpu_instance_types` wraps that method to also accept the GPU instance
types of :data:`s1_mini.deploy.deploy.GPU_INSTANCE_TYPES`; everything else still goes
through moto's own check. ``ThreadedMotoServer`` runs in this process (a thread), so
the patch reaches the server. Nothing on the client side (boto3) is patched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import requests
from moto.sagemaker.models import FakeEndpointConfig
from moto.server import ThreadedMotoServer
from server_utils import free_port

from s1_mini.deploy.aws import AwsContext
from s1_mini.deploy.deploy import GPU_INSTANCE_TYPES

REGION = "us-east-1"
ROLE_ARN = "arn:aws:iam::123456789012:role/S1MiniSageMaker"


def allow_gpu_instance_types() -> None:
    if getattr(FakeEndpointConfig.validate_instance_type, "_s1_mini", False):
        return
    original = FakeEndpointConfig.validate_instance_type

    def validate_instance_type(self: FakeEndpointConfig, instance_type: str) -> None:
        if instance_type in GPU_INSTANCE_TYPES:
            return
        original(self, instance_type)

    validate_instance_type._s1_mini = True  # type: ignore[attr-defined]
    FakeEndpointConfig.validate_instance_type = validate_instance_type  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION}.items():
        os.environ.setdefault(key, value)
    os.environ.pop("AWS_PROFILE", None)
    allow_gpu_instance_types()
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def moto(moto_url: str) -> Iterator[str]:
    """A moto server reset to an empty account for each test."""
    requests.post(f"{moto_url}/moto-api/reset", timeout=10).raise_for_status()
    yield moto_url


def context(url: str, region: str = REGION, dry_run: bool = False, **kwargs) -> AwsContext:
    return AwsContext(region=region, endpoint_url=url, dry_run=dry_run, **kwargs)
