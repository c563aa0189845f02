"""Safe reading of weight files shared by the text-to-semantic model and the codec.

Weights are only ever read with ``weights_only=True``: a checkpoint is data, and
loading it must never run code from a pickle.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint directory or weight file that cannot be used, with the reason."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``torch.save`` weight file as a flat ``{key: tensor}`` mapping.

    Memory-mapped and with ``weights_only=True``. A Lightning-style
    ``{"state_dict": {...}}`` wrapper is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # corrupt zip, pickle with forbidden globals, ...
        raise CheckpointError(f"cannot read weight file {path}: {exc}") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of tensors, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:5]}")
    return dict(obj)


def check_keys_and_shapes(
    path: str | Path,
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, Iterable[int]],
) -> None:
    """Refuse a state dict that lacks a key or has a tensor of the wrong shape.

    ``expected`` maps every required key to its shape. Extra keys are the caller's
    business (both loaders drop documented extras before calling this).
    """
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise CheckpointError(f"{path}: missing keys {missing[:10]}{more}")
    for key, shape in expected.items():
        want, got = tuple(shape), tuple(state[key].shape)
        if want != got:
            raise CheckpointError(
                f"{path}: shape mismatch for {key}: checkpoint has {list(got)}, "
                f"the config expects {list(want)}"
            )
