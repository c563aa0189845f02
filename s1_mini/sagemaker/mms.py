"""Serving through multi-model-server (MMS) and the sagemaker-inference toolkit.

    python -m s1_mini.sagemaker.serve serve --server mms     (or S1_MINI_SAGEMAKER_SERVER=mms)

The alternative to our own front (:mod:`s1_mini.sagemaker.front`, the default), for
deployments that want AWS's stock model server. :func:`start` calls the toolkit's
``sagemaker_inference.model_server.start_model_server(handler_service=...)``, which
writes an MMS properties file, runs ``multi-model-server --start --models
model=$SAGEMAKER_BASE_DIR/model`` and waits on the Java process. Each MMS worker
imports this module as its handler service (``handle`` below); the toolkit's
``Transformer`` then loads the user module from ``model.tar.gz`` ``code/``
(``$SAGEMAKER_PROGRAM``, default ``inference.py``, i.e. ``code/inference.py`` with our
handlers from :mod:`s1_mini.sagemaker.handlers`) and calls ``model_fn`` once per worker
at start, then ``input_fn -> predict_fn -> output_fn`` per request.

Needs: ``sagemaker-inference`` 1.10.x, ``multi-model-server`` 1.1.11 (both outside this
project's dependencies), ``pkg_resources`` (setuptools < 81; the toolkit imports it
without declaring it) and Java (17 works). ``tests/mms/build_mms_env.sh`` builds such an
environment.

Variables (the toolkit's): ``SAGEMAKER_BASE_DIR`` (/opt/ml), ``SAGEMAKER_PROGRAM``
(inference.py), ``SAGEMAKER_BIND_TO_PORT`` (8080; inference and management API share
it), ``SAGEMAKER_MODEL_SERVER_WORKERS`` (MMS's default: one per GPU, else one per CPU),
``SAGEMAKER_MODEL_SERVER_TIMEOUT`` (60 s per request, then MMS restarts the worker),
``SAGEMAKER_MODEL_SERVER_VMARGS``, ``SAGEMAKER_STARTUP_TIMEOUT``,
``SAGEMAKER_MAX_PAYLOAD_IN_MB``, ``SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT`` (we default it
to ``*/*``: like our front, a request without Accept gets audio in the container its
``format`` field names, not the toolkit's application/json). Ours:
``S1_MINI_MMS_DIR`` (where the MMS properties file and MMS's logs go; default a fresh
temporary directory, so it runs as non-root: the toolkit's own path is under /etc) and
the engine's ``S1_MINI_*`` options, read by every worker.

Errors: a handler's :class:`~s1_mini.server.errors.APIError` becomes a
``GenericInferenceToolkitError`` with its status, so the client gets that status (4xx
stays 4xx; the toolkit turns any other exception into 500) and our JSON error body
(``{"error": {"code", "field", "message", ...}}``, content-type application/json). The
stock toolkit appends its Python traceback to every error body; this handler service
overrides that (the traceback goes to the worker log instead), so bodies are plain
JSON. Unexpected exceptions answer 500 with a generic JSON error.

Limitations of MMS compared with our front (observed with MMS 1.1.11 / toolkit 1.10.1):

* One request at a time per worker, and no continuous batching across requests:
  concurrent requests queue in the Java frontend (a JSON-lines body is still batched
  inside its worker, by the engine).
* Every worker is a separate Python process with its own model copy (and its own
  compile/warm-up); memory and start time grow with ``SAGEMAKER_MODEL_SERVER_WORKERS``,
  and on a GPU host all workers share the one model's GPU unless there are several.
* No streaming: MMS sends complete bodies only (a generator from ``output_fn`` fails
  with 503 "Unsupported model output data type"), so ``"streaming": true`` and
  InvokeEndpointWithResponseStream get the whole audio at the end, and the real-time
  response limit (6 MB) applies to every answer.
* ``/ping`` answers 200 as soon as the Java frontend is up, even while the model is
  loading or when every worker keeps dying (a failing ``model_fn``: MMS retries the
  worker with a back-off forever); only its body says ``{"status": "Unhealthy"}``, and
  SageMaker looks at the status code. Meanwhile ``/invocations`` requests wait in
  MMS's queue instead of failing fast.
* MMS batching (``batch_size``/``max_batch_delay`` via the management API) hands the
  handler a list, but the toolkit applies request 0's headers (Content-Type, Accept)
  to every item and sets only item 0's response content type.
* ``/execution-parameters`` is not served (batch transform falls back to its defaults).
* The request deadline is MMS's ``default_response_timeout`` for every request; long
  texts on a slow CPU can exceed it and get the worker restarted.
* After SIGTERM, MMS can leave worker processes behind; :func:`start` terminates the
  leftover workers of its own process group after the Java process has exited.
* MMS only accepts ports below 32767 (its Connector rejects larger ones: "Invalid port
  number"), so ``SAGEMAKER_BIND_TO_PORT`` cannot be an ephemeral port.
* The toolkit finds the Java process by scanning all processes (several MMS on one
  host made it fail or follow the wrong one); :func:`start` narrows that to the Java
  process started with its own config file. MMS's pid file lives in ``$TMPDIR`` and
  its worker sockets in ``$TEMP`` (default /tmp), so two servers on one host need
  different ``TMPDIR``/``TEMP``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from http import HTTPStatus
from typing import Any

log = logging.getLogger("s1_mini.sagemaker.mms")

HANDLER_SERVICE = __name__ + ":handle"
WORKER_SCRIPT = "model_service_worker.py"

# ----------------------------------------------------------------- handler service
# Runs inside each MMS worker (a Python process the Java frontend starts); imported
# only there, so the toolkit import is deferred to keep this module importable without it.

_service: Any = None


def _json_error(status: int, code: str, message: str, field: str | None) -> str:
    from s1_mini.server.errors import error_body

    return json.dumps(error_body(code, message, field, status))


def _build_service() -> Any:
    from sagemaker_inference.default_handler_service import DefaultHandlerService
    from sagemaker_inference.errors import GenericInferenceToolkitError
    from sagemaker_inference.transformer import Transformer

    from s1_mini.server.errors import APIError

    class ErrorResponse(GenericInferenceToolkitError):
        """An APIError as the toolkit's error: its status, our JSON body, a short
        reason phrase (the toolkit would otherwise put the message there)."""

        def __init__(self, error: APIError) -> None:
            try:
                phrase = HTTPStatus(error.status).phrase
            except ValueError:
                phrase = "Error"
            super().__init__(error.status, _json_error(error.status, error.code, error.message, error.field), phrase)

    class S1Transformer(Transformer):
        def _run_handler_function(self, func, *argv):  # noqa: ANN001 - the toolkit's signature
            try:
                return super()._run_handler_function(func, *argv)
            except APIError as exc:
                raise ErrorResponse(exc) from exc

        @staticmethod
        def handle_error(context, inference_exception, trace):  # noqa: ANN001
            status = inference_exception.status_code
            if isinstance(inference_exception, ErrorResponse):
                log.info("request failed with %s: %s", status, inference_exception.message)
                log.debug("%s", trace)
                body = inference_exception.message
            else:
                log.error("request failed with %s:\n%s", status, trace)
                body = _json_error(status, "internal_error" if status >= 500 else "invalid_request",
                                   "internal error; see the endpoint's logs" if status >= 500
                                   else str(inference_exception.message), None)
                try:
                    phrase = HTTPStatus(status).phrase
                except ValueError:
                    phrase = "Error"
                inference_exception.phrase = phrase
            context.set_response_status(code=status, phrase=inference_exception.phrase)
            context.set_response_content_type(0, "application/json")
            return [body]

    return DefaultHandlerService(transformer=S1Transformer())


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    """MMS's entry point (``s1_mini.sagemaker.mms:handle``): called once with ``None``
    when the worker loads the model, then with each batch of requests."""
    global _service
    if _service is None:
        _service = _build_service()
    if data is None:
        _service.initialize(context)
        return None
    return _service.handle(data, context)


# ---------------------------------------------------------------------- the server


def start(host: str | None = None, port: int | None = None) -> int:
    """Start multi-model-server with our handler service and block until it exits.
    Returns 0 after SIGTERM/SIGINT (SageMaker's stop), 1 if MMS exited on its own."""
    if port is not None:
        os.environ["SAGEMAKER_BIND_TO_PORT"] = str(port)
    if not os.environ.get("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT"):
        os.environ["SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT"] = "*/*"
    work_dir = os.environ.get("S1_MINI_MMS_DIR") or tempfile.mkdtemp(prefix="s1-mini-mms-")
    os.makedirs(work_dir, exist_ok=True)
    os.environ.setdefault("LOG_LOCATION", os.path.join(work_dir, "logs"))
    os.environ.setdefault("METRICS_LOCATION", os.path.join(work_dir, "logs"))
    # The toolkit runs `multi-model-server` from PATH: find the one installed beside
    # this interpreter when its bin directory is not on PATH (python -m from a venv).
    bin_dir = os.path.dirname(sys.executable)
    if shutil.which("multi-model-server") is None and os.path.exists(os.path.join(bin_dir, "multi-model-server")):
        os.environ["PATH"] = os.pathsep.join(filter(None, [bin_dir, os.environ.get("PATH")]))

    from sagemaker_inference import model_server

    model_server.MMS_CONFIG_FILE = os.path.join(work_dir, "sagemaker-mms.properties")
    if host and host != "0.0.0.0":
        generate = model_server._generate_mms_config_properties

        def generate_for_host(env: Any, handler_service: Any = None) -> str:
            return generate(env, handler_service).replace("http://0.0.0.0:", f"http://{host}:")

        model_server._generate_mms_config_properties = generate_for_host

    stopping = {"requested": False}

    def add_sigterm_handler(mms_process: Any) -> None:
        def terminate(signo: int, frame: Any) -> None:
            stopping["requested"] = True
            try:
                os.kill(mms_process.pid, signal.SIGTERM)
            except OSError:
                pass

        signal.signal(signal.SIGTERM, terminate)
        signal.signal(signal.SIGINT, terminate)

    model_server._add_sigterm_handler = add_sigterm_handler
    model_server._retrieve_mms_server_process = _own_mms_process(model_server.MMS_NAMESPACE,
                                                                 model_server.MMS_CONFIG_FILE)
    log.info("starting multi-model-server (handler %s, config %s, port %s)", HANDLER_SERVICE,
             model_server.MMS_CONFIG_FILE, os.environ.get("SAGEMAKER_BIND_TO_PORT", "8080"))
    try:
        model_server.start_model_server(handler_service=HANDLER_SERVICE)
    finally:
        _stop_leftover_workers()
    if stopping["requested"]:
        log.info("multi-model-server stopped")
        return 0
    log.error("multi-model-server exited on its own")
    return 1


def _own_mms_process(namespace: str, config_file: str) -> Any:
    """The toolkit finds "its" MMS by scanning every process for the Java class name and
    gives up when there are several, or follows another server's Java process when
    that one is found first. Ours is the one started with our (unique) config file."""
    import psutil

    def retrieve() -> Any:
        found = []
        for process in psutil.process_iter():
            try:
                if process.status() == psutil.STATUS_ZOMBIE:
                    continue
                cmdline = process.cmdline()
            except psutil.Error:
                continue
            if namespace in cmdline and config_file in cmdline:
                found.append(process)
        if len(found) != 1:
            raise Exception(f"mms model server with config {config_file}: {len(found)} processes, expected 1")
        return found[0]

    return retrieve


def _stop_leftover_workers(timeout: float = 10) -> None:
    """Terminate the MMS worker processes of our process group that outlived the Java
    frontend (MMS does not always stop them on SIGTERM)."""
    import psutil

    group = os.getpgid(0)
    workers = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if process.pid == os.getpid() or os.getpgid(process.pid) != group:
                continue
            if any(arg.endswith(WORKER_SCRIPT) for arg in process.info["cmdline"] or []):
                workers.append(process)
        except (psutil.Error, OSError):
            continue
    for process in workers:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(workers, timeout=timeout)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    if workers:
        log.info("stopped %d leftover MMS worker(s)", len(workers))
