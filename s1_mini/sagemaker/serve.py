"""The container's entry point: ``serve`` (SageMaker runs ``docker run IMAGE serve``).

    python -m s1_mini.sagemaker.serve [serve] [--host 0.0.0.0] [--port 8080] [--server front|mms]

``--server front`` (the default): our serving front with continuous batching and
streaming (see :mod:`s1_mini.sagemaker.front`); on an instance with several GPUs, one
front process per GPU behind a least-loaded router (:mod:`s1_mini.sagemaker.router`;
``S1_MINI_ENGINES`` overrides the count). ``--server mms``:
multi-model-server through the sagemaker-inference toolkit, running the same handlers
(see :mod:`s1_mini.sagemaker.mms` for what it needs and its limitations).
``S1_MINI_SAGEMAKER_SERVER`` sets the default; SageMaker's ``SAGEMAKER_BIND_TO_PORT``
sets the port.

A model directory holding only ``model.tar.gz`` is extracted first (safely, see
:mod:`s1_mini.archive`). A model that cannot load (a corrupt or truncated checkpoint, a
refused archive) ends ``serve`` with exit status 3 and a one-line error naming the
file; SIGTERM drains in-flight requests and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

GRACEFUL_SHUTDOWN_S = 25  # SageMaker sends SIGKILL 30 s after SIGTERM
SERVERS = ("front", "mms")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="serve", choices=["serve"])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=port, default=None,
                   help="0..65535 (default: SAGEMAKER_BIND_TO_PORT, else 8080)")
    p.add_argument("--server", choices=SERVERS, default=os.environ.get("S1_MINI_SAGEMAKER_SERVER", "front") or "front",
                   help="front: our serving front (default); mms: multi-model-server via the sagemaker-inference "
                        "toolkit (env S1_MINI_SAGEMAKER_SERVER)")
    args = p.parse_args(argv)
    if args.server not in SERVERS:  # a bad S1_MINI_SAGEMAKER_SERVER (argparse checks only given values)
        p.error(f"argument --server: invalid choice: {args.server!r} (choose from {', '.join(SERVERS)})")
    if args.port is None:  # checked like --port: a bad value would reach socket.bind as a traceback
        try:
            args.port = port(os.environ.get("SAGEMAKER_BIND_TO_PORT", "8080"))
        except argparse.ArgumentTypeError as exc:
            p.error(f"SAGEMAKER_BIND_TO_PORT: {exc}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.server == "mms":
        from s1_mini.sagemaker import mms

        return mms.start(host=args.host, port=args.port)
    import uvicorn

    from s1_mini.archive import ArchiveError
    from s1_mini.sagemaker.front import EXIT_MODEL_FAILED, Settings, create_app, prepare_model_dir
    from s1_mini.sagemaker.router import create_router_app, engine_count
    from s1_mini.server.draining import DrainingServer

    try:
        prepare_model_dir(Settings())
    except (ArchiveError, OSError) as exc:
        print(f"error: the model archive cannot be used: {exc}", file=sys.stderr)
        return EXIT_MODEL_FAILED

    failed: list[str] = []
    server: DrainingServer | None = None

    def on_model_failure(message: str) -> None:
        failed.append(message)
        if server is not None:
            server.should_exit = True

    count = engine_count()
    if count > 1:  # one engine process per GPU behind a router (see s1_mini.sagemaker.router)
        import torch

        app = create_router_app(count, [_free_port() for _ in range(count)], gpus=torch.cuda.device_count() >= count,
                                on_model_failure=on_model_failure)
    else:
        app = create_app(on_load_failure=on_model_failure)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = DrainingServer(config)
    server.run()
    if failed:
        print(f"error: loading the model failed: {failed[0]}", file=sys.stderr)
        return EXIT_MODEL_FAILED
    return 0


def port(value: str) -> int:
    """A TCP port number, 0..65535 (0: any free port)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number 0..65535, got {value!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0..65535, got {number}")
    return number


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
