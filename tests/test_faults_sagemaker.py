"""Faults against the real SageMaker container front (``python -m s1_mini.sagemaker.serve``,
tiny checkpoint, CPU) and its multi-engine router, injected by real mechanisms: the
model archive's own ``code/inference.py`` installs the runner's ``fault_hook`` (slow
decode steps, a dying engine thread) switched by files in a directory; clients that
disconnect (from a stream or a whole-file invocation, also through the router); streams
that fail after their headers (a timeout; the engine process killed under the router),
which must break the connection off rather than end cleanly; bodies past the payload
limit (chunked, or a declared 256 MB one the router must not read); SIGKILL of an engine
process; SIGTERM with requests in flight; corrupt, truncated and malicious model files.
Also covered elsewhere: a killed engine restarted (tests/test_sagemaker_router.py),
SIGTERM under load and a broken model.pth reported on /ping (tests/test_sagemaker_front.py)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_sagemaker_front import Container, _wav
from test_security_http import peak_rss_reset, post_declared, rss_kb

from s1_mini.testing.make_checkpoint import make_checkpoint

STREAM = {"X-Amzn-SageMaker-Forwarded-Api": "InvokeEndpointWithResponseStream"}
TIMEOUT_S = 6  # S1_MINI_REQUEST_TIMEOUT of the shared front
PAYLOAD_LIMIT = 6 * 1024 * 1024  # SAGEMAKER_MAX_PAYLOAD_IN_MB's default

# The handlers of the model archive: ours, plus fault switches read at every step.
FAULTY_INFERENCE = '''
"""s1-mini handlers with test fault switches (files in $S1_MINI_TEST_FAULTS)."""
import os
import time
from pathlib import Path

from s1_mini.sagemaker.handlers import input_fn, output_fn, predict_fn  # noqa: F401
from s1_mini.sagemaker.handlers import model_fn as _model_fn


class EngineThreadKilled(BaseException):
    """Not an Exception: the scheduler's step handlers let it through, so its thread dies."""


def model_fn(model_dir, context=None):
    engine = _model_fn(model_dir, context)
    switches = Path(os.environ["S1_MINI_TEST_FAULTS"])

    def hook(stage):
        slow = switches / "slow"  # holds the seconds each decode step takes
        if stage == "decode" and slow.exists():
            time.sleep(float(slow.read_text() or 0))
        try:  # the first engine process to see the switch takes it
            os.rename(switches / "kill-engine-thread", switches / f"killed-{os.getpid()}")
        except FileNotFoundError:
            return
        raise EngineThreadKilled()

    engine._runner.fault_hook = hook
    return engine
