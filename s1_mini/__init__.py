"""S1-mini inference: Dual-AR text-to-semantic model, codec, engine and servers."""

from s1_mini.config import EngineConfig
from s1_mini.engine import ProductionTTSEngine, TTSResponse

__all__ = ["EngineConfig", "ProductionTTSEngine", "TTSResponse"]
