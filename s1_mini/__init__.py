"""S1-mini inference: Dual-AR text-to-semantic model, codec, engine and servers."""

from __future__ import annotations

from typing import Any

__all__ = ["EngineConfig", "ProductionTTSEngine", "TTSResponse"]


def __getattr__(name: str) -> Any:
    # Lazy, so that tools that only need a submodule (the SageMaker local runtime, the
    # checkpoint writer) do not pay for importing torch and the engine.
    if name == "EngineConfig":
        from s1_mini.config import EngineConfig

        return EngineConfig
    if name in ("ProductionTTSEngine", "TTSResponse"):
        from s1_mini import engine

        return getattr(engine, name)
    raise AttributeError(f"module 's1_mini' has no attribute {name!r}")
