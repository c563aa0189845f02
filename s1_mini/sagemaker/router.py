"""Several engines behind one endpoint: one engine process per GPU, requests routed to
the least loaded.

On an instance with several GPUs (ml.g5.12xlarge: 4, ml.g5.48xlarge: 8) ``serve``
starts one serving front per GPU as a child process (``CUDA_VISIBLE_DEVICES=i``, a
private port on 127.0.0.1) and this router in front of them. Processes, not threads:
each engine has its own CUDA context and its own Python interpreter (no shared GIL),
and a crash (a fatal CUDA error, an OOM kill) takes down one engine only. The router
restarts a dead engine, and one whose engine thread died (its ``/ping`` says
"unhealthy" for ``UNHEALTHY_RESTART_CHECKS`` checks in a row); ``/ping`` answers 503
until every engine is healthy again, while the healthy ones keep serving. An invocation
whose engine fails before answering (refused connection, the process gone, a 503
``engine_stopped`` from an engine whose engine thread died) is sent to another engine:
synthesis has no side effects, so it is safe to repeat. An engine whose model cannot
load at start (exit status 3) is not restarted: the router stops and ``serve`` exits
non-zero. A body past ``SAGEMAKER_MAX_PAYLOAD_IN_MB`` is refused before it is read; a
client that leaves before its answer starts closes the connection to the engine, which
cancels the request; an answer that breaks off upstream (the engine aborted it, or died)
is broken off to the client too, never ended as if complete.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from s1_mini.sagemaker.front import EXIT_MODEL_FAILED, PAYLOAD_HINT, Settings
from s1_mini.server.errors import APIError, error_response
from s1_mini.server.middleware import BodyLimit
from s1_mini.server.synthesis import ManagedStream, StreamAborted, unless_disconnected

log = logging.getLogger("s1_mini.sagemaker.router")

# Headers SageMaker forwards to the container, passed on to the engine unchanged.
FORWARDED = ("content-type", "accept", "x-amzn-sagemaker-custom-attributes", "x-amzn-sagemaker-forwarded-api",
             "x-amzn-sagemaker-inference-id", "x-amzn-sagemaker-session-id")
CHECK_INTERVAL_S = 1.0
STOP_TIMEOUT_S = 25.0
# An engine whose own /ping says "unhealthy" (loaded, but its engine thread is gone) this
# many checks in a row is killed and restarted: it would never serve again.
UNHEALTHY_RESTART_CHECKS = 3


def engine_count() -> int:
    """``S1_MINI_ENGINES`` if set, else one per visible GPU (at least one)."""
    if os.environ.get("S1_MINI_ENGINES"):
        return max(1, int(os.environ["S1_MINI_ENGINES"]))
    import torch

    return max(1, torch.cuda.device_count())


@dataclass
class EngineProcess:
    index: int
    port: int
    gpu: int | None  # None: no GPU pinning (CPU)
    process: subprocess.Popen | None = None
    in_flight: int = 0
    healthy: bool = False
    restarts: int = 0
    served: int = 0
    ever_healthy: bool = False
    unhealthy_checks: int = 0  # consecutive /ping answers "unhealthy"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "S1_MINI_ENGINES": "1"}
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpu)
        self.process = subprocess.Popen([sys.executable, "-m", "s1_mini.sagemaker.serve", "serve", "--host",
                                         "127.0.0.1", "--port", str(self.port)], env=env)
        self.healthy = False
        self.unhealthy_checks = 0
        log.info("engine %d started (pid %d, port %d, gpu %s)", self.index, self.process.pid, self.port, self.gpu)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def status(self) -> dict[str, Any]:
        return {"index": self.index, "pid": self.process.pid if self.process else None, "port": self.port,
                "gpu": self.gpu, "healthy": self.healthy, "in_flight": self.in_flight, "served": self.served,
                "restarts": self.restarts}


class Router:
    def __init__(self, count: int, ports: list[int], gpus: bool,
                 on_model_failure: Callable[[str], None] | None = None) -> None:
        self.engines = [EngineProcess(i, port, i if gpus else None) for i, port in enumerate(ports[:count])]
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))
        self.on_model_failure = on_model_failure

    def start(self) -> None:
        for engine in self.engines:
            engine.start()

    async def watch(self) -> None:
        """Restart dead engines; keep each one's health from its own /ping."""
        while True:
            for engine in self.engines:
                if not engine.alive:
                    code = engine.process.returncode if engine.process else None
                    if code == EXIT_MODEL_FAILED and not engine.ever_healthy and self.on_model_failure is not None:
                        # The model never loaded: every restart would fail the same way.
                        self.on_model_failure(f"engine {engine.index} cannot load the model (exit status {code}; "
                                              "its log says why)")
                        return
                    log.warning("engine %d exited with %s: restarting it", engine.index, code)
                    engine.restarts += 1
                    engine.start()
                    continue
                await self._check(engine)
            await asyncio.sleep(CHECK_INTERVAL_S)

    async def _check(self, engine: EngineProcess) -> None:
        try:
            answer = await self.client.get(f"{engine.url}/ping", timeout=2.0)
        except httpx.HTTPError:
            engine.healthy = False
            return
        engine.healthy = answer.status_code == 200
        engine.ever_healthy |= engine.healthy
        dead_engine = answer.status_code == 503 and _status(answer) == "unhealthy"
        engine.unhealthy_checks = engine.unhealthy_checks + 1 if dead_engine else 0
        if engine.unhealthy_checks >= UNHEALTHY_RESTART_CHECKS:
            log.warning("engine %d: its engine thread is gone (/ping unhealthy %d times): killing it for a restart",
                        engine.index, engine.unhealthy_checks)
            engine.process.kill()  # its in-flight requests are stuck anyway; a drain would only wait
            await asyncio.to_thread(engine.process.wait)

    def pick(self, exclude: tuple[EngineProcess, ...] = ()) -> EngineProcess:
        ready = [e for e in self.engines if e.healthy and e.alive and e not in exclude]
        if not ready:
            raise APIError(503, "engine_stopped", "no engine is ready (loading or restarting)", None,
                           {"Retry-After": "5"})
        return min(ready, key=lambda e: (e.in_flight, e.served))

    async def stop(self) -> None:
        for engine in self.engines:
            if engine.alive:
                engine.process.send_signal(signal.SIGTERM)
        for engine in self.engines:
            if engine.process is not None:
                try:
                    await asyncio.to_thread(engine.process.wait, STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    engine.process.kill()
        await self.client.aclose()


def _status(answer: httpx.Response) -> str | None:
    try:
        return answer.json().get("status")
    except ValueError:
        return None


async def _stopped_before_answering(upstream: httpx.Response) -> bool:
    """Whether the engine answered 503 ``engine_stopped``: its engine thread died (or it is
    stopping) before the request could run. Nothing was produced, so the request may go to
    another engine, as one whose process is gone does."""
    if upstream.status_code != 503:
        return False
    await upstream.aread()  # a short JSON error
    try:
        return upstream.json()["error"]["code"] == "engine_stopped"
    except (ValueError, KeyError, TypeError):
        return False


def create_router_app(count: int, ports: list[int], gpus: bool,
                      on_model_failure: Callable[[str], None] | None = None) -> FastAPI:
    """The router's app; ``on_model_failure(message)`` runs when an engine's model cannot
    load at start (``serve`` stops the server and exits non-zero)."""
    router = Router(count, ports, gpus, on_model_failure)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        router.start()
        watcher = asyncio.create_task(router.watch())
        yield
        watcher.cancel()
        await router.stop()

    app = FastAPI(title="s1-mini SageMaker router", lifespan=lifespan)
    app.state.router = router
    # The engines check the same limit, but the router would have read the whole body to forward it.
    app.add_middleware(BodyLimit, max_mb=Settings().max_payload_mb, setting="SAGEMAKER_MAX_PAYLOAD_IN_MB",
                       hint=PAYLOAD_HINT)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.get("/ping")
    async def ping() -> Response:
        engines = [e.status() for e in router.engines]
        healthy = all(e["healthy"] for e in engines)
        return JSONResponse({"status": "healthy" if healthy else "unhealthy", "engines": engines},
                            status_code=200 if healthy else 503)

    @app.get("/execution-parameters")
    async def execution_parameters() -> Response:
        engine = router.pick()
        upstream = await router.client.get(f"{engine.url}/execution-parameters")
        params = upstream.json()
        params["MaxConcurrentTransforms"] = params.get("MaxConcurrentTransforms", 1) * len(router.engines)
        return JSONResponse(params, status_code=upstream.status_code)

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED}
        body = await request.body()
        tried: tuple[EngineProcess, ...] = ()
        while True:
            engine = router.pick(tried)  # 503 once no other engine is ready
            engine.in_flight += 1
            try:
                upstream_request = router.client.build_request("POST", f"{engine.url}/invocations", content=body,
                                                               headers=headers)
                # A whole-file answer comes when it is done: a client that leaves meanwhile closes
                # the connection to the engine, whose front then cancels the request.
                upstream = await unless_disconnected(request, router.client.send(upstream_request, stream=True))
                if not await _stopped_before_answering(upstream):
                    break
                engine.in_flight -= 1
                engine.healthy = False
                tried += (engine,)
                log.warning("engine %d stopped before answering: trying another", engine.index)
            except httpx.HTTPError as exc:
                engine.in_flight -= 1
                engine.healthy = False
                tried += (engine,)
                log.warning("engine %d did not answer (%s): trying another", engine.index, type(exc).__name__)
            except BaseException:  # the client left, or a shutdown cancelled the wait: not in flight any more
                engine.in_flight -= 1
                raise
        engine.served += 1
        closed = False

        async def close() -> None:  # runs once, also when the client leaves before the body starts
            nonlocal closed
            if not closed:
                closed = True
                engine.in_flight -= 1
                await upstream.aclose()

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_bytes():  # also a body _stopped_before_answering read
                    yield chunk
            except httpx.HTTPError as exc:  # the engine aborted its answer, or died mid-answer
                log.warning("engine %d: its answer broke off (%s: %s); aborting the client's", engine.index,
                            type(exc).__name__, exc)
                raise StreamAborted(f"engine {engine.index}: {type(exc).__name__}") from None

        passed = {k: v for k, v in upstream.headers.items()
                  if k.lower() in ("content-type", "retry-after", "content-disposition") or k.lower().startswith("x-")}
        return ManagedStream(relay(), status_code=upstream.status_code, headers=passed, on_close=close)

    return app
