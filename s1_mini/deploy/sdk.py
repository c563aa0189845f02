"""The ``sagemaker`` SDK path: a ``sagemaker.model.Model`` for the S1-mini image.

For teams that already deploy with the SageMaker Python SDK rather than
``python -m s1_mini.deploy``. The image serves ``/ping`` and ``/invocations`` itself (the
S1-mini front reads ``model.tar.gz`` from ``/opt/ml/model``), so the plain ``Model`` class
is the right one: no framework ``PyTorchModel`` entry point or serving stack is wanted.

Recipe (``pip install sagemaker``; the image pushed by ``container/build.sh`` + ECR, the
archive made by ``python -m s1_mini.deploy package`` and ``upload``)::

    from s1_mini.deploy.sdk import build_model

    model = build_model(image_uri="123456789012.dkr.ecr.us-east-1.amazonaws.com/s1-mini-sagemaker:abc123",
                        model_data="s3://my-bucket/s1-mini/abc123/model.tar.gz",
                        role="arn:aws:iam::123456789012:role/S1MiniSageMaker",
                        env={"S1_MINI_PRECISION": "bfloat16"})
    predictor = model.deploy(initial_instance_count=1, instance_type="ml.g5.xlarge",
                             endpoint_name="s1-mini-staging")
    wav = predictor.predict(b'{"text": "Hello."}',
                            initial_args={"ContentType": "application/json", "Accept": "audio/wav"})

Async endpoints: pass ``async_inference_config=sagemaker.async_inference.AsyncInferenceConfig(
output_path="s3://my-bucket/async-out")`` to ``deploy``. Batch: ``model.transformer(
instance_count=1, instance_type="ml.g5.xlarge", strategy="MultiRecord", assemble_with="Line",
accept="application/jsonlines", max_payload=6)`` then ``.transform(data=..., content_type=
"application/jsonlines", split_type="Line")`` (what ``python -m s1_mini.deploy batch`` sends).
"""

from __future__ import annotations

from typing import Any

from s1_mini.deploy.aws import DeployError
from s1_mini.deploy.deploy import ROLE_RE, validate_environment

# The container's health check can take a while on a cold GPU (weights load, CUDA graphs).
DEFAULT_STARTUP_HEALTH_CHECK_S = 900
DEFAULT_DOWNLOAD_TIMEOUT_S = 1800


def model_kwargs(image_uri: str, model_data: str, role: str, *, env: dict[str, str] | None = None,
                 name: str | None = None, **extra: Any) -> dict[str, Any]:
    """The checked keyword arguments ``build_model`` passes to ``sagemaker.model.Model``."""
    if not image_uri or ":" not in image_uri.rsplit("/", 1)[-1] and "@" not in image_uri:
        raise DeployError(f"image_uri: {image_uri!r} needs a tag or digest (…/s1-mini-sagemaker:TAG)")
    if not str(model_data).startswith("s3://") or not str(model_data).endswith(".tar.gz"):
        raise DeployError(f"model_data: {model_data!r} is not an s3://…/model.tar.gz URI; make one with "
                          "`python -m s1_mini.deploy package` and `upload`")
    if not ROLE_RE.match(role or ""):
        raise DeployError(f"role: {role!r} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
    environment = dict(env or {})
    validate_environment(environment)
    kwargs: dict[str, Any] = dict(image_uri=image_uri, model_data=model_data, role=role, env=environment)
    if name:
        kwargs["name"] = name
    kwargs.update(extra)
    return kwargs


def build_model(image_uri: str, model_data: str, role: str, *, env: dict[str, str] | None = None,
                name: str | None = None, sagemaker_session: Any = None, **extra: Any) -> Any:
    """A ``sagemaker.model.Model`` serving S1-mini; ``.deploy(...)`` it as the module docstring shows."""
    kwargs = model_kwargs(image_uri, model_data, role, env=env, name=name, **extra)
    try:
        from sagemaker.model import Model
    except ImportError:
        raise DeployError("sagemaker: the SageMaker Python SDK is not installed; `pip install sagemaker` "
                          "(or deploy with `python -m s1_mini.deploy deploy`, which needs only boto3)") from None
    if sagemaker_session is not None:
        kwargs["sagemaker_session"] = sagemaker_session
    return Model(**kwargs)


def deploy_kwargs(instance_type: str = "ml.g5.xlarge", *, endpoint_name: str | None = None,
                  initial_instance_count: int = 1) -> dict[str, Any]:
    """The ``Model.deploy`` keyword arguments for a GPU real-time endpoint (instance type checked)."""
    from s1_mini.deploy.deploy import validate_instance_type

    validate_instance_type(instance_type)
    kwargs: dict[str, Any] = dict(initial_instance_count=initial_instance_count, instance_type=instance_type,
                                  container_startup_health_check_timeout=DEFAULT_STARTUP_HEALTH_CHECK_S,
                                  model_data_download_timeout=DEFAULT_DOWNLOAD_TIMEOUT_S)
    if endpoint_name:
        kwargs["endpoint_name"] = endpoint_name
    return kwargs
