"""Strict loading of ``codec.pth`` in the official key layout (spec §1).

Accepted like the reference: a ``{"state_dict": …}`` wrapper, keys containing
``generator.`` (only those are kept, with every ``generator.`` removed), and the six
transformer buffers (``freqs_cis``, ``causal_mask``), which are ignored because they
are recomputed. Unlike the reference (``strict=False``), a missing key, an unknown
key or a wrong shape is refused: a wrong key name must not run on random weights.

Weight norm is folded at load (``w = v · g / ‖v‖``, norm over every dimension but 0,
so per input channel for transposed convs); inference then runs on plain convs.
Either weight-norm naming is accepted for any weight-normalised conv:
``parametrizations.weight.original0/1`` (the official one for the causal convs) or
``weight_g/weight_v`` (the official one for the VQ projections).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..checkpoint import CheckpointError, check_keys_and_shapes, read_state_dict
from .config import CodecConfig
from .layers import LEGACY, PARAMETRIZATION
from .model import Codec
from .transformer import WindowedTransformer

CHECKPOINT_FILE = "codec.pth"
CONFIG_FILE = "codec_config.json"


def load_codec(checkpoint_dir: Path, device: torch.device, dtype: torch.dtype) -> Codec:
    config_path = checkpoint_dir / CONFIG_FILE
    config = CodecConfig.from_json(config_path) if config_path.is_file() else CodecConfig.official()
    path = checkpoint_dir / CHECKPOINT_FILE
    with torch.device("meta"):
        codec = Codec(config)
    state = official_state(path, read_state_dict(path), codec)
    plain = {name: _plain_weight(state, name, naming, device) for name, naming in _parameters(codec).items()}
    codec.load_state_dict(plain, assign=True)
    return codec.set_precision(dtype).eval()


def expected_shapes(codec: Codec) -> dict[str, tuple[int, ...]]:
    """Every key of the official ``codec.pth`` for this configuration (buffers excluded), with its shape."""
    shapes = {}
    params = dict(codec.named_parameters())
    for name, naming in _parameters(codec).items():
        shape = tuple(params[name].shape)
        if naming is None:
            shapes[name] = shape
        else:
            prefix = name.removesuffix("weight")
            shapes[prefix + naming[0]] = (shape[0],) + (1,) * (len(shape) - 1)
            shapes[prefix + naming[1]] = shape
    return shapes


def buffer_keys(codec: Codec) -> list[str]:
    """The reference's persistent transformer buffers, which a file may hold."""
    names = [n for n, m in codec.named_modules() if isinstance(m, WindowedTransformer)]
    return [f"{n}.{b}" for n in names for b in ("freqs_cis", "causal_mask")]


def official_state(path: Path, state: dict[str, Tensor], codec: Codec) -> dict[str, Tensor]:
    """Apply the reference's key rewriting, then check the keys and shapes strictly."""
    if any("generator" in k for k in state):
        state = {k.replace("generator.", ""): v for k, v in state.items() if "generator." in k}
    for key in buffer_keys(codec):
        state.pop(key, None)
    expected = expected_shapes(codec)
    aliases = {PARAMETRIZATION[i]: LEGACY[i] for i in range(2)} | {LEGACY[i]: PARAMETRIZATION[i] for i in range(2)}
    for key in list(state):
        if key in expected:
            continue
        for own, other in aliases.items():
            if key.endswith("." + own):
                renamed = key.removesuffix(own) + other
                if renamed in expected and renamed not in state:
                    state[renamed] = state.pop(key)
                break
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 10} more)" if len(unexpected) > 10 else ""
        raise CheckpointError(f"{path}: unexpected keys {unexpected[:10]}{more}")
    check_keys_and_shapes(path, state, expected)
    not_float = [k for k, v in state.items() if not v.is_floating_point()]
    if not_float:
        raise CheckpointError(f"{path}: tensors that are not floating point: {not_float[:10]}")
    return state


def _parameters(codec: Codec) -> dict[str, tuple[str, str] | None]:
    """Each parameter name of the model, with the weight-norm naming of its file keys (or None)."""
    result = {}
    for name, _ in codec.named_parameters():
        owner, _, leaf = name.rpartition(".")
        naming = getattr(codec.get_submodule(owner), "wn_naming", None)
        result[name] = naming if leaf == "weight" else None
    return result


def _plain_weight(state: dict[str, Tensor], name: str, naming: tuple[str, str] | None, device: torch.device) -> Tensor:
    if naming is None:
        return state[name].to(device=device, dtype=torch.float32, copy=True)
    prefix = name.removesuffix("weight")
    g = state[prefix + naming[0]].to(device=device, dtype=torch.float32)
    v = state[prefix + naming[1]].to(device=device, dtype=torch.float32)
    norm = v.flatten(1).norm(dim=1).view(g.shape)
    return v * (g / norm)
