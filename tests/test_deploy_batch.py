"""``python -m s1_mini.deploy batch``: the AWS calls and the job against a moto server (real
boto3 over HTTP), and the data path end to end against a REAL serving container.

moto completes a transform job the moment it is created and runs nothing, so (a) checks the
upload, the job moto records (``describe_transform_job`` shows our parameters) and the
waiter, and (b) runs the records through the real container with ``--local-container-url``
(what SageMaker does: MultiRecord mini-batches posted to ``/invocations``), writes the output
object into moto S3, then downloads and checks it line by line. Bad lines are in the input.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import soundfile as sf
from moto.server import ThreadedMotoServer

from server_utils import deploy_cli, free_port
from test_sagemaker_front import TINY_FRAME, container, model_tar  # noqa: F401  (fixtures)

from s1_mini.deploy.aws import AwsContext, DeployError
from s1_mini.deploy.batch import batch, mini_batches, read_requests, transform_locally

REGION = "us-east-1"
BUCKET = "s1-mini-batch"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
               "AWS_DEFAULT_REGION": REGION}
BAD = {3: '{"text": ', 6: json.dumps({"text": "line six", "top_p": 3})}  # 1-based line -> broken request


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    saved = {key: os.environ.get(key) for key in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url, region_name=REGION).create_bucket(Bucket=BUCKET)
    try:
        yield url
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def client(service: str, url: str):
    return boto3.client(service, endpoint_url=url, region_name=REGION)




def requests_file(path: Path, count: int = 9) -> Path:
    lines = [BAD.get(i, json.dumps({"text": f"Batch record {i}.", "seed": i})) for i in range(1, count + 1)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_transform_job_against_moto(moto_url, tmp_path):
    """Input uploaded, job created with our parameters, waited for; moto writes no output: a clear error."""
    requests = requests_file(tmp_path / "requests.jsonl")
    r = deploy_cli("batch", "--endpoint-url", moto_url, "--region", REGION, "--input", str(requests),
                   "--s3-prefix", f"s3://{BUCKET}/jobs", "--model", "s1-mini-model", "--job-name", "job-a",
                   "--max-payload-mb", "2", "--max-concurrent-transforms", "3", "--poll", "1", "--timeout", "20",
                   "--env", "S1_MINI_MAX_NEW_TOKENS=24")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"wrote nothing at s3://{BUCKET}/jobs/job-a/output/requests.jsonl.out" in r.stderr
    uploaded = client("s3", moto_url).get_object(Bucket=BUCKET, Key="jobs/job-a/input/requests.jsonl")
    assert uploaded["Body"].read() == requests.read_bytes()
    job = client("sagemaker", moto_url).describe_transform_job(TransformJobName="job-a")
    assert job["TransformJobStatus"] == "Completed" and job["ModelName"] == "s1-mini-model"
    assert job["BatchStrategy"] == "MultiRecord" and job["MaxPayloadInMB"] == 2
    assert job["MaxConcurrentTransforms"] == 3
    assert job["Environment"] == {"S1_MINI_MAX_NEW_TOKENS": "24"}
    assert job["TransformInput"] == {
        "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix",
                                        "S3Uri": f"s3://{BUCKET}/jobs/job-a/input/requests.jsonl"}},
        "ContentType": "application/jsonlines", "CompressionType": "None", "SplitType": "Line"}
    assert job["TransformOutput"] == {"S3OutputPath": f"s3://{BUCKET}/jobs/job-a/output",
                                      "Accept": "application/jsonlines", "AssembleWith": "Line"}
    assert job["TransformResources"] == {"InstanceType": "ml.g5.xlarge", "InstanceCount": 1}


def test_job_output_is_downloaded_and_checked(moto_url, container, tmp_path):
    """The job's output object (made by the real container, put where the job writes it) is checked line by line."""
    requests = requests_file(tmp_path / "reqs.jsonl")
    output = transform_locally(container.url, read_requests(requests), max_payload_mb=1)
    client("s3", moto_url).put_object(Bucket=BUCKET, Key="jobs/job-b/output/reqs.jsonl.out", Body=output)
    ctx = AwsContext(region=REGION, endpoint_url=moto_url, out=io.StringIO())
    result = batch(ctx, requests, f"s3://{BUCKET}/jobs", model="s1-mini-model", job_name="job-b", poll_s=1,
                   timeout_s=20)
    assert result.lines == result.outputs == 9
    assert [number for number, _ in result.failed] == [3, 6] and not result.ok
    assert "top_p" in result.failed[1][1]


