"""Faults against the real HTTP server (``python -m s1_mini.server``, tiny checkpoint,
CPU), injected by real mechanisms: requests past their timeout, SIGTERM with requests
in flight, a voice registry on a full disk (RLIMIT_FSIZE in the server process) or in a
read-only directory (mode 0555, and a server process without the capabilities that let
root ignore permissions), corrupt checkpoint files, a CUDA out-of-memory error in the
middle of a stream (the runner's fault_hook, installed by a sitecustomize). Client
disconnects: tests/test_server.py (``test_disconnect_mid_stream_frees_the_slot``,
``test_disconnect_while_waiting_for_a_whole_file_cancels_it``)."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from server_utils import ROOT, ServerProcess, free_port, metric_values, sine_wav

from s1_mini.testing.make_checkpoint import make_checkpoint
from s1_mini.voices import VoiceRegistry

FSIZE_LIMIT = 4096  # bytes per file: a 0.02 s voice fits, a 0.5 s one does not


@pytest.fixture(scope="module")
def shared_dir():
    """A directory every user can read (pytest's tmp dirs are private to root), holding
    the tiny checkpoint."""
    root = Path(tempfile.mkdtemp(prefix="s1-mini-faults-"))
    root.chmod(0o755)
    make_checkpoint(root / "ckpt", "tiny", seed=0)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _error(response: httpx.Response) -> dict:
    assert "Traceback" not in response.text and 'File "' not in response.text
    return response.json()["error"]


def _idle(client: httpx.Client) -> dict[str, float]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = metric_values(client.get("/metrics").text)
        if now["s1_mini_batch_size"] == 0 and now["s1_mini_queue_depth"] == 0 and now["s1_mini_active_streams"] == 0:
            return now
        time.sleep(0.05)
    raise AssertionError(f"the server did not become idle: {now}")


# ---------------------------------------------------------------- timeouts and SIGTERM


@pytest.fixture(scope="module")
def slow_server(shared_dir):
    """One slot and a 2 s request timeout: a few 200-frame requests (~0.7 s each here)
    queued behind each other cannot all finish in time."""
    server = ServerProcess(shared_dir / "ckpt", "--request-timeout", "2", "--max-batch-size", "1",
                           "--max-new-tokens", "24", log_dir=shared_dir)
    yield server
    server.stop()


def test_requests_past_their_timeout_get_504_and_the_next_works(slow_server):
    statuses: list[int] = []
    errors: list[dict] = []

    def call(i: int) -> None:
        with httpx.Client(base_url=slow_server.url, timeout=60) as c:
            r = c.post("/v1/tts", json={"text": "Hello there, this is a test.", "max_new_tokens": 200, "seed": 1})
        statuses.append(r.status_code)
        if r.status_code != 200:
            errors.append(_error(r))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(statuses) == 12 and set(statuses) <= {200, 504}, statuses
    assert statuses.count(504) >= 3, statuses  # 12 x ~0.7 s of work cannot fit 2 s
    assert all(e["code"] == "timeout" and "timed out" in e["message"] for e in errors), errors
    now = _idle(slow_server.client)
    assert now["s1_mini_kv_slots_used"] == 0
    r = slow_server.client.post("/v1/tts", json={"text": "After the timeouts.", "max_new_tokens": 8})
    assert r.status_code == 200 and r.content[:4] == b"RIFF"


def test_sigterm_with_requests_in_flight_drains_and_exits_0(slow_server):
    url = slow_server.url
    outcome: dict[str, object] = {}
    streaming = threading.Event()

    def stream() -> None:
        with httpx.Client(base_url=url, timeout=60) as c, \
                c.stream("POST", "/v1/tts/stream", json={"text": "Streamed through a shutdown.",
                                                         "max_new_tokens": 120, "seed": 2}) as r:
            body = b""
            for chunk in r.iter_raw():
                body += chunk
                streaming.set()
            outcome["stream"] = (r.status_code, body)

    def whole() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/v1/tts", json={"text": "A whole file through a shutdown.", "max_new_tokens": 60})
        outcome["whole"] = r.status_code

    threads = [threading.Thread(target=stream), threading.Thread(target=whole)]
    for t in threads:
        t.start()
    assert streaming.wait(30), slow_server.log()
    start = time.monotonic()
    slow_server.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    with pytest.raises(httpx.TransportError):  # no longer accepting connections
        httpx.post(f"{url}/v1/tts", json={"text": "Too late."}, timeout=5)
    code = slow_server.process.wait(30)
    elapsed = time.monotonic() - start
    for t in threads:
        t.join(30)
    assert code == 0, slow_server.log()[-3000:]
    assert elapsed < 30
    status, body = outcome["stream"]
    samples = len(body) - 44
    assert status == 200 and body[:4] == b"RIFF" and samples > 0 and samples % 128 == 0  # whole 16-bit frames
    assert outcome["whole"] in (200, 503, 504)  # finished, or cancelled cleanly by the shutdown


# ---------------------------------------------------------------- corrupt checkpoints


def _corrupt(name: str) -> Callable[[Path], None]:
    def truncate(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return {"model.pth": truncate,
            "codec.pth": lambda path: path.write_bytes(b"garbage, not a torch file" * 100),
            "config.json": lambda path: path.write_text('{"dim": 64, "n_layer": ')}[name]


@pytest.mark.parametrize("name", ["model.pth", "codec.pth", "config.json"])
def test_corrupt_checkpoint_exits_1_with_one_line_naming_the_file(shared_dir, tmp_path, name):
    bad = tmp_path / "ckpt"
    shutil.copytree(shared_dir / "ckpt", bad)
    _corrupt(name)(bad / name)
    result = subprocess.run([sys.executable, "-m", "s1_mini.server", "--checkpoint", str(bad), "--device", "cpu",
                             "--port", str(free_port()), "--no-compile"], check=False, capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: loading the models failed: ") and str(bad / name) in last, last


# ---------------------------------------------------------------- voice registry storage


class LimitedServer:
    """``python -m s1_mini.server`` with extra process settings (a file size limit, another
    user); its output goes through a pipe, which no file size limit applies to."""

    def __init__(self, checkpoint: Path, voice_dir: Path, cwd: Path, **popen: object) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HOME": str(cwd),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-m", "s1_mini.server", "--checkpoint", str(checkpoint), "--voice-dir",
                   str(voice_dir), "--port", self.url.rsplit(":", 1)[1], "--device", "cpu", "--precision",
                   "float32", "--no-compile", "--max-new-tokens", "16"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                        cwd=cwd, **popen)
        self.output: list[bytes] = []
        threading.Thread(target=lambda: self.output.extend(self.process.stdout), daemon=True).start()
        self.client = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                if self.client.get("/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready:\n{self.log()}")

    def log(self) -> str:
        return b"".join(self.output).decode(errors="replace")

    def stop(self) -> int:
        self.client.close()
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


def _registry_with_one_voice(directory: Path, checkpoint: Path) -> bytes:
    """A registry directory holding the voice 'before' (codes of the model's shape), as a
    server wrote it earlier; returns the file's bytes."""
    config = json.loads((checkpoint / "config.json").read_text())
    codes = np.arange(config["num_codebooks"] * 8).reshape(config["num_codebooks"], 8) % config["codebook_size"]
    VoiceRegistry(directory, lambda audio, rate: codes).register("before", b"earlier audio", "An earlier voice.")
    return (directory / "before.npz").read_bytes()


def _register(server: LimitedServer, voice_id: str, seconds: float) -> httpx.Response:
    return server.client.post("/v1/references", data={"id": voice_id, "text": "Words of the voice."},
                              files={"audio": ("voice.wav", sine_wav(seconds), "audio/wav")})


def _assert_registry_intact(server: LimitedServer, directory: Path, before: bytes, ids: list[str]) -> None:
    assert sorted(p.name for p in directory.iterdir()) == sorted(f"{i}.npz" for i in ids)  # no temporary left
    assert (directory / "before.npz").read_bytes() == before
    assert [v["id"] for v in server.client.get("/v1/references").json()["voices"]] == ids
    r = server.client.post("/v1/tts", json={"text": "With the earlier voice.", "reference_id": "before"})
    assert r.status_code == 200 and r.content[:4] == b"RIFF"


def _limit_file_size() -> None:
    # In the child before exec: the kernel refuses writes past the limit with EFBIG, as
    # it refuses them with ENOSPC on a full disk; SIGXFSZ ignored so that it is an error.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


@pytest.fixture(scope="module")
def full_disk(shared_dir):
    voices = shared_dir / "voices-full"
    before = _registry_with_one_voice(voices, shared_dir / "ckpt")
    server = LimitedServer(shared_dir / "ckpt", voices, shared_dir, preexec_fn=_limit_file_size)
    yield server, voices, before
    assert server.stop() == 0, server.log()


def test_full_disk_registration_fails_cleanly_and_keeps_the_registry(full_disk):
    server, voices, before = full_disk
    small = _register(server, "small", 0.02)  # fits the limit: the server itself is fine
    assert small.status_code == 201, small.text
    big = _register(server, "big", 0.5)
    assert big.status_code >= 400 and _error(big)["message"]
    # the kernel's refusal (EFBIG) reached the registry; the log line may trail the answer
    deadline = time.monotonic() + 10
    while "File too large" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "File too large" in server.log()
    overwrite = server.client.post("/v1/references", data={"id": "before", "text": "New words.", "overwrite": "true"},
                                   files={"audio": ("voice.wav", sine_wav(0.5), "audio/wav")})
    assert overwrite.status_code == big.status_code
    _assert_registry_intact(server, voices, before, ["before", "small"])


def test_full_disk_registration_is_507(full_disk):
    server, _, _ = full_disk
    r = _register(server, "big2", 0.5)
    assert r.status_code == 507 and _error(r)["code"] == "insufficient_storage"


PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2  # <linux/prctl.h>, <linux/capability.h>


def _obey_permissions() -> None:
    # In the child before exec: root keeps only the capabilities of its bounding set
    # across exec, so without these two it is refused by file modes like any user. (Not
    # another user: the interpreter may live under root's private home.)
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap})")


