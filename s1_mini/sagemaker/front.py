"""Our SageMaker serving front: ``/ping``, ``/invocations``, ``/execution-parameters``.

One process, one engine, so concurrent invocations share the engine's continuous batch
(multi-model-server would give each worker its own model and one request at a time).
The handlers come from ``$SAGEMAKER_BASE_DIR/model/code/$SAGEMAKER_PROGRAM`` when the
model archive carries one (``code/inference.py``), else from
:mod:`s1_mini.sagemaker.handlers`. The model loads in the background after the port is
open: ``/ping`` answers 503 until ``model_fn`` (with its warm-up) is done and the engine
is healthy.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import sys
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from s1_mini.sagemaker import handlers as default_handlers
from s1_mini.server.audio_formats import KNOWN
from s1_mini.server.errors import APIError, error_response
from s1_mini.server.metrics import Metrics
from s1_mini.server.synthesis import Synthesizer

log = logging.getLogger("s1_mini.sagemaker")

FORWARDED_API = "x-amzn-sagemaker-forwarded-api"
CUSTOM_ATTRIBUTES = "x-amzn-sagemaker-custom-attributes"
STREAM_API = "InvokeEndpointWithResponseStream"
REALTIME_API = "InvokeEndpoint"


@dataclass
class Settings:
    """The toolkit's environment, with its defaults."""

    base_dir: Path = field(default_factory=lambda: Path(os.environ.get("SAGEMAKER_BASE_DIR", "/opt/ml")))
    program: str = field(default_factory=lambda: os.environ.get("SAGEMAKER_PROGRAM", "inference.py"))
    max_payload_mb: float = field(default_factory=lambda: float(os.environ.get("SAGEMAKER_MAX_PAYLOAD_IN_MB", "6")))
    batch: bool = field(default_factory=lambda: os.environ.get("SAGEMAKER_BATCH", "").lower() == "true")
    max_concurrent_transforms: int = field(
        default_factory=lambda: int(os.environ.get("SAGEMAKER_MAX_CONCURRENT_TRANSFORMS", "1")))
    # Empty: a request without Accept gets the container its "format" field names.
    default_accept: str = field(default_factory=lambda: os.environ.get("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT", ""))
    max_streams: int = field(default_factory=lambda: int(os.environ.get("S1_MINI_MAX_CONCURRENT_STREAMS", "64")))
    # A real-time InvokeEndpoint must answer within 60 s with at most 6 MB (about 70 s of
    # 16-bit WAV, some 1000 characters of speech): longer text goes to streaming or async.
    realtime_max_text_chars: int = field(
        default_factory=lambda: int(os.environ.get("S1_MINI_REALTIME_MAX_TEXT_CHARS", "1000")))

    @property
    def model_dir(self) -> Path:
        return self.base_dir / "model"


