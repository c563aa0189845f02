"""``python -m s1_mini.server``: the HTTP server on uvicorn.

Options come from defaults, then ``S1_MINI_*`` environment variables (engine options as
in EngineConfig, plus S1_MINI_HOST, S1_MINI_PORT, S1_MINI_API_KEY, S1_MINI_MAX_BODY_MB,
S1_MINI_MAX_CONCURRENT_STREAMS, S1_MINI_RETRY_AFTER_S, S1_MINI_LOG_LEVEL), then flags.

Exit status: 0 after SIGTERM or SIGINT (in-flight requests drained for up to 10 s), 1 when
the models cannot load (a one-line error naming the file), 2 for a bad option.
"""

from __future__ import annotations

import argparse
import logging
import sys

from s1_mini.config import COMPILE_BACKENDS, PRECISIONS, EngineConfig, EngineConfigError
from s1_mini.server.options import ServerOptions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m s1_mini.server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", dest="checkpoint_path", help="checkpoint directory (S1_MINI_CHECKPOINT_PATH)")
    a("--host", help="listen address (default 127.0.0.1)")
    a("--port", type=int, help="listen port (default 8080)")
    a("--device", help="cuda, cuda:N, cpu or mps")
    a("--precision", choices=PRECISIONS)
    a("--compile", dest="compile_model", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the decode step")
    a("--compile-backend", choices=COMPILE_BACKENDS)
    a("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health and /ready")
    a("--max-body-mb", type=float, help="largest request body (default 20)")
    a("--max-concurrent-streams", type=int, help="open streaming responses at once (default 32)")
    a("--max-text-length", type=int, help="longest text in characters")
    a("--max-batch-size", type=int, help="sequences decoded together")
    a("--max-seq-len", type=int, help="KV-cache positions per sequence (0: the model's)")
    a("--prefix-cache-size", type=int, help="registered voices whose prompt K/V stays on the device (0: off)")
    a("--compile-cache-dir", help="inductor's on-disk cache; keep it across restarts for a fast start")
    a("--max-new-tokens", type=int, help="default frames per text piece")
    a("--max-queue-size", type=int, help="waiting requests before 503")
    a("--request-timeout", dest="request_timeout_seconds", type=float, help="seconds per request")
    a("--voice-dir", dest="voice_registry_dir", help="directory that keeps registered voices")
    a("--warmup", action=argparse.BooleanOptionalAction, default=None, help="warm up before /ready")
    a("--log-level", choices=["critical", "error", "warning", "info", "debug", "trace"])
    return p


ENGINE_FLAGS = ("checkpoint_path", "device", "precision", "compile_model", "compile_backend", "max_text_length",
                "max_batch_size", "max_seq_len", "prefix_cache_size", "compile_cache_dir", "max_new_tokens",
                "max_queue_size", "request_timeout_seconds", "voice_registry_dir", "warmup")
SERVER_FLAGS = ("host", "port", "api_key", "max_body_mb", "max_concurrent_streams", "log_level")


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        config = EngineConfig.from_env(**{k: args[k] for k in ENGINE_FLAGS})
        options = ServerOptions.from_env(**{k: args[k] for k in SERVER_FLAGS})
    except EngineConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    from s1_mini.server.app import create_app
    from s1_mini.server.draining import DrainingServer

    logging.basicConfig(level=options.log_level.upper() if options.log_level != "trace" else "DEBUG",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    failed: list[BaseException] = []
    server: DrainingServer | None = None

    def on_load_failure(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True  # a server that cannot load its models exits non-zero

    app = create_app(config, options, on_load_failure=on_load_failure)
    server = DrainingServer(uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level,
                                   timeout_graceful_shutdown=10, proxy_headers=False))
    server.run()
    if failed:
        print(f"error: loading the models failed: {' '.join(str(failed[0]).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
