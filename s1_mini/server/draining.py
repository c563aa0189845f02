"""uvicorn's server, ending with exit status 0 when asked to stop."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import uvicorn


class DrainingServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # A stop request (SageMaker stops a container with SIGTERM) is a normal end: drain,
        # then exit 0. uvicorn's own handler re-raises the signal after shutting down, so
        # the process would end with status -15.
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
