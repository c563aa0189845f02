"""Random codec checkpoints in the official layout, for tests and demos (spec §11.2–§11.3).

``codec.pth`` holds a plain state dict with the official keys and weight-norm (g, v)
tensors, without the six transformer buffers (the reference loads it with
``strict=False`` and recomputes them). The weights follow the "sensitive" recipe of
spec §11.3: LayerScale/ConvNeXt γ, Snake α, norm weights and biases far from their
neutral initial values, so that a deviation in any block shows in the output, while the
decoder stays out of tanh saturation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..codec.config import CodecConfig
from ..codec.layers import LEGACY, PARAMETRIZATION
from ..codec.loading import CHECKPOINT_FILE, CONFIG_FILE, expected_shapes
from ..codec.model import Codec

_TINY_TRANSFORMER = {
    "block_size": 512,
    "n_layer": 2,
    "n_head": 4,
    "dim": 64,
    "intermediate_size": 96,
    "head_dim": 16,
    "n_local_heads": -1,
    "rope_base": 10000,
    "norm_eps": 1e-5,
}
_TINY_WINDOW_TRANSFORMER = {"causal": True, "window_size": 8, "input_dim": 128, "config": _TINY_TRANSFORMER}

# Spec §11.2: every code path of the real codec at 1.5 M parameters (codes [4, T]).
TINY_CONFIG = {
    "sample_rate": 44100,
    "encoder_dim": 8,
    "encoder_rates": [2, 2, 2, 2],
    "decoder_dim": 64,
    "decoder_rates": [2, 2, 2, 2],
    "encoder_transformer_layers": [0, 0, 0, 2],
    "decoder_transformer_layers": [2, 0, 0, 0],
    "transformer_general_config": {
        "block_size": 2048,
        "head_dim": 16,
        "n_local_heads": -1,
        "rope_base": 10000,
        "norm_eps": 1e-5,
        "channels_first": True,
    },
    "quantizer": {
        "input_dim": 128,
        "n_codebooks": 3,
        "codebook_size": 32,
        "codebook_dim": 4,
        "semantic_codebook_size": 64,
        "downsample_factor": [2, 2],
        "quantizer_dropout": 0.5,
        "pre_module": _TINY_WINDOW_TRANSFORMER,
        "post_module": _TINY_WINDOW_TRANSFORMER,
    },
}

PRESETS = {"tiny": TINY_CONFIG, "s1-mini": None}

_G_SUFFIXES = (PARAMETRIZATION[0], LEGACY[0])
_V_SUFFIXES = (PARAMETRIZATION[1], LEGACY[1])
_NORM_WEIGHTS = ("attention_norm.weight", "ffn_norm.weight", "norm.weight")
_TRANSFORMER_LINEARS = ("wqkv.weight", "wo.weight", "w1.weight", "w2.weight", "w3.weight", "proj.weight")


def codec_config(preset: str) -> CodecConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown codec preset {preset!r}; choose from {sorted(PRESETS)}")
    data = PRESETS[preset]
    return CodecConfig.official() if data is None else CodecConfig.from_dict(data, f"preset {preset}")


def random_codec_state(config: CodecConfig, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random weights (float32) in the official key layout."""
    with torch.device("meta"):
        shapes = expected_shapes(Codec(config))
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def normal(shape: tuple[int, ...], std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return torch.empty(shape).normal_(mean, std, generator=gen)

    def default_init(shape: tuple[int, ...], fan_in: int, gain: float = 1.0) -> torch.Tensor:
        # The spread of PyTorch's default Linear/ConvTranspose init, U(±1/√fan_in), as a
        # normal of the same std (one pass of randn is several times faster than rand).
        return normal(shape, gain / math.sqrt(3 * fan_in))

    for key, shape in shapes.items():
        if key.endswith(_G_SUFFIXES):
            continue  # written with its v below
        if key.endswith(_V_SUFFIXES):
            g_key = key.removesuffix(PARAMETRIZATION[1] if key.endswith(PARAMETRIZATION[1]) else LEGACY[1])
            g_key += PARAMETRIZATION[0] if key.endswith(PARAMETRIZATION[1]) else LEGACY[0]
            v = _conv_weight(key, shape, normal, default_init)
            # g = ‖v‖ (the reference's initial value), scaled by |1 + 0.2·N|, never up on average.
            norm = v.flatten(1).norm(dim=1).view(shapes[g_key])
            state[g_key] = norm * normal(shapes[g_key], 0.2, 1.0).abs_()
            state[key] = v
        elif key.endswith(".alpha"):
            state[key] = normal(shape, 0.5).exp_()
        elif key.endswith("gamma"):
            state[key] = normal(shape, 0.5)
        elif key.endswith(_NORM_WEIGHTS):
            state[key] = normal(shape, 0.3, 1.0)
        elif key.endswith("bias"):
            state[key] = normal(shape, 0.05)
        elif key.endswith("codebook.weight"):
            state[key] = normal(shape)
        elif key.endswith(_TRANSFORMER_LINEARS):
            state[key] = default_init(shape, shape[1], gain=5)
        elif key.endswith(("pwconv1.weight", "pwconv2.weight")):
            state[key] = normal(shape, 0.02 * 5)
        else:  # plain quantizer convs: downsample, upsample, ConvNeXt depthwise
            state[key] = _conv_weight(key, shape, normal, default_init)
    return {key: state[key] for key in shapes}


def _conv_weight(key: str, shape: tuple[int, ...], normal, default_init) -> torch.Tensor:
    """Initial conv weights, before the g scaling.

    As the reference builds them: N(0, 0.02) for the ConvNeXt depthwise convs;
    PyTorch's default spread (std 1/√(3·fan_in), fan-in = ``shape[1]·k``) for the decoder, the
    transposed convs and the VQ projections. The encoder convs and the quantizer's
    downsample convs get N(0, 1/fan_in) instead, which keeps the signal's variance:
    otherwise each conv shrinks it, the biases dominate, and every frame of the test
    input gets the same codes, which would make the encode test blind.
    """
    if ".dwconv." in key:
        return normal(shape, 0.02)
    if key.startswith(("encoder.", "quantizer.downsample.")):
        return normal(shape, 1 / math.sqrt(shape[1] * shape[2]))
    return default_init(shape, shape[1] * shape[2])


def write_codec_checkpoint(out_dir: Path, preset: str, seed: int) -> None:
    """Write a random ``codec.pth`` (plus ``codec_config.json`` for ``tiny``) into ``out_dir``.

    ``preset``: ``"tiny"`` (spec §11.2) or ``"s1-mini"`` (the official configuration,
    which needs no config file). Same seed, same bytes of weights.
    """
    config = codec_config(preset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(random_codec_state(config, seed), out_dir / CHECKPOINT_FILE)
    config_path = out_dir / CONFIG_FILE
    if PRESETS[preset] is not None:
        config_path.write_text(json.dumps(PRESETS[preset], indent=2) + "\n")
    elif config_path.exists():
        config_path.unlink()  # a stale tiny config would otherwise override the official one
