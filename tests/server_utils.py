"""Start the real server (``python -m s1_mini.server``) as a subprocess for tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A running server: ``url``, ``client`` (httpx), ``log()``; ``stop()`` ends it."""

    def __init__(self, checkpoint: Path, *args: str, env: dict[str, str] | None = None, log_dir: Path,
                 ready_timeout: float = 90.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        command = [sys.executable, "-m", "s1_mini.server", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
                   "--port", str(self.port), "--device", "cpu", "--precision", "float32", "--no-compile", *args]
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=environment,
                                        cwd=log_dir)
        self.client = httpx.Client(base_url=self.url, timeout=60.0)
        self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.client.get("/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server was not ready within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()
        return self.process.returncode


# ---------------------------------------------------------------- one server for the whole session

_shared: dict[str, object] = {}


def tiny_checkpoint() -> Path:
    """The tiny random checkpoint, written once per session."""
    if "checkpoint" not in _shared:
        import atexit
        import shutil
        import tempfile

        from s1_mini.testing.make_checkpoint import make_checkpoint

        root = Path(tempfile.mkdtemp(prefix="s1-mini-server-tests-"))
        atexit.register(shutil.rmtree, root, True)
        _shared["root"] = root
        _shared["checkpoint"] = make_checkpoint(root / "ckpt", "tiny", seed=0)
    return _shared["checkpoint"]  # type: ignore[return-value]


def shared_server() -> ServerProcess:
    """The default server (tiny checkpoint, CPU), started on first use and shared by
    the server test modules; stopped when the test process exits."""
    server = _shared.get("server")
    if server is None or server.process.poll() is not None:  # type: ignore[union-attr]
        import atexit

        checkpoint = tiny_checkpoint()
        server = ServerProcess(checkpoint, "--max-new-tokens", "24",
                               env={"S1_MINI_MAX_TEXT_LENGTH": "2000", "S1_MINI_MAX_BATCH_SIZE": "4"},
                               log_dir=_shared["root"])  # type: ignore[arg-type]
        atexit.register(server.stop)
        _shared["server"] = server
    return server  # type: ignore[return-value]


def metric_values(text: str) -> dict[str, float]:
    """``name{label="v",...}`` (labels sorted) -> value, from a Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def sine_wav(seconds: float = 0.2, rate: int = 22050) -> bytes:
    import io

    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    sf.write(buffer, 0.4 * np.sin(2 * np.pi * 220 * t), rate, format="WAV")
    return buffer.getvalue()


# ---------------------------------------------------------------- the deploy CLI as its own process

FAKE_AWS_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def deploy_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m s1_mini.deploy ARGS`` with fake AWS credentials (moto / the local runtime)."""
    env = {**os.environ, **FAKE_AWS_CREDENTIALS,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "s1_mini.deploy", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