def load_handlers(settings: Settings) -> ModuleType:
    """The user module from the model archive's ``code/`` folder, or ours."""
    script = settings.model_dir / "code" / settings.program
    if not script.is_file():
        return default_handlers
    sys.path.insert(0, str(script.parent))  # so the script can import its neighbours
    spec = importlib.util.spec_from_file_location("sagemaker_user_module", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = [name for name in ("model_fn",) if not hasattr(module, name)]
    if missing:
        raise RuntimeError(f"{script}: must define {', '.join(missing)}")
    return module


class Front:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.handlers = load_handlers(settings)
        self.engine: Any = None
        self.load_error: str | None = None
        self.metrics = Metrics()
        self.synth: Synthesizer | None = None

    def handler(self, name: str) -> Any:
        return getattr(self.handlers, name, getattr(default_handlers, name))

    def load(self) -> None:
        """model_fn in a background thread: the port answers /ping (503) meanwhile."""
        try:
            self.engine = self.handler("model_fn")(str(self.settings.model_dir))
            self.synth = Synthesizer(self.engine, self.metrics, self.settings.max_streams, retry_after=1)
            log.info("model loaded and warmed up")
        except Exception as exc:  # noqa: BLE001 -- reported by /ping and the log
            log.exception("model_fn failed")
            self.load_error = f"{type(exc).__name__}: {exc}"

    @property
    def healthy(self) -> bool:
        return self.engine is not None and bool(self.engine.health_check().get("healthy"))

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    front = Front(settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=front.load, name="model-loader", daemon=True).start()
        yield
        await asyncio.to_thread(front.stop)  # after uvicorn drained in-flight requests (SIGTERM)

    app = FastAPI(title="s1-mini SageMaker serving", lifespan=lifespan)
    app.state.front = front

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("invocation failed")
        return error_response(APIError(500, "internal_error", "internal error; see the endpoint's logs"))

    @app.get("/ping")
    async def ping() -> Response:
        if front.healthy:
            return JSONResponse({"status": "healthy", **front.engine.health_check()})
        status = "failed" if front.load_error else "loading" if front.engine is None else "unhealthy"
        return JSONResponse({"status": status, "error": front.load_error}, status_code=503)

    @app.get("/execution-parameters")
    async def execution_parameters() -> dict[str, Any]:
        # One process batches concurrent records itself, so MultiRecord bodies and a few
        # concurrent transforms keep the GPU busy.
        return {"MaxConcurrentTransforms": max(front.settings.max_concurrent_transforms, 4),
                "BatchStrategy": "MULTI_RECORD", "MaxPayloadInMB": int(min(front.settings.max_payload_mb, 6))}

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        if front.engine is None:
            raise APIError(503, "engine_stopped", "the model is still loading", None, {"Retry-After": "5"})
        raw = await request.body()
        if len(raw) > front.settings.max_payload_mb * 1024 * 1024:
            raise APIError(413, "payload_too_large",
                           f"body: {len(raw)} bytes exceeds {front.settings.max_payload_mb} MB; use async inference",
                           "body")
        content_type = request.headers.get("content-type", "application/json")
        data = await asyncio.to_thread(front.handler("input_fn"), raw, content_type)
        if _wants_stream(request, data):
            return await front.synth.stream(request, data.job, _stream_format(data), {})
        if request.headers.get(FORWARDED_API) == REALTIME_API:
            _check_realtime(data, front.settings.realtime_max_text_chars)
        accept = request.headers.get("accept", "")
        if accept in ("", "*/*"):
            accept = "application/jsonlines" if isinstance(data, default_handlers.Records) else front.settings.default_accept
        prediction = await asyncio.to_thread(front.handler("predict_fn"), data, front.engine)
        result = await asyncio.to_thread(front.handler("output_fn"), prediction, accept)
        body, media_type = result if isinstance(result, tuple) else (result, accept)
        return Response(body, media_type=media_type)

    return app


def _wants_stream(request: Request, data: Any) -> bool:
    if not isinstance(data, default_handlers.Invocation):
        return False
    attributes = request.headers.get(CUSTOM_ATTRIBUTES, "").replace(" ", "").lower()
    return (request.headers.get(FORWARDED_API) == STREAM_API or "stream=true" in attributes.split(";")
            or data.stream)


def _check_realtime(data: Any, limit: int) -> None:
    items = data.items if isinstance(data, default_handlers.Records) else [data]
    longest = max((len(item.job.text) for item in items if isinstance(item, default_handlers.Invocation)), default=0)
    if longest > limit:
        raise APIError(413, "request_too_long",
                       f"text: {longest} characters is more than a real-time invocation can speak within its 60 s "
                       f"and 6 MB limits ({limit}, S1_MINI_REALTIME_MAX_TEXT_CHARS); use "
                       "InvokeEndpointWithResponseStream, async inference or batch transform", "text")


def _stream_format(data: Any) -> Any:
    return data.format if data.format.streamable else KNOWN["wav"]
