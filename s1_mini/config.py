"""EngineConfig: every option of the engine and its servers, in one place.

Each field can also come from the environment as ``S1_MINI_<FIELD>`` (upper case), and
the seed README's short names are kept as aliases: ``S1_MINI_COMPILE`` for
``compile_model`` and ``S1_MINI_REQUEST_TIMEOUT`` for ``request_timeout_seconds``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

ENV_PREFIX = "S1_MINI_"
ENV_ALIASES = {"compile_model": "S1_MINI_COMPILE", "request_timeout_seconds": "S1_MINI_REQUEST_TIMEOUT"}
PRECISIONS = ("float16", "bfloat16", "float32")
COMPILE_BACKENDS = ("auto", "inductor", "eager", "disabled")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEVICE_PATTERN = re.compile(r"(cuda|cpu|mps)(:[0-9]+)?")
# A request waits with threading timeouts, which overflow near 2**63 ns; a day is more than
# any one synthesis needs and keeps a typo (or inf) from meaning "never time out".
MAX_TIMEOUT_S = 86_400.0
# torch.Generator.manual_seed takes any integer in this range (negative ones wrap).
SEED_RANGE = (-(2**63), 2**64 - 1)


class EngineConfigError(ValueError):
    """An option with a value that breaks its rule; the message names both."""


@dataclass
class EngineConfig:
    # model
    checkpoint_path: str = "checkpoints/openaudio-s1-mini"
    device: str = "cuda"  # cuda[:i], cpu or mps; cuda falls back to cpu (with a warning) when absent
    precision: str = "float16"
    # compilation
    compile_model: bool = True
    compile_backend: str = "auto"
    compile_mode: str | None = "reduce-overhead"
    # inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR); kept across restarts, it turns
    # minutes of compiling at start-up into seconds (H100: 144.5 s -> 21.1 s)
    compile_cache_dir: str | None = None
    # VRAM management
    vram_clear_on_oom_only: bool = True
    vram_clear_threshold_gb: float = 2.0
    # timeouts and limits
    request_timeout_seconds: float = 60.0
    max_text_length: int = 10_000
    text_piece_chars: int = 300  # longer text is generated piece by piece (split at sentences)
    max_new_tokens: int = 1024  # frames per piece; 0 = up to the context limit
    max_batch_size: int = 8  # sequences decoded together (continuous batching)
    max_seq_len: int = 0  # KV-cache positions per sequence; 0 = the model's max_seq_len
    kv_cache_gb: float = 0.0  # KV-cache budget; 0 = no budget beyond max_batch_size
    max_queue_size: int = 256  # waiting requests beyond the batch; more are refused at once
    stream_chunk_frames: int = 4  # most frames per streamed chunk (the first is 1; others may be shorter)
    # Requests admitted together are prefilled this many at a time in one padded batch
    # (compiled on CUDA: captured graphs for every batch size up to it, for prompts up to
    # 512 positions; longer ones one at a time); 1 = one at a time. On an H200, 16 prompts
    # took 11 ms as one batch against 87 ms one by one (BENCHMARKS.md).
    prefill_batch_size: int = 16
    warmup: bool = True
    # generation defaults
    default_temperature: float = 0.7
    default_top_p: float = 0.8
    default_repetition_penalty: float = 1.1
    # voices
    voice_registry_dir: str | None = None  # None: voices live in memory only
    voice_registry_size: int = 10_000
    reference_cache_size: int = 256  # inline reference audio encoded once per content hash
    prefix_cache_size: int = 16  # voices (registered or inline) whose prompt K/V stays on the device; 0 = off
    # Longest reference audio (registered or inline), checked from the file's header before
    # decoding: the codec encoder's memory grows with the square of the length.
    max_reference_seconds: float = 30.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(name: str, ok: bool, rule: str) -> None:
            if not ok:
                raise EngineConfigError(f"{name}: {rule}, got {getattr(self, name)!r}")

        for f in fields(self):
            value = getattr(self, f.name)
            # an int field given 2.5 would reach range() and tensor shapes; NaN and inf pass
            # every comparison below in one direction or the other, so they are refused here
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise EngineConfigError(f"{f.name}: must be an integer, got {value!r}")
            if f.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise EngineConfigError(f"{f.name}: must be a finite number, got {value!r}")
            if f.type == "bool" and not isinstance(value, bool):
                raise EngineConfigError(f"{f.name}: must be true or false, got {value!r}")
        need("checkpoint_path", isinstance(self.checkpoint_path, str) and bool(self.checkpoint_path),
             "must be a non-empty path")
        need("device", isinstance(self.device, str) and DEVICE_PATTERN.fullmatch(self.device) is not None,
             "must be cuda, cuda:<index>, cpu or mps")
        need("precision", self.precision in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}")
        need("compile_backend", self.compile_backend in COMPILE_BACKENDS,
             f"must be one of {', '.join(COMPILE_BACKENDS)}")
        need("compile_mode", self.compile_mode is None or self.compile_mode in COMPILE_MODES,
             f"must be null or one of {', '.join(COMPILE_MODES)}")
        need("vram_clear_threshold_gb", self.vram_clear_threshold_gb >= 0, "must be >= 0")
        need("request_timeout_seconds", 0 < self.request_timeout_seconds <= MAX_TIMEOUT_S,
             f"must satisfy 0 < x <= {MAX_TIMEOUT_S:g}")
        need("max_text_length", self.max_text_length >= 1, "must be >= 1")
        need("text_piece_chars", self.text_piece_chars >= 16, "must be >= 16")
        need("max_new_tokens", self.max_new_tokens == 0 or self.max_new_tokens >= 2, "must be 0 or >= 2")
        need("max_batch_size", 1 <= self.max_batch_size <= 1024, "must be between 1 and 1024")
        need("max_seq_len", self.max_seq_len >= 0, "must be >= 0")
        need("kv_cache_gb", self.kv_cache_gb >= 0, "must be >= 0")
        need("max_queue_size", self.max_queue_size >= 0, "must be >= 0")
        # The streaming codec step is sized for max_batch_size streams of this many frames.
        need("stream_chunk_frames", 1 <= self.stream_chunk_frames <= 64, "must be between 1 and 64")
        need("prefill_batch_size", 1 <= self.prefill_batch_size <= 1024, "must be between 1 and 1024")
        need("default_temperature", 0 < self.default_temperature < 2, "must satisfy 0 < x < 2")
        need("default_top_p", 0 < self.default_top_p <= 1, "must satisfy 0 < x <= 1")
        need("default_repetition_penalty", 0 < self.default_repetition_penalty < 2, "must satisfy 0 < x < 2")
        need("voice_registry_dir", self.voice_registry_dir is None
             or (isinstance(self.voice_registry_dir, str) and bool(self.voice_registry_dir)),
             "must be null or a non-empty path")
        need("voice_registry_size", self.voice_registry_size >= 1, "must be >= 1")
        need("reference_cache_size", self.reference_cache_size >= 0, "must be >= 0")
        need("prefix_cache_size", self.prefix_cache_size >= 0, "must be >= 0")
        need("compile_cache_dir", self.compile_cache_dir is None
             or (isinstance(self.compile_cache_dir, str) and bool(self.compile_cache_dir)),
             "must be null or a non-empty path")
        need("max_reference_seconds", self.max_reference_seconds > 0, "must be > 0")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "EngineConfig":
        """Defaults, then ``S1_MINI_*`` variables, then ``overrides`` (e.g. CLI flags)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            names = [ENV_PREFIX + f.name.upper()] + ([ENV_ALIASES[f.name]] if f.name in ENV_ALIASES else [])
            for name in names:
                if name in environ:
                    values[f.name] = _parse(f, environ[name], name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise EngineConfigError(f"{unknown[0]}: unknown option (allowed: {', '.join(f.name for f in fields(cls))})")
        return cls(**values)

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


def check_seed(seed: Any, name: str = "seed") -> None:
    """Refuse a seed that torch's generators cannot take (they raise a bare overflow error)."""
    low, high = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed <= high:
        raise EngineConfigError(f"{name}: must be an integer in [-2**63, 2**64 - 1], got {seed!r}")


def _parse(f: dataclasses.Field, raw: str, name: str) -> Any:
    kind = f.type.replace(" | None", "")
    if f.type.endswith("| None") and raw.strip().lower() in ("", "none", "null"):
        return None
    try:
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        return raw
    except ValueError:
        raise EngineConfigError(f"{name}: must be a {kind}, got {raw!r}") from None

