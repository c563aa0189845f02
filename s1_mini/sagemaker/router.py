"""Several engines behind one endpoint: one engine process per GPU, requests routed to
the least loaded.

On an instance with several GPUs (ml.g5.12xlarge: 4, ml.g5.48xlarge: 8) ``serve``
starts one serving front per GPU as a child process (``CUDA_VISIBLE_DEVICES=i``, a
private port on 127.0.0.1) and this router in front of them. Processes, not threads:
each engine has its own CUDA context and its own Python interpreter (no shared GIL),
and a crash (a fatal CUDA error, an OOM kill) takes down one engine only. The router
restarts a dead engine; ``/ping`` answers 503 until every engine is healthy again,
while the healthy ones keep serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from s1_mini.server.errors import APIError, error_response
from s1_mini.server.synthesis import ManagedStream

log = logging.getLogger("s1_mini.sagemaker.router")

# Headers SageMaker forwards to the container, passed on to the engine unchanged.
FORWARDED = ("content-type", "accept", "x-amzn-sagemaker-custom-attributes", "x-amzn-sagemaker-forwarded-api",
             "x-amzn-sagemaker-inference-id", "x-amzn-sagemaker-session-id")
CHECK_INTERVAL_S = 1.0
STOP_TIMEOUT_S = 25.0


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
        log.info("engine %d started (pid %d, port %d, gpu %s)", self.index, self.process.pid, self.port, self.gpu)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def status(self) -> dict[str, Any]:
        return {"index": self.index, "pid": self.process.pid if self.process else None, "port": self.port,
                "gpu": self.gpu, "healthy": self.healthy, "in_flight": self.in_flight, "served": self.served,
                "restarts": self.restarts}


class Router:
    def __init__(self, count: int, ports: list[int], gpus: bool) -> None:
        self.engines = [EngineProcess(i, port, i if gpus else None) for i, port in enumerate(ports[:count])]
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))

    def start(self) -> None:
        for engine in self.engines:
            engine.start()

    async def watch(self) -> None:
        """Restart dead engines; keep each one's health from its own /ping."""
        while True:
            for engine in self.engines:
                if not engine.alive:
                    log.warning("engine %d exited with %s: restarting it", engine.index,
                                engine.process.returncode if engine.process else None)
                    engine.restarts += 1
                    engine.start()
                    continue
                try:
                    engine.healthy = (await self.client.get(f"{engine.url}/ping", timeout=2.0)).status_code == 200
                except httpx.HTTPError:
                    engine.healthy = False
            await asyncio.sleep(CHECK_INTERVAL_S)

    def pick(self) -> EngineProcess:
        ready = [e for e in self.engines if e.healthy and e.alive]
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


def create_router_app(count: int, ports: list[int], gpus: bool) -> FastAPI:
    router = Router(count, ports, gpus)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        router.start()
        watcher = asyncio.create_task(router.watch())
        yield
        watcher.cancel()
        await router.stop()

    app = FastAPI(title="s1-mini SageMaker router", lifespan=lifespan)
    app.state.router = router

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
        engine = router.pick()
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED}
        engine.in_flight += 1
        try:
            upstream_request = router.client.build_request("POST", f"{engine.url}/invocations",
                                                           content=await request.body(), headers=headers)
            upstream = await router.client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            engine.in_flight -= 1
            engine.healthy = False
            raise APIError(503, "engine_stopped", f"engine {engine.index} did not answer ({type(exc).__name__}); "
                           "retry", None, {"Retry-After": "1"}) from None
        engine.served += 1
        closed = False

        async def close() -> None:  # runs once, also when the client leaves before the body starts
            nonlocal closed
            if not closed:
                closed = True
                engine.in_flight -= 1
                await upstream.aclose()

        passed = {k: v for k, v in upstream.headers.items()
                  if k.lower() in ("content-type", "retry-after", "content-disposition") or k.lower().startswith("x-")}
        return ManagedStream(upstream.aiter_raw(), status_code=upstream.status_code, headers=passed, on_close=close)

    return app
