"""``serve --server mms``: the real multi-model-server 1.1.11 through the
sagemaker-inference toolkit 1.10.1, serving a real model.tar.gz (tiny random checkpoint
+ code/inference.py) extracted into an /opt/ml-style tree.

MMS and the toolkit live in their own environment, ``.mmsenv`` (built by
``bash tests/mms/build_mms_env.sh``; the toolkit needs setuptools < 81, which the
project's .venv must not get); the server runs there, this test drives it over HTTP.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import soundfile as sf

from s1_mini.testing.make_checkpoint import make_checkpoint
from server_utils import ROOT
from test_sagemaker_front import TINY_FRAME, build_model_tar, extract

MMS_ENV = ROOT / ".mmsenv"
MMS_PYTHON = MMS_ENV / "bin" / "python"
LOAD_TIMEOUT_S = 120

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MMS_ENV / ".complete-v1").exists(),
                       reason="MMS environment .mmsenv missing: run bash tests/mms/build_mms_env.sh"),
    pytest.mark.skipif(shutil.which("java") is None, reason="multi-model-server needs Java (java not on PATH)"),
]


def free_mms_port() -> int:
    """A free port MMS accepts: its Connector rejects ports >= 32767, and the kernel's
    ephemeral ports (what binding port 0 gives) start at 32768."""
    for _ in range(200):
        port = random.randint(20000, 32766)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below 32767")


def group_members(pgid: int) -> list[tuple[int, str]]:
    """Live (non-zombie) processes of a process group, from /proc: (pid, command line)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                members.append((int(entry.name), cmdline.strip()))
        except (OSError, ValueError, IndexError):
            continue
    return members


class MMSContainer:
    """``python -m s1_mini.sagemaker.serve serve --server mms`` in .mmsenv, in a process
    group of its own (MMS's Java frontend and Python workers join it)."""

    def __init__(self, base_dir: Path, work: Path) -> None:
        self.port = free_mms_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tmp = work / "tmp"  # MMS's pid file and worker sockets, away from other runs
        tmp.mkdir()
        self.log_path = work / f"mms-{self.port}.log"
        environment = {**os.environ, "SAGEMAKER_BASE_DIR": str(base_dir), "SAGEMAKER_BIND_TO_PORT": str(self.port),
                       "SAGEMAKER_MODEL_SERVER_WORKERS": "1", "SAGEMAKER_STARTUP_TIMEOUT": "60",
                       "S1_MINI_DEVICE": "cpu", "S1_MINI_PRECISION": "float32", "S1_MINI_COMPILE": "false",
                       "S1_MINI_MAX_NEW_TOKENS": "24", "S1_MINI_MMS_DIR": str(work / "mms"),
                       "TMPDIR": str(tmp), "TEMP": str(tmp), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        environment.pop("VIRTUAL_ENV", None)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [str(MMS_PYTHON), "-m", "s1_mini.sagemaker.serve", "serve", "--server", "mms", "--host", "127.0.0.1"],
            stdout=self._log, stderr=subprocess.STDOUT, env=environment, cwd=work, start_new_session=True)
        self.pgid = self.process.pid
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def wait_loaded(self, timeout: float = LOAD_TIMEOUT_S) -> dict[str, list[int]]:
        """/ping until 200, then a small /invocations until 200 (MMS loads the model in
        its worker after the frontend is up). Returns the statuses seen."""
        seen: dict[str, list[int]] = {"ping": [], "invocations": []}
        deadline = time.monotonic() + timeout
        path = "ping"
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                if path == "ping":
                    r = self.client.get("/ping")
                else:
                    r = self.client.post("/invocations", json={"text": "Warm up.", "seed": 0})
                seen[path].append(r.status_code)
                if r.status_code == 200:
                    if path == "invocations":
                        return seen
                    path = "invocations"
                    continue
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"MMS did not load the model in {timeout} s ({seen}):\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-20000:]

    def stop(self, timeout: float = 40) -> tuple[int | None, list[tuple[int, str]]]:
        """SIGTERM to the serve process (as SageMaker stops a container); returns its
        exit status and whatever of its process group outlived it, then kills those."""
        self.client.close()
        rc = self.process.poll()
        if rc is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                rc = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                rc = None
        time.sleep(0.5)
        left = group_members(self.pgid)
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.process.poll() is None:
            self.process.wait(10)
        self._log.close()
        return rc, left


