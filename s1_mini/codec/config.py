"""Codec configuration: the fields and nesting of the reference ``modded_dac_vq.yaml``.

``codec_config.json`` (optional, beside ``codec.pth``) uses the same field names as the
YAML, without Hydra's ``_target_``/``_partial_`` keys. A field that is absent takes the
default of the reference constructor it belongs to (``DAC``, ``DownsampleResidualVectorQuantize``,
``WindowLimitedTransformer``, ``ModelArgs``); an unknown field is an error. Without the
file, :meth:`CodecConfig.official` (the S1 configuration) applies.

Values the reference accepts but that only matter for training (dropouts,
``max_relative_position``) are parsed and ignored. Values this implementation does not
support (non-causal convs, "conformer" positions, grouped-query attention, a quantizer
downsampling other than ×4 in total, no attention window) are refused at parse time.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class CodecConfigError(ValueError):
    """A codec configuration that cannot be used, naming the offending field."""


@dataclass(frozen=True)
class TransformerArgs:
    """The reference ``ModelArgs`` (defaults are the reference's)."""

    block_size: int = 2048
    n_layer: int = 8
    n_head: int = 8
    dim: int = 512
    intermediate_size: int = 1536
    n_local_heads: int = -1
    head_dim: int = 64
    rope_base: float = 10000
    norm_eps: float = 1e-5
    dropout_rate: float = 0.1
    attn_dropout_rate: float = 0.1
    channels_first: bool = True
    pos_embed_type: str = "rope"
    max_relative_position: int = 128


@dataclass(frozen=True)
class WindowTransformerConfig:
    """The reference ``WindowLimitedTransformer`` arguments (``pre_module``/``post_module``)."""

    config: TransformerArgs
    window_size: int | None = None
    input_dim: int = 512
    causal: bool = True


@dataclass(frozen=True)
class QuantizerConfig:
    """The reference ``DownsampleResidualVectorQuantize`` arguments."""

    pre_module: WindowTransformerConfig
    post_module: WindowTransformerConfig
    input_dim: int = 1024
    n_codebooks: int = 9
    codebook_dim: int = 8
    quantizer_dropout: float = 0.5
    codebook_size: int = 1024
    semantic_codebook_size: int = 4096
    downsample_factor: tuple[int, ...] = (2, 2)
    downsample_dims: tuple[int, ...] | None = None


@dataclass(frozen=True)
class CodecConfig:
    """The reference ``DAC`` arguments, plus the derived quantities callers need."""

    quantizer: QuantizerConfig
    encoder_dim: int = 64
    encoder_rates: tuple[int, ...] = (2, 4, 8, 8)
    latent_dim: int | None = None
    decoder_dim: int = 1536
    decoder_rates: tuple[int, ...] = (8, 8, 4, 2)
    sample_rate: int = 44100
    causal: bool = True
    encoder_transformer_layers: tuple[int, ...] = (0, 0, 0, 0)
    # Parsed for compatibility; the reference builds no decoder transformer (spec §1.4).
    decoder_transformer_layers: tuple[int, ...] = (0, 0, 0, 0)
    # The partial ModelArgs of the encoder transformer; EncoderBlock overrides n_layer,
    # n_head, dim and intermediate_size.
    transformer_general_config: TransformerArgs | None = None

    @property
    def hop_length(self) -> int:
        return math.prod(self.encoder_rates)

    @property
    def frame_length(self) -> int:
        # Hard-coded ×4 in the reference, not derived from downsample_factor (spec §1.4).
        return self.hop_length * 4

    @property
    def num_codebooks(self) -> int:
        return 1 + self.quantizer.n_codebooks

    @property
    def semantic_codebook_size(self) -> int:
        return self.quantizer.semantic_codebook_size

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def latent(self) -> int:
        """Channels between encoder, quantizer and decoder."""
        if self.latent_dim is not None:
            return self.latent_dim
        return self.encoder_dim * 2 ** len(self.encoder_rates)

    @classmethod
    def official(cls) -> "CodecConfig":
        """The S1 codec (``modded_dac_vq.yaml``)."""
        return cls.from_dict(OFFICIAL)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "codec config") -> "CodecConfig":
        config = _build(cls, data, source, "")
        _check_supported(config, source)
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> "CodecConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CodecConfigError(f"cannot read {path}: {exc}") from exc
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``None`` fields left out, so that defaults apply on reading)."""
        return _strip_none(dataclasses.asdict(self))


_TRANSFORMER = {
    "block_size": 4096,
    "n_layer": 8,
    "n_head": 16,
    "dim": 1024,
    "intermediate_size": 3072,
    "n_local_heads": -1,
    "head_dim": 64,
    "rope_base": 10000,
    "norm_eps": 1e-5,
    "dropout_rate": 0.1,
    "attn_dropout_rate": 0.1,
    "channels_first": True,
}
_WINDOW_TRANSFORMER = {"causal": True, "window_size": 128, "input_dim": 1024, "config": _TRANSFORMER}

OFFICIAL: dict[str, Any] = {
    "sample_rate": 44100,
    "encoder_dim": 64,
    "encoder_rates": [2, 4, 8, 8],
    "decoder_dim": 1536,
    "decoder_rates": [8, 8, 4, 2],
    "encoder_transformer_layers": [0, 0, 0, 4],
    "decoder_transformer_layers": [4, 0, 0, 0],
    "transformer_general_config": {
        "block_size": 16384,
        "n_local_heads": -1,
        "head_dim": 64,
        "rope_base": 10000,
        "norm_eps": 1e-5,
        "dropout_rate": 0.1,
        "attn_dropout_rate": 0.1,
        "channels_first": True,
    },
    "quantizer": {
        "input_dim": 1024,
        "n_codebooks": 9,
        "codebook_size": 1024,
        "codebook_dim": 8,
        "quantizer_dropout": 0.5,
        "downsample_factor": [2, 2],
        "post_module": _WINDOW_TRANSFORMER,
        "pre_module": _WINDOW_TRANSFORMER,
        "semantic_codebook_size": 4096,
    },
}

# Nested dataclass types by field name (the JSON nesting of modded_dac_vq.yaml).
_NESTED = {
    "quantizer": QuantizerConfig,
    "pre_module": WindowTransformerConfig,
    "post_module": WindowTransformerConfig,
    "config": TransformerArgs,
    "transformer_general_config": TransformerArgs,
}


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise CodecConfigError(f"{source}: {where} must be an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CodecConfigError(f"{source}: unknown field(s) {[prefix + k for k in unknown]}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise CodecConfigError(f"{source}: missing required field {prefix + name!r}")
            continue
        value = data[name]
        if name in _NESTED and value is not None:
            value = _build(_NESTED[name], value, source, f"{prefix}{name}.")
        elif isinstance(value, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise CodecConfigError(f"{source}: {prefix + name} must be a list of integers")
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _check_supported(c: CodecConfig, source: str) -> None:
    def refuse(name: str, why: str) -> None:
        raise CodecConfigError(f"{source}: {name}: {why}")

    q = c.quantizer
    if not c.causal:
        refuse("causal", "only the causal codec (the reference default) is supported")
    if len(c.encoder_transformer_layers) != len(c.encoder_rates):
        refuse("encoder_transformer_layers", "needs one entry per encoder rate")
    if any(c.encoder_transformer_layers) and c.transformer_general_config is None:
        refuse("transformer_general_config", "required when encoder_transformer_layers is set")
    if math.prod(q.downsample_factor) != 4:
        refuse("quantizer.downsample_factor", "must multiply to 4 (frame_length is hop_length × 4)")
    if q.downsample_dims is not None and len(q.downsample_dims) != len(q.downsample_factor):
        refuse("quantizer.downsample_dims", "needs one entry per downsample factor")
    transformers = {"quantizer.pre_module": q.pre_module, "quantizer.post_module": q.post_module}
    for name, t in transformers.items():
        if not t.causal:
            refuse(f"{name}.causal", "only causal transformers are supported")
        if not isinstance(t.window_size, int) or t.window_size < 1:
            refuse(f"{name}.window_size", "must be a positive integer")
    args = {f"{k}.config": t.config for k, t in transformers.items()}
    if c.transformer_general_config is not None:
        args["transformer_general_config"] = c.transformer_general_config
    for name, a in args.items():
        if a.pos_embed_type != "rope":
            refuse(f"{name}.pos_embed_type", "only 'rope' is supported")
        if not a.channels_first:
            refuse(f"{name}.channels_first", "only channels-first transformers are supported")
        if a.head_dim % 2:
            refuse(f"{name}.head_dim", "must be even (RoPE rotates pairs)")
    for name, t in transformers.items():
        if t.config.n_local_heads not in (-1, t.config.n_head):
            refuse(f"{name}.config.n_local_heads", "grouped-query attention is not supported")
    g = c.transformer_general_config
    if g is not None and g.n_local_heads != -1:
        # EncoderBlock sets n_head = dim // 64; any other head count would mean GQA.
        refuse("transformer_general_config.n_local_heads", "must be -1")


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_strip_none(v) for v in value]
    return value