@pytest.fixture(scope="module")
def read_only(shared_dir):
    voices = shared_dir / "voices-read-only"
    before = _registry_with_one_voice(voices, shared_dir / "ckpt")
    voices.chmod(0o555)
    try:
        server = LimitedServer(shared_dir / "ckpt", voices, shared_dir,
                               preexec_fn=_obey_permissions if os.geteuid() == 0 else None)
    except subprocess.SubprocessError as exc:  # no CAP_SETPCAP to give the capabilities up
        pytest.skip(f"cannot start a server that obeys file permissions here: {exc}")
    yield server, voices, before
    assert server.stop() == 0, server.log()
    voices.chmod(0o755)


def test_read_only_registry_registration_fails_cleanly_and_keeps_the_registry(read_only):
    server, voices, before = read_only
    r = _register(server, "new", 0.02)
    assert r.status_code >= 400 and _error(r)["message"]
    assert "Permission denied" in r.text + server.log()  # the kernel's refusal (EACCES) reached the registry
    deleted = server.client.delete("/v1/references/before")
    assert deleted.status_code >= 500 and _error(deleted)["message"]
    _assert_registry_intact(server, voices, before, ["before"])


def test_read_only_registry_registration_is_500(read_only):
    server, _, _ = read_only
    r = _register(server, "new2", 0.02)
    assert r.status_code == 500 and _error(r)["code"] == "storage_not_writable"