def test_local_container_transform_end_to_end(moto_url, container, tmp_path):
    requests = requests_file(tmp_path / "speak.jsonl", count=12)
    audio_dir = tmp_path / "audio"
    r = deploy_cli("batch", "--endpoint-url", moto_url, "--region", REGION, "--input", str(requests),
                   "--s3-prefix", f"s3://{BUCKET}/local", "--job-name", "local-1", "--local-container-url",
                   container.url, "--max-payload-mb", "1", "--max-concurrent-transforms", "2",
                   "--audio-dir", str(audio_dir))
    assert r.returncode == 1, r.stderr  # two bad lines
    assert "Traceback" not in r.stderr
    assert "12 lines for 12 requests, 2 failed" in r.stdout
    assert "line 3: 400" in r.stdout and "line 6: 422 top_p" in r.stdout
    out = client("s3", moto_url).get_object(Bucket=BUCKET, Key="local/local-1/output/speak.jsonl.out")["Body"].read()
    records = [json.loads(line) for line in out.decode().splitlines()]
    assert len(records) == 12
    assert [i for i, rec in enumerate(records, 1) if "error" in rec] == [3, 6]
    files = sorted(audio_dir.iterdir())
    assert [f.name for f in files] == [f"line-{i:05d}.wav" for i in range(1, 13) if i not in BAD]
    for f in files:
        audio, rate = sf.read(f, dtype="float32")
        assert rate == 44100 and len(audio) > 0 and len(audio) % TINY_FRAME == 0
    # order: line 8 alone gives the same length of audio as line 8 in the batch
    alone = container.client.post("/invocations", json={"text": "Batch record 8.", "seed": 8},
                                  headers={"Accept": "audio/wav"})
    assert len(sf.read(io.BytesIO(alone.content))[0]) == len(sf.read(audio_dir / "line-00008.wav")[0])


def test_all_good_lines_exit_zero(moto_url, container, tmp_path):
    requests = tmp_path / "good.jsonl"
    requests.write_text("\n".join(json.dumps({"text": f"Good {i}.", "seed": i}) for i in range(4)))
    ctx = AwsContext(region=REGION, endpoint_url=moto_url, out=io.StringIO())
    result = batch(ctx, requests, f"s3://{BUCKET}", job_name="good", local_container_url=container.url)
    assert result.ok and result.lines == result.outputs == 4
    assert result.output_uri == f"s3://{BUCKET}/good/output/good.jsonl.out"


def test_dry_run_prints_the_calls(tmp_path):
    requests = requests_file(tmp_path / "r.jsonl", count=2)
    r = deploy_cli("batch", "--dry-run", "--region", REGION, "--input", str(requests), "--s3-prefix",
                   f"s3://{BUCKET}/p", "--model", "m", "--job-name", "dry")
    assert r.returncode == 0, r.stderr
    assert "[dry-run] s3.put_object(" in r.stdout and "[dry-run] sagemaker.create_transform_job(" in r.stdout
    assert '"SplitType": "Line"' in r.stdout and '"AssembleWith": "Line"' in r.stdout


@pytest.mark.parametrize("content, message", [("", "has no requests"), ('{"text": "a"}\n\n{"text": "b"}', "line 2")])
def test_bad_input_files(tmp_path, content, message):
    path = tmp_path / "in.jsonl"
    path.write_text(content)
    with pytest.raises(DeployError, match=message):
        read_requests(path)


def test_missing_model_and_bad_prefix_are_clear(tmp_path):
    requests = requests_file(tmp_path / "r.jsonl", count=1)
    r = deploy_cli("batch", "--region", REGION, "--input", str(requests), "--s3-prefix", f"s3://{BUCKET}")
    assert r.returncode == 2 and "--model" in r.stderr and "Traceback" not in r.stderr
    r = deploy_cli("batch", "--region", REGION, "--input", str(requests), "--s3-prefix", "bucket/x", "--model", "m")
    assert r.returncode == 2 and "s3-prefix" in r.stderr


def test_mini_batches_fit_the_payload_limit():
    lines = [b"x" * 400_000] * 7
    assert mini_batches(lines, 1) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert mini_batches([b"a"] * 5, 6) == [(0, 5)]
    with pytest.raises(DeployError, match="line 2 .*max-payload-mb"):
        mini_batches([b"a", b"x" * 2_000_000], 1)
