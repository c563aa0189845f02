"""Server options (HTTP side); the engine's live in EngineConfig. Each can come from
``S1_MINI_<NAME>`` (e.g. ``S1_MINI_PORT``, ``S1_MINI_API_KEY``); CLI flags override."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from s1_mini.config import ENV_PREFIX, EngineConfigError


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None  # when set, every route but /health and /ready needs "Bearer <key>"
    max_body_mb: float = 20.0  # larger request bodies get 413
    max_concurrent_streams: int = 32  # more open streaming responses get 503 + Retry-After
    retry_after_s: int = 1  # the Retry-After of 503 answers
    log_level: str = "info"

    def __post_init__(self) -> None:
        def need(name: str, ok: bool, rule: str) -> None:
            if not ok:
                raise EngineConfigError(f"{name}: {rule}, got {getattr(self, name)!r}")

        need("port", isinstance(self.port, int) and 0 <= self.port <= 65535, "must be 0..65535")
        # inf would overflow the byte limit (int(inf)) on the first request
        need("max_body_mb", isinstance(self.max_body_mb, (int, float)) and not isinstance(self.max_body_mb, bool)
             and 0 < self.max_body_mb < math.inf, "must be a finite number > 0")
        need("max_concurrent_streams", isinstance(self.max_concurrent_streams, int) and self.max_concurrent_streams >= 0,
             "must be >= 0 (0 refuses streaming)")
        need("retry_after_s", isinstance(self.retry_after_s, int) and self.retry_after_s >= 0, "must be >= 0")
        need("api_key", self.api_key is None or (isinstance(self.api_key, str) and self.api_key.strip() != ""),
             "must be a non-empty string when set")
        need("log_level", self.log_level in ("critical", "error", "warning", "info", "debug", "trace"),
             "must be one of critical, error, warning, info, debug, trace")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "ServerOptions":
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = ENV_PREFIX + f.name.upper()
            if name not in environ:
                continue
            raw = environ[name]
            kind = str(f.type).replace(" | None", "")
            try:
                values[f.name] = int(raw) if kind == "int" else float(raw) if kind == "float" else (raw or None)
            except ValueError:
                raise EngineConfigError(f"{name}: must be a {kind}, got {raw!r}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
