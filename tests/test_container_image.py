"""The container image definition: checked by parsing here; built and run where a
Docker daemon exists (not on the development and CI machines, which have only the
docker client)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "container" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_every_copied_path_exists_and_is_in_the_build_context():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copies = [args.split()[:-1] for word, args in instructions() if word == "COPY"]
    assert copies
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"


def test_serving_contract_of_the_image():
    steps = dict(instructions())
    assert json.loads(steps["ENTRYPOINT"]) == ["python3", "-m", "s1_mini.sagemaker.serve"]  # exec form
    assert json.loads(steps["CMD"]) == ["serve"]
    assert steps["EXPOSE"] == "8080"
    assert "/ping" in steps["HEALTHCHECK"]
    assert steps["USER"] not in ("root", "0")
    assert instructions()[0][0] == "FROM" and "cuda" in instructions()[0][1]
    # the pinned serving requirements are what the tests run with
    pins = (ROOT / "container" / "requirements-serve.txt").read_text()
    for name in ("fastapi", "uvicorn", "soundfile", "soxr", "tiktoken", "numpy"):
        assert f"\n{name}==" in pins, name


def test_torch_is_a_cuda_wheel_of_the_base_image_past_the_unpickler_fix():
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    base = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.", instructions()[0][1])
    index = re.search(r"--index-url https://download\.pytorch\.org/whl/cu(\d+)\s[^&]*torch==(\d+)\.(\d+)\.(\d+)",
                      runs)
    assert base and index, runs
    assert index[1] == base[1] + base[2]  # the wheel's CUDA (cu128) is the base image's (12.8)
    # CVE-2026-24747 (the weights_only unpickler every weight file goes through) is fixed in 2.10.0
    assert tuple(map(int, index.groups()[1:])) >= (2, 10, 0)


def _docker_daemon() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0


@pytest.mark.skipif(not _docker_daemon(), reason="no Docker daemon on this machine (only the client): the image "
                    "is checked by parsing; build it with container/build.sh where Docker runs")
def test_image_builds_and_serve_answers_ping(tmp_path):
    tag = "s1-mini-sagemaker:test"
    subprocess.run(["bash", str(ROOT / "container" / "build.sh"), tag], check=True, timeout=3600)
    container = subprocess.run(["docker", "run", "-d", "-p", "127.0.0.1::8080", tag, "serve"], check=True,
                               capture_output=True, text=True).stdout.strip()
    try:
        port = subprocess.run(["docker", "port", container, "8080"], capture_output=True, text=True,
                              check=True).stdout.split(":")[-1].strip()
        import httpx

        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and status is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code
            except httpx.TransportError:
                time.sleep(1)
        assert status in (200, 503)  # 503: no model.tar.gz mounted, but the front answers
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)
