"""The sagemaker SDK path (s1_mini.deploy.sdk): the arguments it passes, and a clear error
when the ``sagemaker`` package is not installed (it is not a dependency of this project)."""

from __future__ import annotations

import importlib.util

import pytest

from s1_mini.deploy.aws import DeployError
from s1_mini.deploy.sdk import build_model, deploy_kwargs, model_kwargs

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/s1-mini-sagemaker:abc123"
DATA = "s3://bucket/s1-mini/abc123/model.tar.gz"
ROLE = "arn:aws:iam::123456789012:role/S1MiniSageMaker"


def test_model_kwargs():
    assert model_kwargs(IMAGE, DATA, ROLE, env={"S1_MINI_PRECISION": "bfloat16"}, name="s1-mini-1") == {
        "image_uri": IMAGE, "model_data": DATA, "role": ROLE, "env": {"S1_MINI_PRECISION": "bfloat16"},
        "name": "s1-mini-1"}


@pytest.mark.parametrize("args, field", [
    ((IMAGE.split(":")[0] + "x", DATA, ROLE), "image_uri"),
    ((IMAGE, "/local/model.tar.gz", ROLE), "model_data"),
    ((IMAGE, DATA, "S1MiniSageMaker"), "role"),
])
def test_bad_arguments_name_the_field(args, field):
    with pytest.raises(DeployError, match=f"^{field}: "):
        model_kwargs(*args)


def test_unknown_engine_variable_is_refused():
    with pytest.raises(DeployError, match="env: S1_MINI_NOPE"):
        model_kwargs(IMAGE, DATA, ROLE, env={"S1_MINI_NOPE": "1"})


def test_deploy_kwargs_need_a_gpu_instance():
    kwargs = deploy_kwargs(endpoint_name="s1-mini-staging")
    assert kwargs["instance_type"] == "ml.g5.xlarge" and kwargs["endpoint_name"] == "s1-mini-staging"
    with pytest.raises(DeployError, match="instance_type"):
        deploy_kwargs("ml.m5.xlarge")


@pytest.mark.skipif(importlib.util.find_spec("sagemaker") is not None, reason="the sagemaker SDK is installed")
def test_missing_sdk_says_pip_install_sagemaker():
    with pytest.raises(DeployError, match="pip install sagemaker"):
        build_model(IMAGE, DATA, ROLE)


@pytest.mark.skipif(importlib.util.find_spec("sagemaker") is None, reason="the sagemaker SDK is not installed")
def test_builds_a_sagemaker_model():
    import sagemaker

    model = build_model(IMAGE, DATA, ROLE, env={"S1_MINI_PRECISION": "bfloat16"},
                        sagemaker_session=sagemaker.Session.__new__(sagemaker.Session))
    assert isinstance(model, sagemaker.model.Model)
    assert model.image_uri == IMAGE and model.model_data == DATA and model.env == {"S1_MINI_PRECISION": "bfloat16"}
