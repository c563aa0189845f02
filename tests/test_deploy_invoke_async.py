"""``python -m s1_mini.deploy invoke-async`` end to end: the CLI as its own process uploads the
request to S3 (a moto server), calls ``invoke_endpoint_async`` on the local SageMaker runtime,
which runs it on a REAL serving container and writes the answer or the failure to S3, and
``--wait`` polls S3 for it."""

from __future__ import annotations

import io
import json

import pytest
import soundfile as sf

from server_utils import deploy_cli
from test_sagemaker_async import BUCKET, CREDENTIALS, ENDPOINT, TINY_FRAME, container, runtime, s3  # noqa: F401

from s1_mini.deploy.aws import AwsContext, DeployError
from s1_mini.deploy.invoke_async import failure_message, invoke_async, wait_for_result


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch):
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)




def _urls(runtime, s3) -> list[str]:
    return ["--region", "us-east-1", "--endpoint-url", s3.endpoint, "--runtime-endpoint-url", runtime.url]


def test_invoke_async_uploads_waits_and_writes_the_wav(runtime, s3, tmp_path):
    out = tmp_path / "async.wav"
    r = deploy_cli("invoke-async", *_urls(runtime, s3), "--endpoint", ENDPOINT, "--text", "Hello, async CLI.",
                   "--seed", "1", "--upload-prefix", f"s3://{BUCKET}/cli-in", "--inference-id", "cli-1",
                   "--wait", "--poll", "0.2", "--timeout", "60", "--out", str(out))
    assert r.returncode == 0, r.stderr + runtime.log()
    assert f"output location: s3://{BUCKET}/out/cli-1.out" in r.stdout
    assert f"failure location: s3://{BUCKET}/failures/cli-1-error.out" in r.stdout
    assert f"input s3://{BUCKET}/cli-in/cli-1.json" in r.stdout
    uploaded = json.loads(s3.get_object(Bucket=BUCKET, Key="cli-in/cli-1.json")["Body"].read())
    assert uploaded == {"text": "Hello, async CLI.", "seed": 1}
    audio, rate = sf.read(out, dtype="float32")
    assert rate == 44100 and len(audio) > 0 and len(audio) % TINY_FRAME == 0


def test_without_wait_prints_the_locations_only(runtime, s3, tmp_path):
    s3.put_object(Bucket=BUCKET, Key="in/existing.json", Body=json.dumps({"text": "Already in S3."}))
    r = deploy_cli("invoke-async", *_urls(runtime, s3), "--endpoint", ENDPOINT,
                   "--input-location", f"s3://{BUCKET}/in/existing.json", "--out", str(tmp_path / "no.wav"))
    assert r.returncode == 0, r.stderr
    assert f"output location: s3://{BUCKET}/out/" in r.stdout and not (tmp_path / "no.wav").exists()


def test_failed_inference_is_a_clear_error(runtime, s3, tmp_path):
    request = tmp_path / "bad.json"
    request.write_text(json.dumps({"text": "hi", "top_p": 7}))
    r = deploy_cli("invoke-async", *_urls(runtime, s3), "--endpoint", ENDPOINT, "--request", str(request),
                   "--upload-prefix", f"s3://{BUCKET}/cli-in", "--wait", "--poll", "0.2", "--timeout", "60",
                   "--out", str(tmp_path / "bad.wav"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "failed" in r.stderr and "top_p: " in r.stderr and "top_p: top_p" not in r.stderr
    assert not (tmp_path / "bad.wav").exists()


def test_python_api_missing_input_object(runtime, s3):
    ctx = AwsContext(region="us-east-1", endpoint_url=s3.endpoint, runtime_endpoint_url=runtime.url,
                     out=io.StringIO())
    invocation = invoke_async(ctx, ENDPOINT, input_location=f"s3://{BUCKET}/in/missing.json")
    with pytest.raises(DeployError, match="InputNotFound"):
        wait_for_result(ctx, invocation, timeout_s=60, poll_s=0.2)


def test_unknown_endpoint_and_missing_upload_prefix(runtime, s3):
    r = deploy_cli("invoke-async", *_urls(runtime, s3), "--endpoint", "nobody", "--input-location",
                   f"s3://{BUCKET}/in/x.json")
    assert r.returncode == 2 and "nobody" in r.stderr and "Traceback" not in r.stderr
    r = deploy_cli("invoke-async", "--region", "us-east-1", "--endpoint", ENDPOINT, "--text", "hi")
    assert r.returncode == 2 and "--upload-prefix" in r.stderr


def test_failure_messages():
    assert failure_message(b'{"error": {"status": 422, "field": "top_p", "message": "too big"}}') == \
        "422 top_p: too big"
    assert failure_message(b'{"error": {"field": "text", "message": "text: empty"}}') == "text: empty"
    assert failure_message(b'{"ErrorCode": "InputNotFound", "Message": "gone"}') == "InputNotFound: gone"