'''


def _model_tar(checkpoint: Path, out: Path, inference: str = FAULTY_INFERENCE) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        for item in sorted(checkpoint.iterdir()):
            tar.add(item, arcname=item.name)
        data = inference.encode()
        info = tarfile.TarInfo("code/inference.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out


def _slow(c: Container, seconds: float | None) -> None:
    """Every decode step of the engine takes ``seconds`` (None: as fast as it is)."""
    path = c.faults / "slow"
    if seconds is None:
        path.unlink()
    else:
        path.write_text(str(seconds))


def _base_with_archive(archive: Path, base: Path) -> Path:
    """An /opt/ml-style tree whose model directory holds only model.tar.gz."""
    (base / "model").mkdir(parents=True)
    (base / "model" / "model.tar.gz").write_bytes(archive.read_bytes())
    return base


def _ping(c: Container) -> tuple[int, dict]:
    r = c.client.get("/ping")
    return r.status_code, r.json()


def _until(condition, timeout: float, what: str, c: Container):
    """The first true value of ``condition()`` (polled), else fail saying ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout} s:\n{c.log()[-4000:]}")


def _ping_when(c: Container, accept, timeout: float, what: str) -> dict:
    """The first /ping body for which ``accept(status, body)`` holds."""
    def check() -> dict | None:
        status, body = _ping(c)
        return body if accept(status, body) else None

    return _until(check, timeout, what, c)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("faults-sagemaker") / "ckpt", "tiny", seed=0)


@pytest.fixture(scope="module")
def archive(checkpoint, tmp_path_factory) -> Path:
    return _model_tar(checkpoint, tmp_path_factory.mktemp("archive") / "model.tar.gz")


@pytest.fixture
def switches(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("switches")


# ---------------------------------------------------------------- one front


@pytest.fixture(scope="module")
def front(archive, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("front")
    faults = tmp / "switches"
    faults.mkdir()
    c = Container(_base_with_archive(archive, tmp / "ml"), tmp,
                  env={"S1_MINI_REQUEST_TIMEOUT": str(TIMEOUT_S), "S1_MINI_TEST_FAULTS": str(faults)})
    c.faults = faults
    c.base = tmp / "ml"
    assert c.pings()[-1] == 200, c.log()
    yield c
    if c.process.poll() is None:
        c.stop()


def test_model_dir_with_only_the_archive_is_extracted_and_served(front):
    model = front.base / "model"
    assert sorted(p.name for p in model.iterdir()) == ["extracted", "model.tar.gz"]
    assert (model / "extracted" / "config.json").is_file() and (model / "extracted" / "code" / "inference.py").is_file()
    assert "extracting" in front.log()
    _wav(front.client.post("/invocations", json={"text": "Served from the extracted archive.", "seed": 1}))


def _idle(front: Container, within: float) -> dict:
    return _ping_when(front, lambda _, b: b["active"] == 0 and b["streams"] == 0 and b["queue_depth"] == 0, within,
                      "the engine did not become idle")


def test_stream_disconnect_frees_the_slot(front):
    _slow(front, 0.3)  # 200 frames now take a minute: only the disconnect can end it early
    try:
        with httpx.Client(base_url=front.url, timeout=30) as other, \
                other.stream("POST", "/invocations", headers=STREAM,
                             json={"text": "A stream the client abandons.", "max_new_tokens": 200, "seed": 3}) as r:
            assert r.status_code == 200
            next(r.iter_raw())
            assert _ping(front)[1]["streams"] == 1
        left = time.monotonic()
        body = _idle(front, within=TIMEOUT_S - 2)  # before the request timeout could have ended it
        assert body["kv_slots_used"] == 0 and time.monotonic() - left < TIMEOUT_S - 2
    finally:
        _slow(front, None)
    _wav(front.client.post("/invocations", json={"text": "After the disconnect.", "seed": 4}))


def test_invocation_past_the_timeout_is_504_and_the_next_works(front):
    _slow(front, 0.3)  # 100 frames at 0.3 s: far past the 6 s timeout
    try:
        start = time.monotonic()
        r = front.client.post("/invocations", json={"text": "Too slow to make it.", "max_new_tokens": 100})
        elapsed = time.monotonic() - start
    finally:
        _slow(front, None)
    assert r.status_code == 504, r.text
    error = r.json()["error"]
    assert error["code"] == "timeout" and "timed out" in error["message"] and "Traceback" not in r.text
    assert TIMEOUT_S - 0.5 < elapsed < TIMEOUT_S + 5
    body = _idle(front, within=5)
    assert body["kv_slots_used"] == 0
    _wav(front.client.post("/invocations", json={"text": "The next one works.", "seed": 5}))


def test_stream_past_its_timeout_is_aborted_not_ended(front):
    """A stream that fails after its headers (here: its request timeout) breaks the
    connection off: with an open-ended WAV header, a clean end would pass for complete audio."""
    _slow(front, 0.3)  # 200 frames take a minute: the 6 s timeout ends it mid-stream
    try:
        with httpx.Client(base_url=front.url, timeout=30) as other, \
                other.stream("POST", "/invocations", headers=STREAM,
                             json={"text": "A stream that runs out of time.", "max_new_tokens": 200, "seed": 10}) as r:
            assert r.status_code == 200
            start = time.monotonic()
            received = b""
            with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
                for chunk in r.iter_raw():
                    received += chunk
        elapsed = time.monotonic() - start
    finally:
        _slow(front, None)
    assert received[:4] == b"RIFF" and elapsed < TIMEOUT_S + 5
    log = front.log()
    assert "stream aborted after" in log and "(timeout); closing the connection" in log, log[-3000:]
    assert _idle(front, within=5)["kv_slots_used"] == 0
    _wav(front.client.post("/invocations", json={"text": "After the aborted stream.", "seed": 11}))


class ActiveWatch:
    """Polls ``active()`` (requests on the engine) in a thread; ``peak`` is the most seen."""

    def __init__(self, active) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(active,))

    def _watch(self, active) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, active())
            except httpx.TransportError:
                pass
            time.sleep(0.05)

    def __enter__(self) -> "ActiveWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def test_client_leaving_an_invocation_cancels_it(front):
    _slow(front, 0.3)  # 200 frames take a minute: only the disconnect can end it early
    try:
        with ActiveWatch(lambda: httpx.get(f"{front.url}/ping", timeout=5).json()["active"]) as watch:
            start = time.monotonic()
            # the read timeout closes the connection: the client is gone
            with httpx.Client(base_url=front.url, timeout=httpx.Timeout(30, read=1.5)) as other, \
                    pytest.raises(httpx.ReadTimeout):
                other.post("/invocations", json={"text": "An invocation the client abandons.", "max_new_tokens": 200,
                                                 "seed": 12})
            body = _idle(front, within=TIMEOUT_S - 2)
        elapsed = time.monotonic() - start
    finally:
        _slow(front, None)
    assert watch.peak == 1  # it was running when the client left
    assert body["kv_slots_used"] == 0 and elapsed < TIMEOUT_S - 1  # cancelled, well before its timeout
    _wav(front.client.post("/invocations", json={"text": "After the abandoned invocation.", "seed": 13}))


def _chunked(total: int, piece: int = 1 << 16):
    """A body of ``total`` spaces with no Content-Length (httpx sends it chunked)."""
    for start in range(0, total, piece):
        yield b" " * min(piece, total - start)


def _assert_body_limit(c: Container) -> None:
    """A chunked body past the default 6 MB payload limit is a 413 naming body and the
    limit; a small chunked body is served."""
    r = c.client.post("/invocations", content=_chunked(PAYLOAD_LIMIT + 1), headers={"content-type": "text/plain"})
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["field"] == "body" and error["code"] == "payload_too_large"
    assert error["message"] == (f"body: must be at most 6 MB ({PAYLOAD_LIMIT} bytes, SAGEMAKER_MAX_PAYLOAD_IN_MB); "
                                "use async inference for larger requests")
    body = json.dumps({"text": "A chunked body.", "seed": 14}).encode()
    _wav(c.client.post("/invocations", content=iter([body[:10], body[10:]]),
                       headers={"content-type": "application/json"}))


def test_chunked_body_over_the_payload_limit_is_413(front):
    _assert_body_limit(front)


def test_sigterm_with_a_stream_and_an_invocation_in_flight_exits_0(front):
    outcome: dict[str, object] = {}
    streaming = threading.Event()

    def stream() -> None:
        with httpx.Client(base_url=front.url, timeout=60) as c, \
                c.stream("POST", "/invocations", headers=STREAM,
                         json={"text": "Streamed through a shutdown.", "max_new_tokens": 40, "seed": 6}) as r:
            body = b""
            for chunk in r.iter_raw():
                body += chunk
                streaming.set()
            outcome["stream"] = (r.status_code, body)

    def whole() -> None:
        with httpx.Client(base_url=front.url, timeout=60) as c:
            outcome["whole"] = c.post("/invocations", json={"text": "A whole answer through a shutdown.",
                                                            "max_new_tokens": 40, "seed": 7})

    _slow(front, 0.05)  # 40 frames: 2 s, so both are still running at SIGTERM
    threads = [threading.Thread(target=stream), threading.Thread(target=whole)]
    for t in threads:
        t.start()
    assert streaming.wait(30), front.log()
    start = time.monotonic()
    code = front.stop()  # SIGTERM, then waits
    assert code == 0 and time.monotonic() - start < 30, front.log()[-3000:]
    for t in threads:
        t.join(30)
    status, body = outcome["stream"]
    assert status == 200 and body[:4] == b"RIFF" and len(body) > 44 and (len(body) - 44) % 128 == 0
    _wav(outcome["whole"])  # in flight at SIGTERM: finished within the drain


# ---------------------------------------------------------------- models that cannot load


def _serve(base: Path, log_dir: Path, **env: str) -> tuple[int, str, float]:
    """Run serve to its end: (exit status, output, seconds)."""
    c = Container(base, log_dir, env={"S1_MINI_LOAD_FAILURE_GRACE_S": "0.5", **env})
    start = time.monotonic()
    try:
        code = c.process.wait(120)
    except subprocess.TimeoutExpired:
        c.process.kill()
        raise AssertionError(f"serve did not exit:\n{c.log()[-3000:]}") from None
    elapsed = time.monotonic() - start
    c.stop()
    return code, c.log(), elapsed


def _last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name, damage", [
    ("model.pth", _truncate),
    ("codec.pth", lambda path: path.write_bytes(b"garbage, not a torch file" * 100)),
    ("config.json", lambda path: path.write_text('{"dim": 64, "n_layer": ')),
], ids=["truncated-model", "garbage-codec", "broken-config"])
def test_corrupt_checkpoint_exits_3_with_one_line_naming_the_file(checkpoint, tmp_path, name, damage):
    model = tmp_path / "ml" / "model"
    model.mkdir(parents=True)
    for item in checkpoint.iterdir():
        (model / item.name).write_bytes(item.read_bytes())
    damage(model / name)
    code, output, _ = _serve(tmp_path / "ml", tmp_path)
    assert code == 3, output[-3000:]
    last = _last_line(output)
    assert last.startswith("error: loading the model failed: CheckpointError: ") and str(model / name) in last, last
    assert "Traceback" not in output


def test_truncated_model_archive_exits_3_naming_it(archive, tmp_path):
    base = _base_with_archive(archive, tmp_path / "ml")
    _truncate(base / "model" / "model.tar.gz")
    code, output, _ = _serve(base, tmp_path)
    last = _last_line(output)
    assert code == 3 and "model.tar.gz: corrupt or truncated archive" in last, output[-3000:]
    assert sorted(p.name for p in (base / "model").iterdir()) == ["model.tar.gz"]  # nothing half-extracted


def test_malicious_model_archive_exits_3_naming_member_and_rule(checkpoint, tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(checkpoint / "config.json", arcname="config.json")
        link = tarfile.TarInfo("model.pth")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
        tar.addfile(link)
    base = _base_with_archive(archive, tmp_path / "ml")
    code, output, _ = _serve(base, tmp_path)
    last = _last_line(output)
    assert code == 3 and "member 'model.pth': refused: symbolic links are not allowed" in last, output[-3000:]
    assert sorted(p.name for p in (base / "model").iterdir()) == ["model.tar.gz"]


def test_router_with_a_corrupt_checkpoint_exits_instead_of_restarting_forever(checkpoint, tmp_path):
    model = tmp_path / "ml" / "model"
    model.mkdir(parents=True)
    for item in checkpoint.iterdir():
        (model / item.name).write_bytes(item.read_bytes())
    _truncate(model / "model.pth")
    code, output, elapsed = _serve(tmp_path / "ml", tmp_path, S1_MINI_ENGINES="2")
    assert code == 3, output[-3000:]
    assert "cannot load the model" in _last_line(output) and "restarting it" not in output
    assert elapsed < 60


# ---------------------------------------------------------------- two engines behind the router


@pytest.fixture(scope="module")
def router(archive, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("router")
    faults = tmp / "switches"
    faults.mkdir()
    c = Container(_base_with_archive(archive, tmp / "ml"), tmp,
                  env={"S1_MINI_ENGINES": "2", "S1_MINI_TEST_FAULTS": str(faults)})
    c.faults = faults
    _until(lambda: _ping(c)[0] == 200, 120, "the router was not ready", c)
    yield c
    if c.process.poll() is None:
        assert c.stop() == 0, c.log()[-3000:]


def _load(c: Container, stop: threading.Event, statuses: list[httpx.Response]) -> None:
    with httpx.Client(base_url=c.url, timeout=60) as client:
        i = 0
        while not stop.is_set():
            statuses.append(client.post("/invocations", json={"text": f"Under fault {i}.", "seed": i}))
            i += 1


def test_killed_engine_requests_keep_being_answered(router):
    engines = _ping(router)[1]["engines"]
    stop, responses = threading.Event(), []
    clients = [threading.Thread(target=_load, args=(router, stop, responses)) for _ in range(3)]
    for t in clients:
        t.start()
    try:
        _until(lambda: len(responses) >= 3, 30, "no load", router)
        os.kill(engines[0]["pid"], signal.SIGKILL)
        _until(lambda: _ping(router)[0] == 503, 10, "/ping never said 503 while the engine restarted", router)
        body = _ping_when(router, lambda status, _: status == 200, 120, "the engine was not restarted")
        after = len(responses)
        _until(lambda: len(responses) >= after + 3, 30, "no answers after the restart", router)
    finally:
        stop.set()
        for t in clients:
            t.join(60)
    assert body["engines"][0]["restarts"] == engines[0]["restarts"] + 1
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses  # 503 only while no engine could take the request
    assert all(r.headers.get("retry-after") for r in responses if r.status_code == 503)
    assert statuses.count(200) >= len(statuses) - 2, statuses
    for r in responses:
        if r.status_code == 200:
            _wav(r)


def test_dead_engine_thread_is_seen_and_its_engine_restarted(router):
    before = {e["index"]: e for e in _ping(router)[1]["engines"]}
    (router.faults / "kill-engine-thread").touch()
    answer: dict[str, httpx.Response] = {}
    caller = threading.Thread(target=lambda: answer.update(r=router.client.post(
        "/invocations", json={"text": "The request whose engine dies.", "seed": 8})))
    caller.start()
    killed = _until(lambda: list(router.faults.glob("killed-*")), 30, "the fault never fired", router)
    pid = int(killed[0].name.split("-")[1])
    victim = next(e for e in before.values() if e["pid"] == pid)
    # the engine's own front sees its dead thread: /ping 503 "unhealthy"
    def own_ping() -> httpx.Response | None:
        r = httpx.get(f"http://127.0.0.1:{victim['port']}/ping", timeout=5)
        return r if r.status_code == 503 else None

    assert _until(own_ping, 10, "the engine's /ping stayed 200", router).json()["status"] == "unhealthy"
    body = _ping_when(router, lambda status, b: status == 200 and b["engines"][victim["index"]]["pid"] != pid, 120,
                      "the engine with the dead thread was not restarted")
    assert body["engines"][victim["index"]]["restarts"] == victim["restarts"] + 1
    caller.join(60)
    _wav(answer["r"])  # the request on the dead engine was answered by the other one
    _wav(router.client.post("/invocations", json={"text": "Both engines again.", "seed": 9}))


def _engine_active(router: Container) -> int:
    """Requests running on the router's engines, from each engine's own /ping."""
    engines = _ping(router)[1]["engines"]
    return sum(httpx.get(f"http://127.0.0.1:{e['port']}/ping", timeout=5).json().get("active", 0) for e in engines)


def test_router_refuses_an_oversized_body_before_reading_it(router):
    pid = router.process.pid  # serve is the router; the engines are its children
    peak_rss_reset(pid)
    before = rss_kb(pid, "VmRSS")
    status, sent = post_declared(router.port, "/invocations", 256 << 20, {"Content-Type": "application/json"})
    assert status in (413, None) and sent < 64 << 20
    assert rss_kb(pid, "VmHWM") - before < 32 << 10
    _assert_body_limit(router)


def test_router_client_leaving_an_invocation_cancels_it(router):
    _slow(router, 0.3)  # both engines: 200 frames take a minute
    try:
        with ActiveWatch(lambda: _engine_active(router)) as watch:
            start = time.monotonic()
            with httpx.Client(base_url=router.url, timeout=httpx.Timeout(30, read=1.5)) as other, \
                    pytest.raises(httpx.ReadTimeout):
                other.post("/invocations", json={"text": "An invocation the client abandons.", "max_new_tokens": 200,
                                                 "seed": 15})
            _until(lambda: _engine_active(router) == 0 and all(e["in_flight"] == 0 for e in _ping(router)[1]["engines"]),
                   5, "the engine request was not cancelled", router)
        elapsed = time.monotonic() - start
    finally:
        _slow(router, None)
    assert watch.peak == 1 and elapsed < 10  # it ran, and ended long before its minute of work
    _wav(router.client.post("/invocations", json={"text": "After the abandoned invocation.", "seed": 16}))


def test_router_breaks_off_a_stream_whose_engine_dies(router):
    _slow(router, 0.1)  # 200 frames: 20 s
    try:
        with httpx.Client(base_url=router.url, timeout=30) as other, \
                other.stream("POST", "/invocations", headers=STREAM,
                             json={"text": "A stream whose engine dies.", "max_new_tokens": 200, "seed": 17}) as r:
            assert r.status_code == 200
            chunks = r.iter_raw()
            next(chunks)
            serving = next(e for e in _ping(router)[1]["engines"] if e["in_flight"] == 1)
            os.kill(serving["pid"], signal.SIGKILL)
            with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
                for _ in chunks:
                    pass
    finally:
        _slow(router, None)
    assert f"engine {serving['index']}: its answer broke off" in router.log()
    _ping_when(router, lambda status, _: status == 200, 120, "the killed engine was not restarted")
    _wav(router.client.post("/invocations", json={"text": "After the broken stream.", "seed": 18}))
