"""Sampling of one logit vector per sequence, with the reference's quirks (spec §5.4).

Every function works on a batch ``[B, V]`` with per-row parameters, so sequences with
different temperatures, top-p, penalties and seeds can share a decode step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


# Exponential noise for one draw: ``noise(probs [B, V], draw) -> [B, V]``, where
# ``draw`` (an int or a 0-d tensor) numbers the draws of one frame (0 = the slow token,
# k = codebook k).
NoiseFn = Callable[[Tensor, "int | Tensor"], Tensor]


@dataclass
class BatchSampling:
    """Per-row effective parameters ``[B, 1]`` in the logits dtype and the noise source
    (``noise=None``: every row greedy, i.e. argmax of the penalized logits;
    ``greedy [B]``: rows drawn greedily although a noise source is given)."""

    temperature: Tensor
    top_p: Tensor
    repetition_penalty: Tensor
    noise: NoiseFn | None
    greedy: Tensor | None = None

    @classmethod
    def build(cls, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None] | None,
              dtype: torch.dtype, device: torch.device | str) -> "BatchSampling":
        values = torch.tensor([p.effective() for p in params], dtype=torch.float32)
        t, p, r = values.to(device=device, dtype=dtype).unsqueeze(-1).unbind(1)
        return cls(t, p, r, None if generators is None else generator_noise(generators))


def generator_noise(generators: Sequence[torch.Generator | None]) -> NoiseFn:
    """Row ``b`` draws from ``generators[b]`` in call order, as the reference draws from
    its seeded global RNG (a row without a generator gets ones: no effect on argmax).
    A Python loop over rows: eager only."""

    def noise(probs: Tensor, draw: int | Tensor) -> Tensor:
        out = torch.ones_like(probs)
        for row, generator in enumerate(generators):
            if generator is not None:
                out[row].exponential_(1, generator=generator)
        return out

    return noise


_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32), in two 16-bit halves of ``c``
    so that no product overflows int64 (signed overflow is not defined on every backend)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (the "lowbias32" finalizer) of int64 values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_noise(seed: Tensor, step: Tensor) -> NoiseFn:
    """Noise that is a pure function of (seed, step, draw, vocabulary id) per row:
    ``seed [B]`` int64 >= 0, ``step [B]`` the row's decode step (-1: the prefill).

    Deviation from the reference (whose seeded draws come from one global RNG stream):
    no RNG state, so the whole decode step, sampling included, can be replayed as a CUDA
    graph, and a seeded request gives the same codes alone or in any batch."""

    def noise(probs: Tensor, draw: int | Tensor) -> Tensor:
        key = _mix32(_mix32(seed & _M32) ^ (seed >> 32))
        key = _mix32(key ^ ((step * 64 + draw) & _M32))
        ids = torch.arange(probs.shape[-1], device=probs.device)
        bits = _mix32(key[:, None] ^ _mix32(ids)[None])
        uniform = ((bits >> 8).to(torch.float32) + 0.5) * 2.0 ** -24  # in (0, 1), never 0 or 1
        return (-torch.log(uniform)).to(probs.dtype)

    return noise


@torch.library.custom_op("s1_mini::cumsum_last_dim", mutates_args=())
def cumsum_last_dim(x: Tensor) -> Tensor:
    """``torch.cumsum(x, -1)``, opaque to inductor, which then calls the ATen kernel:
    inductor's own scan fails to generate code for a batch of vocabulary-sized rows
    (torch 2.11: SplitScan "list indices must be integers", or "NYI TritonSplitDimKernel")."""
    return torch.cumsum(x, dim=-1)


@cumsum_last_dim.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


# Rows longer than this are reduced (softmax, argmax) in chunks of this many entries:
# inductor gives a softmax or an argmax one program per row (it does not split such a
# reduction), so the slow token's draw over a 64 x 155,776 batch ran on 64 programs,
# 2.2 ms of a 8.3 ms decode step on an H100.
CHUNK = 4096


def _chunked(x: Tensor, fill: float) -> Tensor:
    """``x [B, V]`` as ``[B, ceil(V / CHUNK), CHUNK]``, the end padded with ``fill``."""
    B, V = x.shape
    chunks = -(-V // CHUNK)
    return F.pad(x, (0, chunks * CHUNK - V), value=fill).view(B, chunks, CHUNK)


def argmax_last(x: Tensor) -> Tensor:
    """``x.argmax(-1)`` of ``x [B, V]`` (the first index of the maximum), computed as
    the maximum of each chunk of the row, then the first chunk that holds the row's."""
    if x.shape[1] <= CHUNK:
        return x.argmax(-1)
    best, where = _chunked(x, float("-inf")).max(-1)
    chunk = best.argmax(-1)
    return chunk * CHUNK + where.gather(1, chunk[:, None])[:, 0]


def softmax_last(x: Tensor) -> Tensor:
    """``F.softmax(x, -1)`` of ``x [B, V]`` in its dtype, computed in float32 (as
    softmax does for half precision) with the row's maximum and sum taken in chunks."""
    if x.shape[1] <= CHUNK:
        return F.softmax(x, dim=-1)
    x32 = x.float()
    top = _chunked(x32, float("-inf")).amax(-1).amax(-1, keepdim=True)
    e = torch.exp(x32 - top)
    return (e / _chunked(e, 0.0).sum(-1).sum(-1, keepdim=True)).to(x.dtype)


def apply_repetition_penalty(logits: Tensor, history: Tensor, penalty: Tensor) -> Tensor:
    """Penalize every id in ``history [B, H]`` once, from its original value:
    negative logits are multiplied by the penalty, others divided."""
    picked = logits.gather(1, history)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(1, history, picked)


def sample(logits: Tensor, history: Tensor | None, s: BatchSampling, draw: int | Tensor = 0) -> Tensor:
    """Draw one id per row of ``logits [B, V]``; returns int64 ``[B]``.

    Order as in the reference: penalty, then top-p on the untempered distribution
    (the crossing token is removed, the first is always kept), then temperature,
    softmax and an exponential-race draw. No top-k.
    """
    if history is not None:
        logits = apply_repetition_penalty(logits, history.long(), s.repetition_penalty)
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = cumsum_last_dim(softmax_last(sorted_logits))
    remove = cumulative > s.top_p
    remove[:, 0] = False
    remove = remove.scatter(1, order, remove)
    logits = logits.masked_fill(remove, float("-inf"))
    probs = softmax_last(logits / s.temperature)
    if s.noise is None:
        return argmax_last(probs)
    drawn = argmax_last(probs / s.noise(probs, draw))
    return drawn if s.greedy is None else torch.where(s.greedy, argmax_last(probs), drawn)