@pytest.fixture(scope="module")
def mms(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mms")
    checkpoint = make_checkpoint(tmp / "checkpoint", "tiny", seed=0)
    base_dir = extract(build_model_tar(checkpoint, tmp / "model.tar.gz"), tmp / "ml")
    c = MMSContainer(base_dir, tmp)
    try:
        c.seen = c.wait_loaded()
    except BaseException:
        c.stop()
        raise
    yield c
    if not c._log.closed:  # test_sigterm_stops_everything did not run
        c.stop()


def _wav(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    audio, rate = sf.read(io.BytesIO(response.content), dtype="float32")
    assert rate == 44100 and len(audio) > 0 and len(audio) % TINY_FRAME == 0


def test_model_loads_and_ping_answers(mms):
    assert mms.seen["ping"][-1] == 200 and mms.seen["invocations"][-1] == 200
    # a request sent while the worker loads waits in MMS's queue (or gets 503), never 500
    assert set(mms.seen["invocations"][:-1]) <= {503}
    log = mms.log()
    assert "s1_mini.sagemaker.mms:handle" in log and f"127.0.0.1:{mms.port}" in log


def test_invocation_returns_wav(mms):
    r = mms.client.post("/invocations", json={"text": "Hello from multi-model-server.", "seed": 1},
                        headers={"Accept": "audio/wav"})
    assert r.headers["content-type"] == "audio/wav"
    _wav(r)
    # without Accept (MMS's default would be application/json): the "format" field decides
    flac = mms.client.post("/invocations", json={"text": "Flac, please.", "format": "flac"})
    assert flac.status_code == 200 and flac.headers["content-type"] == "audio/flac"
    as_json = mms.client.post("/invocations", json={"text": "JSON out.", "seed": 2},
                              headers={"Accept": "application/json"})
    assert as_json.headers["content-type"] == "application/json" and as_json.json()["sample_rate"] == 44100


@pytest.mark.parametrize("kwargs, status, field", [
    (dict(content=b"{not json", headers={"Content-Type": "application/json"}), 400, "body"),
    (dict(json={"text": "hi", "temperature": 5}), 422, "temperature"),
    (dict(json={"text": ""}), 422, "text"),
    (dict(content=b"abc", headers={"Content-Type": "image/png"}), 415, "content-type"),
    (dict(json={"text": "hi"}, headers={"Accept": "video/mp4"}), 406, "accept"),
])
def test_bad_invocations_keep_status_and_json_error(mms, kwargs, status, field):
    r = mms.client.post("/invocations", **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]  # the whole body is our JSON error (no toolkit traceback)
    assert error["field"] == field and error["message"]
    assert "Traceback" not in r.text
    _wav(mms.client.post("/invocations", json={"text": "Still serving."}))


def test_jsonlines_one_output_line_per_input_line(mms):
    lines = [json.dumps({"text": "First record.", "seed": 1}),
             '{"text": ',  # broken JSON
             json.dumps({"text": "Third record.", "seed": 3}),
             json.dumps({"text": "bad", "top_p": 3}),  # invalid value
             json.dumps({"text": "Fifth record.", "seed": 5})]
    r = mms.client.post("/invocations", content="\n".join(lines).encode(),
                        headers={"Content-Type": "application/jsonlines"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/jsonlines")
    out = [json.loads(line) for line in r.text.rstrip("\n").split("\n")]
    assert len(out) == len(lines)
    assert out[1]["error"]["message"].startswith("line 2: ") and out[1]["error"]["field"] == "body"
    assert out[3]["error"]["message"].startswith("line 4: ") and out[3]["error"]["field"] == "top_p"
    for i in (0, 2, 4):
        audio, rate = sf.read(io.BytesIO(__import__("base64").b64decode(out[i]["audio"])))
        assert rate == out[i]["sample_rate"] == 44100 and len(audio) == out[i]["frames"] * TINY_FRAME


def test_ping_is_200_even_when_the_model_cannot_load(tmp_path):
    """MMS's /ping is 200 while its only worker keeps dying in model_fn (here: no
    checkpoint in the model directory); only the body says so, and /invocations waits."""
    base_dir = tmp_path / "ml"
    (base_dir / "model" / "code").mkdir(parents=True)
    shutil.copy(ROOT / "code" / "inference.py", base_dir / "model" / "code" / "inference.py")
    c = MMSContainer(base_dir, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while "FileNotFoundError" not in c.log():
            assert time.monotonic() < deadline and c.process.poll() is None, c.log()
            time.sleep(0.25)
        ping = c.client.get("/ping")
        assert ping.status_code == 200 and ping.json()["status"] == "Unhealthy"
        try:
            status = c.client.post("/invocations", json={"text": "Anyone there?"}, timeout=3).status_code
        except httpx.TimeoutException:
            status = None
        assert status != 200
    finally:
        rc, left = c.stop()
    assert rc == 0 and left == [], (rc, left, c.log())


def test_sigterm_stops_everything(mms):
    """Last: SageMaker's stop. serve exits 0 and leaves no Java frontend or worker behind."""
    rc, left = mms.stop()
    assert rc == 0, mms.log()
    assert left == [], left
