"""The FastAPI application: ``create_app(config, options)``. One engine per app,
created in the lifespan and loaded in a worker thread, so that ``/health`` answers
(and ``/ready`` says 503) while the models load."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from s1_mini.config import EngineConfig
from s1_mini.server import api_tts, api_voices, errors
from s1_mini.server.metrics import Metrics
from s1_mini.server.middleware import GuardMiddleware, MetricsMiddleware
from s1_mini.server.options import ServerOptions
from s1_mini.server.schemas import AddReferenceRequest, DeleteReferenceRequest, SpeechRequest, TTSRequest
from s1_mini.server.synthesis import Synthesizer

log = logging.getLogger("s1_mini.server")
BODY_MODELS = (TTSRequest, SpeechRequest, AddReferenceRequest, DeleteReferenceRequest, api_voices.VoiceCreate)


def _default_engine(config: EngineConfig) -> Any:
    from s1_mini.engine import ProductionTTSEngine

    return ProductionTTSEngine(config)


def create_app(config: EngineConfig, options: ServerOptions | None = None,
               engine_factory: Callable[[EngineConfig], Any] = _default_engine,
               on_load_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    options = options or ServerOptions()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = engine_factory(config)
        metrics = Metrics()
        app.state.engine = engine
        app.state.metrics = metrics
        app.state.synth = Synthesizer(engine, metrics, options.max_concurrent_streams, options.retry_after_s)
        app.state.load_error = None
        app.state.started = time.time()

        async def load() -> None:
            try:
                await asyncio.to_thread(engine.start)
                log.info("models loaded and warmed up: ready")
            except BaseException as exc:  # noqa: BLE001 -- reported by /health and the callback
                log.error("loading the models failed: %s", exc, exc_info=exc)
                app.state.load_error = f"{type(exc).__name__}: {exc}"
                if on_load_failure is not None:
                    on_load_failure(exc)

        loader = asyncio.create_task(load())
        try:
            yield
        finally:
            await asyncio.shield(loader)
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="S1-mini TTS", version="0.1.0", lifespan=lifespan,
                  description="Production inference server for Fish-Speech OpenAudio S1-mini. Errors are "
                              "`{\"error\": {\"code\", \"field\", \"message\"}}`.")
    app.state.options = options
    errors.install(app)
    app.include_router(api_tts.router)
    app.include_router(api_voices.router)
    _system_routes(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(GuardMiddleware, api_key=options.api_key, max_body_mb=options.max_body_mb)
    app.add_middleware(MetricsMiddleware, metrics_of=lambda: getattr(app.state, "metrics", None))
    return app


def _system_routes(app: FastAPI) -> None:
    @app.get("/health", tags=["system"], summary="Liveness and engine health")
    async def health(request: Request) -> JSONResponse:
        state = request.app.state
        engine = state.engine
        if state.load_error:
            return JSONResponse({"status": "failed", "error": state.load_error}, status_code=503)
        try:
            report = engine.health_check()
        except Exception as exc:  # noqa: BLE001 -- health must answer, whatever the engine does
            log.warning("health_check failed: %s", exc)
            report = {"healthy": False}
        if not engine.ready:
            status = "loading"
        else:
            status = "ok" if report.get("healthy") else "unhealthy"
        body = {"status": status, **report, "open_streams": state.synth.open_streams,
                "uptime_s": round(time.time() - state.started, 3)}
        return JSONResponse(body, status_code=503 if status == "unhealthy" else 200)

    @app.get("/ready", tags=["system"], summary="200 once the models are loaded and warmed up, else 503")
    async def ready(request: Request) -> JSONResponse:
        state = request.app.state
        if state.engine.ready:
            return JSONResponse({"status": "ready"})
        status = "failed" if state.load_error else "loading"
        return JSONResponse({"status": status, **({"error": state.load_error} if state.load_error else {})},
                            status_code=503, headers={"Retry-After": str(max(state.options.retry_after_s, 1))})

    @app.get("/metrics", tags=["system"], summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {}}}})
    async def metrics(request: Request) -> Response:
        state = request.app.state
        engine = state.engine
        health = None
        try:
            health = engine.health_check()
        except Exception:  # noqa: BLE001
            pass
        slots = getattr(getattr(engine, "_runner", None), "max_batch_size", None) or engine.config.max_batch_size
        state.metrics.refresh(health, bool(engine.ready), state.synth.open_streams, int(slots))
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/health", tags=["system"], summary="fish-speech health (GET)")
    async def fish_health_get() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/health", tags=["system"], summary="fish-speech health (POST)")
    async def fish_health_post() -> dict[str, str]:
        return {"status": "ok"}


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in BODY_MODELS:
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
    if app.state.options.api_key:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
    app.openapi_schema = schema
    return schema
