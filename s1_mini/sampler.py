"""Sampling of one logit vector per sequence, with the reference's quirks (spec §5.4).

Every function works on a batch ``[B, V]`` with per-row parameters, so sequences with
different temperatures, top-p, penalties and seeds can share a decode step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

TEMPERATURE_FLOOR = 1e-5


def bf16_round(x: float) -> float:
    """PyPI fish-speech 0.1.0 builds its sampling parameters as bfloat16 tensors, so
    even float32 runs use bf16-rounded values (1.3 -> 1.296875)."""
    return torch.tensor(x, dtype=torch.bfloat16).item()


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.8
    repetition_penalty: float = 1.1

    def validate(self) -> None:
        """The reference's generator asserts these open/closed ranges."""
        rules = [
            ("temperature", lambda v: 0 < v < 2, "0 < temperature < 2"),
            ("top_p", lambda v: 0 < v <= 1, "0 < top_p <= 1"),
            ("repetition_penalty", lambda v: 0 < v < 2, "0 < repetition_penalty < 2"),
        ]
        for name, ok, rule in rules:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise ValueError(f"{name}: must satisfy {rule}, got {value!r}")

    def effective(self) -> tuple[float, float, float]:
        """(temperature, top_p, repetition_penalty) as the reference uses them."""
        temperature = max(bf16_round(self.temperature), bf16_round(TEMPERATURE_FLOOR))
        return temperature, bf16_round(self.top_p), bf16_round(self.repetition_penalty)


@dataclass
class BatchSampling:
    """Per-row effective parameters ``[B, 1]`` in the logits dtype, and per-row RNGs
    (``generators=None``: greedy, i.e. argmax of the penalized logits)."""

    temperature: Tensor
    top_p: Tensor
    repetition_penalty: Tensor
    generators: Sequence[torch.Generator] | None

    @classmethod
    def build(cls, params: Sequence[SamplingParams], generators: Sequence[torch.Generator] | None,
              dtype: torch.dtype, device: torch.device | str) -> "BatchSampling":
        values = torch.tensor([p.effective() for p in params], dtype=torch.float32)
        t, p, r = values.to(device=device, dtype=dtype).unsqueeze(-1).unbind(1)
        return cls(t, p, r, generators)


def apply_repetition_penalty(logits: Tensor, history: Tensor, penalty: Tensor) -> Tensor:
    """Penalize every id in ``history [B, H]`` once, from its original value:
    negative logits are multiplied by the penalty, others divided."""
    picked = logits.gather(1, history)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(1, history, picked)


def sample(logits: Tensor, history: Tensor | None, s: BatchSampling) -> Tensor:
    """Draw one id per row of ``logits [B, V]``; returns int64 ``[B]``.

    Order as in the reference: penalty, then top-p on the untempered distribution
    (the crossing token is removed, the first is always kept), then temperature,
    softmax and an exponential-race draw. No top-k.
    """
    if history is not None:
        logits = apply_repetition_penalty(logits, history.long(), s.repetition_penalty)
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > s.top_p
    remove[:, 0] = False
    remove = remove.scatter(1, order, remove)
    logits = logits.masked_fill(remove, float("-inf"))
    probs = F.softmax(logits / s.temperature, dim=-1)
    if s.generators is None:
        return probs.argmax(dim=-1)
    noise = torch.empty_like(probs)
    for row, generator in enumerate(s.generators):
        noise[row].exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)