# ---------------------------------------------------------------- a stream that fails after its headers

# The runner's fault_hook in the server process, installed through PYTHONPATH (Python
# imports sitecustomize at start-up) since the HTTP server runs no user code of its own
# (the SageMaker tests use the model archive's code/inference.py). Switch files in
# $S1_MINI_TEST_FAULTS: "slow" holds the seconds each decode step takes; "oom" makes the
# next decode step raise a CUDA out-of-memory error (once: the hook renames it).
FAULT_SITECUSTOMIZE = '''
import os
import time
from pathlib import Path

import torch

from s1_mini.engine import ProductionTTSEngine

_start = ProductionTTSEngine.start


def _hook(stage):
    if stage != "decode":
        return
    switches = Path(os.environ["S1_MINI_TEST_FAULTS"])
    if (switches / "slow").exists():
        time.sleep(float((switches / "slow").read_text() or 0))
    try:
        os.rename(switches / "oom", switches / "oom-fired")
    except FileNotFoundError:
        return
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")


def start(self):
    started = _start(self)
    self._runner.fault_hook = _hook
    return started


ProductionTTSEngine.start = start
'''


@pytest.fixture(scope="module")
def faulty_server(shared_dir):
    hooks, switches = shared_dir / "fault-hooks", shared_dir / "fault-switches"
    hooks.mkdir()
    switches.mkdir()
    (hooks / "sitecustomize.py").write_text(FAULT_SITECUSTOMIZE)
    server = ServerProcess(shared_dir / "ckpt", "--max-new-tokens", "24", log_dir=shared_dir,
                           env={"PYTHONPATH": str(hooks), "S1_MINI_TEST_FAULTS": str(switches)})
    server.switches = switches
    yield server
    server.stop()


LONG = {"max_new_tokens": 200, "seed": 1}


@pytest.mark.parametrize("path, body", [
    ("/v1/tts/stream", {"text": "A stream that fails halfway.", "format": "wav", **LONG}),
    ("/v1/audio/speech", {"model": "s1-mini", "input": "A stream that fails halfway.", "voice": "default",
                          "response_format": "pcm", **LONG}),
], ids=["wav-stream", "openai-pcm"])
def test_stream_failing_after_its_headers_aborts_the_connection(faulty_server, path, body):
    switches = faulty_server.switches
    (switches / "slow").write_text("0.05")  # 200 frames: 10 s, so the stream is mid-way when it fails
    try:
        with httpx.Client(base_url=faulty_server.url, timeout=30) as c, \
                c.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            chunks = r.iter_raw()
            received = len(next(chunks))
            (switches / "oom").touch()
            # No clean end: the connection closes without the final chunk, which every
            # client reports (httpx: "peer closed connection without sending complete
            # message body: incomplete chunked read").
            with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
                for chunk in chunks:
                    received += len(chunk)
    finally:
        (switches / "slow").unlink()
    assert (switches / "oom-fired").exists() and received > 0
    (switches / "oom-fired").unlink()
    log = faulty_server.log()
    assert "stream aborted after" in log and "(out_of_memory); closing the connection" in log, log[-3000:]
    assert "Traceback" not in log
    assert _idle(faulty_server.client)["s1_mini_kv_slots_used"] == 0
    # the next stream ends cleanly, with its terminating chunk
    with httpx.Client(base_url=faulty_server.url, timeout=30) as c, \
            c.stream("POST", "/v1/tts/stream", json={"text": "The next stream.", "max_new_tokens": 16}) as r:
        whole = r.read()
    assert r.status_code == 200 and whole[:4] == b"RIFF" and (len(whole) - 44) % 128 == 0
