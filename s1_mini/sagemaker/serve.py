"""The container's entry point: ``serve`` (SageMaker runs ``docker run IMAGE serve``).

    python -m s1_mini.sagemaker.serve [serve] [--host 0.0.0.0] [--port 8080]

Our single-process serving front with continuous batching (see
:mod:`s1_mini.sagemaker.front`); SageMaker's ``SAGEMAKER_BIND_TO_PORT`` sets the port.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator

GRACEFUL_SHUTDOWN_S = 25  # SageMaker sends SIGKILL 30 s after SIGTERM


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="serve", choices=["serve"])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=int(os.environ.get("SAGEMAKER_BIND_TO_PORT", "8080")))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from s1_mini.sagemaker.front import create_app

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # SageMaker stops a container with SIGTERM and expects it to drain and exit 0;
            # uvicorn's own handler re-raises the signal after shutting down (exit -15).
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    config = uvicorn.Config(create_app(), host=args.host, port=args.port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
