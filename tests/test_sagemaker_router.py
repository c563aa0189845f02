"""Several engines behind one endpoint (the multi-GPU layout), run on the CPU: two
engine processes behind the router, least-loaded routing, a killed engine restarted
while the other keeps serving and /ping says unhealthy, clean SIGTERM."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from test_sagemaker_front import Container, _wav, extract, model_tar  # noqa: F401 (fixture)


def _ping(c: Container) -> tuple[int, dict]:
    r = c.client.get("/ping")
    return r.status_code, r.json()


def _wait(c: Container, want: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert c.process.poll() is None, c.log()
        try:
            status, body = _ping(c)
            if status == want:
                return body
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"/ping never answered {want}:\n{c.log()}")


@pytest.fixture(scope="module")
def two_engines(model_tar, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("router")
    c = Container(extract(model_tar, tmp / "ml"), tmp, env={"S1_MINI_ENGINES": "2"})
    _wait(c, 200)
    yield c
    if c.process.poll() is None:
        c.stop()


def test_ping_needs_every_engine_and_requests_spread(two_engines):
    status, body = _ping(two_engines)
    assert status == 200 and len(body["engines"]) == 2 and all(e["healthy"] for e in body["engines"])
    results = [None] * 8

    def call(i):
        results[i] = two_engines.client.post("/invocations", json={"text": f"Routed request {i}.", "seed": i})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        _wav(r)
    served = [e["served"] for e in _ping(two_engines)[1]["engines"]]
    assert all(n > 0 for n in served), served  # both engines took requests


def test_streaming_passes_through_the_router(two_engines):
    headers = {"X-Amzn-SageMaker-Forwarded-Api": "InvokeEndpointWithResponseStream"}
    with two_engines.client.stream("POST", "/invocations", json={"text": "Streamed via the router.", "seed": 2},
                                   headers=headers) as r:
        assert r.status_code == 200
        body = b"".join(r.iter_bytes())
    assert body[:4] == b"RIFF"
    bad = two_engines.client.post("/invocations", json={"text": "hi", "top_p": 9})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "top_p"


def test_a_killed_engine_is_restarted_while_the_other_serves(two_engines):
    engines = _ping(two_engines)[1]["engines"]
    victim = engines[0]
    os.kill(victim["pid"], signal.SIGKILL)
    body = _wait(two_engines, 503, timeout=30)  # unhealthy while it restarts
    assert not all(e["healthy"] for e in body["engines"])
    _wav(two_engines.client.post("/invocations", json={"text": "Served by the survivor.", "seed": 1}))
    body = _wait(two_engines, 200)
    restarted = body["engines"][0]
    assert restarted["restarts"] == 1 and restarted["pid"] != victim["pid"]
    _wav(two_engines.client.post("/invocations", json={"text": "Both again.", "seed": 3}))


def test_sigterm_stops_router_and_engines(two_engines):
    pids = [e["pid"] for e in _ping(two_engines)[1]["engines"]]
    assert two_engines.stop() == 0, two_engines.log()
    for pid in pids:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"engine process {pid} outlived the router")
