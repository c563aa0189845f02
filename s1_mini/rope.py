"""Interleaved rotary position embedding with the reference's bf16-rounded table.

Shared by the text-to-semantic model (spec text2semantic §4.3-4.4) and the codec's
transformers (spec codec §4.5): both round cos/sin to bfloat16 in every precision and
rotate adjacent pairs (x[2k], x[2k+1]) in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_table(length: int, head_dim: int, base: float, device: torch.device | str = "cpu") -> Tensor:
    """``[length, head_dim/2, 2]`` (cos, sin) in bfloat16.

    Angles in float32, turned into cos/sin by ``torch.polar`` as the reference does:
    ``torch.cos``/``torch.sin`` round a few entries differently once in bf16.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    rotation = torch.polar(torch.ones_like(angles), angles)
    return torch.stack([rotation.real, rotation.imag], dim=-1).to(torch.bfloat16)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate adjacent pairs of ``x [B, T, H, d]`` by ``table [B, T, d/2, 2]`` in
    float32; the result has the input dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = table.float().unsqueeze(2).unbind(-1)
    a, b = pairs.unbind(-1)
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).to(x.dtype)
