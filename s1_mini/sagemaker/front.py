"""Our SageMaker serving front: ``/ping``, ``/invocations``, ``/execution-parameters``.

One process, one engine, so concurrent invocations share the engine's continuous batch
(multi-model-server would give each worker its own model and one request at a time).
The handlers come from ``$SAGEMAKER_BASE_DIR/model/code/$SAGEMAKER_PROGRAM`` when the
model archive carries one (``code/inference.py``), else from
:mod:`s1_mini.sagemaker.handlers`. The model loads in the background after the port is
open: ``/ping`` answers 503 until ``model_fn`` (with its warm-up) is done and the engine
is healthy. A model that cannot load (a corrupt checkpoint, a bad option) is logged as one
line naming the file and, ``S1_MINI_LOAD_FAILURE_GRACE_S`` (5 s) later, ends the process
with a non-zero status (see :func:`create_app`) rather than leaving ``/ping`` at 503
forever. A model directory that holds only ``model.tar.gz`` is served from its safe
extraction (:func:`prepare_model_dir`). A body past ``SAGEMAKER_MAX_PAYLOAD_IN_MB`` is
refused (413) before it is read; a client that leaves an invocation cancels its engine
requests; a stream that fails after its headers is aborted, not ended as if complete.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from s1_mini.archive import ArchiveError, extract_model_archive
from s1_mini.checkpoint import CheckpointError
from s1_mini.config import EngineConfigError
from s1_mini.sagemaker import handlers as default_handlers
from s1_mini.server.audio_formats import KNOWN
from s1_mini.server.errors import APIError, error_response
from s1_mini.server.metrics import Metrics
from s1_mini.server.middleware import BodyLimit
from s1_mini.server.synthesis import Synthesizer, unless_disconnected

log = logging.getLogger("s1_mini.sagemaker")

FORWARDED_API = "x-amzn-sagemaker-forwarded-api"
CUSTOM_ATTRIBUTES = "x-amzn-sagemaker-custom-attributes"
STREAM_API = "InvokeEndpointWithResponseStream"
REALTIME_API = "InvokeEndpoint"
MODEL_ARCHIVE = "model.tar.gz"
EXTRACTED_DIR = "extracted"  # where a model dir's own model.tar.gz is extracted to
# The end of a 413 for a body past SAGEMAKER_MAX_PAYLOAD_IN_MB: what a larger request can use.
PAYLOAD_HINT = "; use async inference for larger requests"
EXIT_MODEL_FAILED = 3  # serve's exit status when the model cannot load: restarting will not help
# Load failures whose message says what is wrong and where: one log line, no traceback.
EXPLAINED_FAILURES = (CheckpointError, EngineConfigError, ArchiveError, OSError)


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
    # A failed load stays visible on /ping ("failed" and the reason) this long before the
    # process exits: SageMaker and the router act on the exit, a person polling /ping on the reason.
    load_failure_grace_s: float = field(
        default_factory=lambda: float(os.environ.get("S1_MINI_LOAD_FAILURE_GRACE_S", "5")))
    # Bound on the uncompressed size of a model.tar.gz that serve extracts itself (a tar bomb).
    max_archive_gb: float = field(default_factory=lambda: float(os.environ.get("S1_MINI_MAX_ARCHIVE_GB", "32")))

    @property
    def model_dir(self) -> Path:
        """SageMaker's model directory, or the extraction of its model.tar.gz."""
        root = self.base_dir / "model"
        extracted = root / EXTRACTED_DIR
        return extracted if (root / MODEL_ARCHIVE).is_file() and extracted.is_dir() else root


def prepare_model_dir(settings: Settings) -> None:
    """Extract ``model.tar.gz`` when it is all the model directory holds (SageMaker
    extracts the archive itself; a model directory mounted or copied as is does not).
    Raises :class:`ArchiveError` naming the member and the rule it breaks."""
    root = settings.base_dir / "model"
    archive = root / MODEL_ARCHIVE
    if not archive.is_file() or (root / EXTRACTED_DIR).is_dir():
        return
    others = sorted(p.name for p in root.iterdir() if p.name != MODEL_ARCHIVE and not p.name.startswith("."))
    if others:
        log.info("%s: not extracted, the model directory already holds %s", archive, ", ".join(others[:5]))
        return
    log.info("extracting %s", archive)
    extract_model_archive(archive, root / EXTRACTED_DIR, max_bytes=int(settings.max_archive_gb * 1024**3))


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


