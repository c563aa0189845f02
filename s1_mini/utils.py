"""Small runtime helpers."""

from __future__ import annotations

import torch

_GIB = 1024 ** 3


def get_vram_info(device: torch.device | str | int | None = None) -> dict[str, float | bool]:
    """GPU memory of ``device`` (default: the current CUDA device), in GiB.

    ``used_gb`` is what the whole GPU has in use (other processes included, from
    ``cudaMemGetInfo``); ``allocated_gb`` and ``reserved_gb`` are this process's tensors
    and its caching allocator's pool. ``utilization`` is ``used / total`` in [0, 1].
    Without CUDA, or for a non-CUDA device, ``available`` is False and the numbers 0.
    """
    if device is not None and not isinstance(device, int):
        device = torch.device(device)
        if device.type != "cuda":
            return _unavailable()
    if not torch.cuda.is_available():
        return _unavailable()
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    return {
        "available": True,
        "used_gb": used / _GIB,
        "total_gb": total / _GIB,
        "allocated_gb": torch.cuda.memory_allocated(device) / _GIB,
        "reserved_gb": torch.cuda.memory_reserved(device) / _GIB,
        "utilization": used / total if total else 0.0,
    }


def _unavailable() -> dict[str, float | bool]:
    return {"available": False, "used_gb": 0.0, "total_gb": 0.0, "allocated_gb": 0.0,
            "reserved_gb": 0.0, "utilization": 0.0}
