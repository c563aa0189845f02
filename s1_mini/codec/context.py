"""Left context of the causal layers: what makes offline and incremental decode one code path.

Every stage of the codec is causal (spec §8), so a layer's output for new input only
needs a fixed number of earlier input samples: ``K_eff − 1`` for a stride-1 conv, one
sample for a transposed conv with ``k = 2s``, the last ``window − 1`` keys and values
for windowed attention. A :class:`LeftContext` supplies those samples for one batched
call: zeros for an offline call (exactly the zero left padding of the reference), or,
for incremental decode, a :class:`SlotContext` reads each stream's samples kept from its
previous call and keeps the new ones. An offline decode is a call on fresh streams, so
streaming cannot drift from it.

Time is dim 1 of every tensor here (activations are time-major, ``[B, L, ...]``). A
layer asks for its ``past`` samples, builds its input ``[past, x]`` itself (a conv
fuses that copy with its activation), and hands it back to ``keep``.

Streams in a batch may get different numbers of new frames: the caller right-pads to
the longest; because every layer is causal the padding never reaches a stream's valid
outputs, and the context kept for the next call is taken from each stream's own last
valid samples.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
import torch.nn.functional as F
from torch import Tensor


class LeftContext:
    """Zero left context: an offline call, every stream from frame 0, ``frames`` each."""

    def __init__(self, batch: int, frames: int, device: torch.device | str) -> None:
        self.batch = batch
        self.max_frames = frames  # new frames per stream, padding included
        self.start = torch.zeros(batch, dtype=torch.long, device=device)  # first new frame's index
        self.end_frame = frames  # exclusive bound on the frame indices of this call

    def steps_per_frame(self, x: Tensor) -> int:
        """Samples per code frame at a layer whose input is ``x``."""
        return x.shape[1] // self.max_frames

    def past(self, key: Hashable, x: Tensor, size: int) -> Tensor | None:
        """The ``size`` samples before ``x`` (``[B, size, ...]``); None when they are all zeros."""
        return None

    def keep(self, key: Hashable, full: Tensor, size: int) -> None:
        """``full`` is ``x`` after its ``size`` past samples: keep what the next call's ``past`` needs."""

    def extend(self, key: Hashable, x: Tensor, size: int) -> Tensor:
        """``x`` with its ``size`` previous samples prepended (and kept)."""
        if size == 0:
            return x
        past = self.past(key, x, size)
        # F.pad: one kernel (no zeros tensor, then a copy).
        full = F.pad(x, [0, 0] * (x.dim() - 2) + [size, 0]) if past is None else torch.cat([past, x], 1)
        self.keep(key, full, size)
        return full

    def positions(self, steps: int, count: int) -> Tensor:
        """Absolute positions ``[B, count]`` of the new steps at ``steps`` per frame."""
        first = self.start * steps
        return first[:, None] + torch.arange(count, device=first.device)


class SlotContext(LeftContext):
    """Left context of streams that live in fixed slots: ``store[key]`` holds every
    slot's last samples for one layer (``[slots, size, ...]``, made on first use), and a
    call runs slots ``0..rows-1``. Row ``b`` decodes ``frames[b]`` valid new frames (0
    leaves its context as it was) from frame ``start[b]``; ``start[b] == 0`` is a fresh
    stream, whose context is zeros whatever the slot held. Shapes depend only on ``rows``
    and ``max_frames`` and nothing is read back to the host, so a call can be replayed as
    a CUDA graph. Frame indices are clamped below ``end_frame`` (the positions table)."""

    def __init__(self, store: dict[Hashable, Tensor], slots: int, frames: Tensor, start: Tensor,
                 max_frames: int, end_frame: int) -> None:
        self.store = store
        self.slots = slots
        self.batch = frames.shape[0]
        self.frames = frames
        self.start = start
        self.max_frames = max_frames
        self.end_frame = end_frame

    def past(self, key: Hashable, x: Tensor, size: int) -> Tensor | None:
        if size == 0:
            return None
        if key not in self.store:
            self.store[key] = x.new_zeros((self.slots, size, *x.shape[2:]))
        fresh = (self.start == 0).view([-1] + [1] * (x.dim() - 1))
        return torch.where(fresh, 0, self.store[key][: self.batch])

    def keep(self, key: Hashable, full: Tensor, size: int) -> None:
        if size == 0:
            return
        kept = self.store[key][: self.batch]
        # Row b's valid samples end at size + frames[b]·steps.
        steps = (full.shape[1] - size) // self.max_frames
        index = (self.frames * steps)[:, None] + torch.arange(size, device=full.device)
        index = index.view([self.batch, size] + [1] * (full.dim() - 2))
        kept.copy_(full.gather(1, index.expand(kept.shape)))

    def positions(self, steps: int, count: int) -> Tensor:
        return super().positions(steps, count).clamp(max=self.end_frame * steps - 1)
