"""Left context of the causal layers: what makes offline and incremental decode one code path.

Every stage of the codec is causal (spec §8), so a layer's output for new input only
needs a fixed number of earlier input samples: ``K_eff − 1`` for a stride-1 conv, one
sample for a transposed conv with ``k = 2s``, the last ``window − 1`` keys and values
for windowed attention. A :class:`LeftContext` carries those samples for one batched
call: zeros for a fresh stream (exactly the zero left padding of the reference) or the
samples kept from the previous call of the same stream. An offline decode is a single
call on fresh streams, so streaming cannot drift from it.

Streams in a batch may get different numbers of new frames: the caller right-pads to
the longest; because every layer is causal the padding never reaches a stream's valid
outputs, and the context kept for the next call is taken from each stream's own last
valid samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import torch
from torch import Tensor


@dataclass
class CodecStreamState:
    """One incremental-decode stream: frames decoded so far and each layer's left context.

    The context tensors keep a leading batch axis of 1 and are keyed by the layers of the
    codec that created the state, so a state only works with that codec. A fresh stream
    has no entries: its context is zeros.
    """

    frames: int = 0
    context: dict[Hashable, Tensor] = field(default_factory=dict)


class LeftContext:
    """Previous samples of every causal layer for one batched call.

    ``start[b]``: absolute frame index of the first new frame of stream ``b`` (RoPE
    positions); ``frames[b]``: how many of the (right-padded) new frames are valid.
    With ``keep`` the context for the next call is recorded in :attr:`kept`.
    """

    def __init__(
        self,
        frames: Tensor,
        start: Tensor | None = None,
        previous: list[dict[Hashable, Tensor]] | None = None,
        keep: bool = False,
    ) -> None:
        self.frames = frames
        self.start = torch.zeros_like(frames) if start is None else start
        self.previous = previous or [{} for _ in range(frames.numel())]
        self.keep = keep
        self.max_frames = int(frames.max())
        self.uniform = bool((frames == self.max_frames).all())
        self.kept: dict[Hashable, Tensor] = {}

    @classmethod
    def fresh(cls, batch: int, frames: int, device: torch.device | str) -> "LeftContext":
        """Context for an offline call: every stream starts at frame 0 with zero context."""
        return cls(torch.full((batch,), frames, dtype=torch.long, device=device))

    def steps_per_frame(self, x: Tensor, dim: int) -> int:
        """Samples per code frame at a layer whose input is ``x`` (time along ``dim``)."""
        return x.shape[dim] // self.max_frames

    def extend(self, key: Hashable, x: Tensor, size: int, dim: int = -1) -> Tensor:
        """``x`` with its ``size`` previous samples prepended along ``dim``.

        Records, when keeping, the last ``size`` valid samples of the result as the
        context of the next call.
        """
        if size == 0:
            return x
        dim = dim % x.dim()
        shape = list(x.shape)
        shape[0], shape[dim] = 1, size
        prev = [p.get(key) for p in self.previous]
        if all(p is None for p in prev):
            prev_batch = x.new_zeros([x.shape[0], *shape[1:]])
        else:
            prev_batch = torch.cat([x.new_zeros(shape) if p is None else p for p in prev])
        full = torch.cat([prev_batch, x], dim)
        if self.keep:
            self.kept[key] = self._tail(full, size, dim, self.steps_per_frame(x, dim))
        return full

    def _tail(self, full: Tensor, size: int, dim: int, steps: int) -> Tensor:
        if self.uniform:
            return full.narrow(dim, full.shape[dim] - size, size)
        # Stream b's valid samples end at size + frames[b]·steps.
        end = size + self.frames * steps
        index = end[:, None] - size + torch.arange(size, device=full.device)
        view = [1] * full.dim()
        view[0], view[dim] = full.shape[0], size
        target = list(full.shape)
        target[dim] = size
        return full.gather(dim, index.view(view).expand(target))

    def positions(self, steps: int, count: int) -> Tensor:
        """Absolute positions ``[B, count]`` of the new steps at ``steps`` per frame."""
        first = self.start * steps
        return first[:, None] + torch.arange(count, device=first.device)
