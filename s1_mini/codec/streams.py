"""Incremental decode of many audio streams at once, on the device, in CUDA graphs.

Each stream holds a slot; every layer's left context for every slot lives in one
device buffer (a :class:`SlotContext` store), so a step over slots ``0..rows-1`` with
``chunk_frames`` new frames per row (right-padded) has static shapes and never reads
the device from the host: on CUDA it is captured once per bucket of rows and replayed.
The caller launches a step, runs a decode step of the text-to-semantic model, then
collects the audio: one host round trip for both. They share the current CUDA stream:
with this step on a side stream, overlapping the decode graph, an engine on an H100 hung
in the first round with a registered voice (the scheduler waiting on the device), while
the same sweep on one stream ran every round; overlap waits until that is understood.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import numpy as np
import torch
from torch import Tensor

from s1_mini.compilation import buckets, capture_graph

from .context import SlotContext
from .model import Codec
from .transformer import WindowedTransformer

# Frame indices a stream's positions table covers (50 minutes of audio); a longer
# stream keeps decoding with the last position.
MAX_STREAM_FRAMES = 1 << 16


class CodecStreams:
    """Up to ``slots`` streams, each decoding at most ``chunk_frames`` new frames per step.

    ``open()`` a stream, ``launch([(slot, codes [N, n]), ...])`` the next frames of any
    of them, ``collect()`` their audio (``n · frame_length`` samples each, float32);
    together a stream's chunks equal the offline decode of its codes. ``close(slot)``
    when it ends.
    """

    def __init__(self, codec: Codec, slots: int, chunk_frames: int) -> None:
        self.codec = codec
        self.slots = slots
        self.chunk_frames = chunk_frames
        self.device = codec.device
        self.free = list(range(slots))
        self.position = [0] * slots  # frames each slot's stream has decoded
        n = codec.config.num_codebooks
        # One row per slot: the codes (N x chunk_frames), the valid frames, the first
        # frame's index; built on the host and copied to the device in one transfer.
        width = n * chunk_frames + 2
        cuda = self.device.type == "cuda"
        self.host_inputs = torch.zeros(slots, width, dtype=torch.long, pin_memory=cuda)
        self.inputs = torch.zeros(slots, width, dtype=torch.long, device=self.device)
        self.context: dict[Hashable, Tensor] = {}
        self.buckets = buckets(slots)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._tables: list[Tensor] = []  # positions tables the graphs read (see compile)
        self._launched: tuple[list[tuple[int, int]], Tensor] | None = None

    def open(self) -> int:
        """A slot for a new stream (at frame 0, zero context)."""
        if not self.free:
            raise RuntimeError(f"all {self.slots} codec stream slots are in use")
        self.free.sort()
        slot = self.free.pop(0)
        self.position[slot] = 0
        return slot

    def close(self, slot: int) -> None:
        if slot not in self.free:
            self.free.append(slot)

    @torch.inference_mode()
    def compile(self, wrap: Callable[[Callable], Callable]) -> None:
        """Compile the codec's element-wise passes (``wrap``, dynamic shapes) and, on CUDA,
        capture a step per bucket of rows, largest first (the others reuse its memory)."""
        self.codec.compile_pointwise(wrap)
        if self.device.type != "cuda":
            return
        pool = torch.cuda.graph_pool_handle()
        for rows in reversed(self.buckets):
            self.graphs[rows] = capture_graph(lambda: self._step(rows), pool)
        # A captured step holds the addresses of the transformers' positions tables,
        # made at their full size by the warm-up runs: keep those tables alive.
        self._tables = [m._rope for m in self.codec.modules() if isinstance(m, WindowedTransformer)]
        torch.cuda.synchronize()

    @torch.inference_mode()
    def launch(self, chunks: Sequence[tuple[int, Tensor]]) -> None:
        """Start decoding ``codes [N, n]`` (1 <= n <= chunk_frames) for each ``(slot, codes)``
        (on CUDA: queued on the device while the host goes on)."""
        if self._launched is not None:
            raise RuntimeError("collect() the launched step first")
        n_codebooks, k = self.codec.config.num_codebooks, self.chunk_frames
        # The smallest bucket that holds the highest slot (eager too: the same rows run).
        rows = next(b for b in self.buckets if b > max(slot for slot, _ in chunks))
        # Rows without new frames keep their context: no valid frames, and their stream's
        # own position (a start of 0 would mean a fresh stream and clear it).
        self.host_inputs[:rows, -2] = 0
        self.host_inputs[:rows, -1] = torch.tensor(self.position[:rows])
        order = []
        for slot, codes in chunks:
            n = codes.shape[1]
            if codes.shape[0] != n_codebooks or not 1 <= n <= k:
                raise ValueError(f"expected codes [{n_codebooks}, 1..{k}], got {list(codes.shape)}")
            row = self.host_inputs[slot]
            row[: n_codebooks * k].view(n_codebooks, k)[:, :n] = codes
            row[-2] = n
            self.position[slot] += n
            order.append((slot, n))
        if self.graphs:
            graph, audio = self.graphs[rows]
            self.inputs[:rows].copy_(self.host_inputs[:rows], non_blocking=True)
            graph.replay()
        else:
            self.inputs[:rows].copy_(self.host_inputs[:rows])
            audio = self._step(rows)
        self._launched = (order, audio)

    def collect(self) -> list[np.ndarray]:
        """The audio of the launched step, one array per chunk, in launch order."""
        if self._launched is None:
            raise RuntimeError("no step was launched")
        order, audio = self._launched
        self._launched = None
        audio = audio.cpu()
        frame = self.codec.config.frame_length
        return [audio[slot, : n * frame].numpy() for slot, n in order]

    def _step(self, rows: int) -> Tensor:
        """Decode slots ``0..rows-1`` from ``self.inputs``; returns ``[rows, chunk_frames · frame_length]``."""
        n, k = self.codec.config.num_codebooks, self.chunk_frames
        inputs = self.inputs[:rows]
        codes = inputs[:, : n * k].view(rows, n, k)
        ctx = SlotContext(self.context, self.slots, inputs[:, -2], inputs[:, -1], k, MAX_STREAM_FRAMES)
        return self.codec._decode(codes, ctx)
