"""``python -m s1_mini.deploy invoke`` end to end: the CLI as its own process, real boto3,
the local SageMaker runtime in front of a REAL serving container (tiny random checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf

from server_utils import deploy_cli
from test_sagemaker_front import TINY_FRAME, container, model_tar, runtime  # noqa: F401  (fixtures)

from s1_mini.deploy.aws import AwsContext, DeployError
from s1_mini.deploy.invoke import invoke, load_request

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch):
    """Fake credentials for the in-process Python API calls (the CLI processes get them in their env)."""
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)




def _assert_wav(path: Path) -> None:
    audio, rate = sf.read(path, dtype="float32")
    assert rate == 44100 and len(audio) > 0 and len(audio) % TINY_FRAME == 0


def test_invoke_writes_the_wav_and_prints_latency(runtime, tmp_path):
    out = tmp_path / "hello.wav"
    r = deploy_cli("invoke", "--runtime-endpoint-url", runtime.meta.endpoint_url, "--region", "us-east-1",
                   "--endpoint", "s1-mini", "--text", "Hello from the deploy CLI.", "--seed", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout and "total" in r.stdout and "ms" in r.stdout
    _assert_wav(out)


def test_invoke_stream_writes_the_streamed_wav_and_prints_ttfb(runtime, tmp_path):
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"text": "A streamed answer from a request file.", "seed": 5,
                                   "max_new_tokens": 120}))
    out = tmp_path / "streamed.wav"
    r = deploy_cli("invoke", "--runtime-endpoint-url", runtime.meta.endpoint_url, "--region", "us-east-1",
                   "--endpoint", "s1-mini", "--request", str(request), "--stream", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "time to first byte" in r.stdout and "total" in r.stdout
    body = out.read_bytes()
    assert body[:4] == b"RIFF"
    samples = len(body) - 44
    assert samples > 0 and (samples // 2) % TINY_FRAME == 0


def test_python_api_stream_first_byte_before_the_end(runtime, tmp_path):
    ctx = AwsContext(region="us-east-1", runtime_endpoint_url=runtime.meta.endpoint_url)
    result = invoke(ctx, "s1-mini", {"text": "Streaming through the Python API, piece by piece.", "seed": 2,
                                     "max_new_tokens": 200}, tmp_path / "a.wav", stream=True)
    assert result.first_byte_s is not None and 0 < result.first_byte_s < result.latency_s
    assert result.bytes == (tmp_path / "a.wav").stat().st_size


def test_bad_request_is_a_clear_error_without_traceback(runtime, tmp_path):
    request = tmp_path / "bad.json"
    request.write_text(json.dumps({"text": "hi", "top_p": 7}))
    out = tmp_path / "bad.wav"
    r = deploy_cli("invoke", "--runtime-endpoint-url", runtime.meta.endpoint_url, "--region", "us-east-1",
                   "--endpoint", "s1-mini", "--request", str(request), "--out", str(out))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "top_p" in r.stderr and "422" in r.stderr
    assert not out.exists()


def test_unknown_endpoint_is_a_clear_error(runtime, tmp_path):
    r = deploy_cli("invoke", "--runtime-endpoint-url", runtime.meta.endpoint_url, "--region", "us-east-1",
                   "--endpoint", "nobody", "--text", "hi", "--out", str(tmp_path / "x.wav"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "nobody" in r.stderr


@pytest.mark.parametrize("content, message", [("{not json", "is not JSON"), ("[1, 2]", '"text" string')])
def test_bad_request_file_names_the_problem(tmp_path, content, message):
    path = tmp_path / "req.json"
    path.write_text(content)
    with pytest.raises(DeployError, match=message):
        load_request(request_file=path)
    r = deploy_cli("invoke", "--region", "us-east-1", "--endpoint", "e", "--request", str(path))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_text_or_request_exactly_one():
    with pytest.raises(DeployError, match="exactly one"):
        load_request()
    assert load_request("Hi.", seed=3, audio_format="flac") == {"text": "Hi.", "seed": 3, "format": "flac"}


def test_dry_run_prints_the_call(tmp_path):
    r = deploy_cli("invoke", "--dry-run", "--region", "us-east-1", "--endpoint", "s1-mini", "--text", "Hi.",
                   "--out", str(tmp_path / "x.wav"))
    assert r.returncode == 0, r.stderr
    assert "[dry-run] sagemaker-runtime.invoke_endpoint(" in r.stdout and '"EndpointName": "s1-mini"' in r.stdout
    assert not (tmp_path / "x.wav").exists()