class InvocationEngine:
    """The engine as one invocation's ``predict_fn`` sees it: every request submitted
    through it is kept, so that :meth:`cancel` can cancel them when the client leaves.
    ``predict_fn`` blocks a worker thread in ``engine.generate``/``engine.wait``, where
    nothing else can reach its requests; cancelled, each frees its batch slot at the
    next decode step and its wait returns. Everything else goes to the engine itself."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._lock = threading.Lock()  # submit runs in the worker thread, cancel on the event loop
        self._requests: list[Any] = []
        self._cancelled = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def submit(self, text: str, **kwargs: Any) -> Any:
        request = self._engine.submit(text, **kwargs)
        with self._lock:
            self._requests.append(request)
            cancelled = self._cancelled
        if cancelled:  # submitted after the client left (a JSON-lines body still queueing)
            request.cancel()
        return request

    def generate(self, text: str, **kwargs: Any) -> Any:
        # The engine's own generate, run on this object so that its self.submit is ours.
        return type(self._engine).generate(self, text, **kwargs)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            requests = list(self._requests)
        for request in requests:
            request.cancel()


class Front:
    def __init__(self, settings: Settings, on_load_failure: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.on_load_failure = on_load_failure
        self.handlers: ModuleType = default_handlers  # until load() reads the model's own
        self.engine: Any = None
        self.load_error: str | None = None
        self.metrics = Metrics()
        self.synth: Synthesizer | None = None

    def handler(self, name: str) -> Any:
        return getattr(self.handlers, name, getattr(default_handlers, name))

    def load(self) -> None:
        """model_fn in a background thread: the port answers /ping (503) meanwhile."""
        try:
            self.handlers = load_handlers(self.settings)
            self.engine = self.handler("model_fn")(str(self.settings.model_dir))
            self.synth = Synthesizer(self.engine, self.metrics, self.settings.max_streams, retry_after=1)
            log.info("model loaded and warmed up")
        except Exception as exc:  # noqa: BLE001 -- reported by /ping, the log and the exit status
            self.load_error = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line
            if isinstance(exc, EXPLAINED_FAILURES):
                log.error("loading the model failed: %s", self.load_error)
            else:  # a bug, or user code: the traceback is what explains it
                log.exception("loading the model failed: %s", self.load_error)
            if self.on_load_failure is not None:
                time.sleep(self.settings.load_failure_grace_s)
                self.on_load_failure(self.load_error)

    @property
    def healthy(self) -> bool:
        return self.engine is not None and bool(self.engine.health_check().get("healthy"))

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()


def create_app(settings: Settings | None = None,
               on_load_failure: Callable[[str], None] | None = None) -> FastAPI:
    """The front's app; ``on_load_failure(message)`` runs ``load_failure_grace_s`` after
    the model failed to load (``serve`` stops the server and exits non-zero)."""
    front = Front(settings or Settings(), on_load_failure)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=front.load, name="model-loader", daemon=True).start()
        yield
        await asyncio.to_thread(front.stop)  # after uvicorn drained in-flight requests (SIGTERM)

    app = FastAPI(title="s1-mini SageMaker serving", lifespan=lifespan)
    app.state.front = front
    app.add_middleware(BodyLimit, max_mb=front.settings.max_payload_mb, setting="SAGEMAKER_MAX_PAYLOAD_IN_MB",
                       hint=PAYLOAD_HINT)

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
        raw = await request.body()  # at most max_payload_mb: BodyLimit refused anything larger unread
        content_type = request.headers.get("content-type", "application/json")
        data = await asyncio.to_thread(front.handler("input_fn"), raw, content_type)
        if _wants_stream(request, data):
            return await front.synth.stream(data.job, _stream_format(data), {})
        if request.headers.get(FORWARDED_API) == REALTIME_API:
            _check_realtime(data, front.settings.realtime_max_text_chars)
        accept = request.headers.get("accept", "")
        if accept in ("", "*/*"):
            accept = "application/jsonlines" if isinstance(data, default_handlers.Records) else front.settings.default_accept
        engine = InvocationEngine(front.engine)
        try:
            prediction = await unless_disconnected(
                request, asyncio.to_thread(front.handler("predict_fn"), data, engine))
        except BaseException:  # the client left, a shutdown, a failure: nobody will read them, free their slots
            engine.cancel()
            raise
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
