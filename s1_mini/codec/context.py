"""Left context of the causal layers: what makes offline and incremental decode one code path.

Every stage of the codec is causal (spec §8), so a layer's output for new input only
needs a fixed number of earlier input samples: ``K_eff − 1`` for a stride-1 conv, one
sample for a transposed conv with ``k = 2s``, the last ``window − 1`` keys and values
for windowed attention. A :class:`LeftContext` supplies those samples for one batched
call: zeros for an offline call (exactly the zero left padding of the reference), or,
for incremental decode, a :class:`SlotContext` reads each stream's samples kept from its
previous call and keeps the new ones. An offline decode is a call on fresh streams, so
streaming cannot drift from it.

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

    def steps_per_frame(self, x: Tensor, dim: int) -> int:
        """Samples per code frame at a layer whose input is ``x`` (time along ``dim``)."""
        return x.shape[dim] // self.max_frames

    def extend(self, key: Hashable, x: Tensor, size: int, dim: int = -1) -> Tensor:
        """``x`` with its ``size`` previous samples prepended along ``dim``."""
        if size == 0:
            return x
        dim = dim % x.dim()
        return F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [size, 0])  # one kernel: no zeros, then a copy

    def positions(self, steps: int, count: int) -> Tensor:
        """Absolute positions ``[B, count]`` of the new steps at ``steps`` per frame."""
        first = self.start * steps
        return first[:, None] + torch.arange(count, device=first.device)


class SlotContext(LeftContext):
    """Left context of streams that live in fixed slots: ``store[key]`` holds every
    slot's last samples for one layer (``[slots, ...]``, made on first use), and a call
    runs slots ``0..rows-1``. Row ``b`` decodes ``frames[b]`` valid new frames (0 leaves
    its context as it was) from frame ``start[b]``; ``start[b] == 0`` is a fresh stream,
    whose context is zeros whatever the slot held. Shapes depend only on ``rows`` and
    ``max_frames`` and nothing is read back to the host, so a call can be replayed as a
    CUDA graph. Frame indices are clamped below ``end_frame`` (the positions table)."""

    def __init__(self, store: dict[Hashable, Tensor], slots: int, frames: Tensor, start: Tensor,
                 max_frames: int, end_frame: int) -> None:
        self.store = store
        self.slots = slots
        self.batch = frames.shape[0]
        self.frames = frames
        self.start = start
        self.max_frames = max_frames
        self.end_frame = end_frame

    def extend(self, key: Hashable, x: Tensor, size: int, dim: int = -1) -> Tensor:
        """As :meth:`LeftContext.extend`, from the slots' kept samples; keeps the last
        ``size`` valid samples of the result for the next call."""
        if size == 0:
            return x
        dim = dim % x.dim()
        if key not in self.store:
            shape = list(x.shape)
            shape[0], shape[dim] = self.slots, size
            self.store[key] = x.new_zeros(shape)
        kept = self.store[key][: self.batch]
        fresh = (self.start == 0).view([-1] + [1] * (x.dim() - 1))
        full = torch.cat([torch.where(fresh, 0, kept), x], dim)
        # Row b's valid samples end at size + frames[b]·steps.
        steps = self.steps_per_frame(x, dim)
        index = (self.frames * steps)[:, None] + torch.arange(size, device=x.device)
        view = [1] * x.dim()
        view[0], view[dim] = self.batch, size
        kept.copy_(full.gather(dim, index.view(view).expand(kept.shape)))
        return full

    def positions(self, steps: int, count: int) -> Tensor:
        return super().positions(steps, count).clamp(max=self.end_frame * steps - 1)
