"""The model runner: KV-cache slots, prefill into a slot, one batched decode step.

It owns the text-to-semantic model's caches. Each running sequence holds one slot; a
decode step runs every given sequence together, each at its own position with its
own penalty window, sampling parameters and generator (spec §5.3-§5.6).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from s1_mini.model import DualARTransformer
from s1_mini.sampler import BatchSampling, SamplingParams, sample

# Decode steps look back this many frames for the repetition penalty (§5.5).
PENALTY_WINDOW = 16


def decode_frame(model: DualARTransformer, tokens: Tensor, pos: Tensor, slots: Tensor | None,
                 sampling: BatchSampling, slow_history: Tensor | None,
                 fast_history: Tensor | None) -> Tensor:
    """One frame for each sequence of the batch (§5.3).

    ``tokens [B, N+1, T]`` at positions ``pos [B, T]``; ``slow_history [B, H]`` are the
    ids penalized for the slow token and ``fast_history [B, N, W]`` row k the codes
    penalized for codebook k (both None in the prefill). Returns ``[B, N+1]`` int64:
    the token, then codebooks 0..N-1.
    """
    c = model.config
    out = model.forward_slow(tokens, pos, slots)
    token = sample(out.logits, slow_history, sampling)
    # The fast stack sees u0 at position 0; its logits there are discarded.
    model.forward_fast(out.fast_input, 0, slots, logits=False)
    # Codebook 0 = token - S0, clamped below at 0 as in the reference. Deviation: a
    # token past the semantic range (which crashes the reference with an index error)
    # also gives 0.
    code = token - model.semantic_begin_id
    code = torch.where((code >= 0) & (code < c.codebook_size), code, 0)
    codes = [code]
    for k in range(1, c.num_codebooks):
        logits = model.forward_fast(model.fast_embeddings(code), k, slots)
        code = sample(logits, None if fast_history is None else fast_history[:, k], sampling)
        codes.append(code)
    return torch.stack([token, *codes], dim=1)


def penalty_window(history: Tensor, step: int) -> Tensor:
    """The window of decode step ``step`` over ``history [..., N+1, steps]``: columns
    0..15 before step 16 (not-yet-written zeros included), else the 16 previous."""
    start = max(0, step - PENALTY_WINDOW)
    return history[..., start:start + PENALTY_WINDOW]


@dataclass(eq=False)  # identity, like the slot it holds
class SequenceState:
    """One prompt being generated in one cache slot."""

    prompt: Tensor  # [N+1, T] int32
    max_new_tokens: int  # frames, counting the final end frame (§5.2)
    params: SamplingParams
    generator: torch.Generator | None  # None: greedy
    slot: int = -1
    frames: list[Tensor] = field(default_factory=list)  # generated frames [N+1]
    history: Tensor | None = None  # penalty history [N+1, steps]
    finished: bool = False

    @property
    def steps(self) -> int:
        """Decode steps done (the prefill frame is not one)."""
        return max(0, len(self.frames) - 1)

    @property
    def committed(self) -> int:
        """Frames that are final codes: the newest frame is dropped if it turns out to be
        the last one (§5.7), so it is never committed early."""
        return max(0, len(self.frames) - 1)

    def codes(self, start: int = 0, end: int | None = None) -> Tensor:
        """Committed codes ``[N, frames]`` (rows 1..N of the frames) from ``start``."""
        end = self.committed if end is None else end
        if end <= start:
            return self.prompt.new_zeros((self.prompt.shape[0] - 1, 0))
        return torch.stack(self.frames[start:end], dim=1)[1:].to(torch.int32)


class ModelRunner:
    def __init__(self, model: DualARTransformer, im_end_id: int, max_batch_size: int, max_seq_len: int) -> None:
        self.model = model
        self.im_end_id = im_end_id
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.device = model.embeddings.weight.device
        self.dtype = model.embeddings.weight.dtype
        self.free_slots = list(range(max_batch_size))
        # Test hook: called at the start of every prefill and decode step (fault injection).
        self.fault_hook: Callable[[str], None] | None = None
        self.step_fn = decode_frame  # the per-frame decode step; compile() may wrap it
        # Static batch: every step runs all slots (idle ones on dummy input), so a
        # compiled step sees one shape and one cache layout, whatever joins or leaves.
        self.static_batch = False
        self._idle: SequenceState | None = None
        model.setup_caches(max_batch_size, max_seq_len)

    def compile(self, wrap: Callable[[Callable], Callable]) -> None:
        """Wrap the decode step (e.g. with torch.compile) and switch to the static batch.
        The prefill stays eager, as in the reference: its length changes with every prompt."""
        self.step_fn = wrap(decode_frame)
        self.static_batch = True

    def acquire(self, seq: SequenceState) -> None:
        self.free_slots.sort()
        seq.slot = self.free_slots.pop(0)

    def release(self, seq: SequenceState) -> None:
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1

    @torch.inference_mode()
    def prefill(self, seq: SequenceState) -> None:
        """Run the prompt through the model in the sequence's slot; adds the first frame."""
        if self.fault_hook:
            self.fault_hook("prefill")
        T = seq.prompt.shape[1]
        sampling = BatchSampling.build([seq.params], None if seq.generator is None else [seq.generator],
                                       self.dtype, self.device)
        frame = decode_frame(self.model, seq.prompt[None].to(self.device).long(),
                             torch.arange(T, device=self.device)[None],
                             torch.tensor([seq.slot], device=self.device), sampling, None, None)
        seq.frames.append(frame[0])
        seq.history = torch.zeros((frame.shape[1], max(PENALTY_WINDOW, seq.max_new_tokens - 1)),
                                  dtype=torch.long, device=self.device)
        seq.finished = seq.max_new_tokens <= 1

    @torch.inference_mode()
    def decode(self, seqs: Sequence[SequenceState]) -> None:
        """One decode step for every sequence in ``seqs``; each gets one frame."""
        if self.fault_hook:
            self.fault_hook("decode")
        if self.static_batch:  # rows in slot order: no gather, one shape
            rows = [self._idle_row(seqs)] * self.max_batch_size
            for s in seqs:
                rows[s.slot] = s
            slot_tensor = None
        else:
            rows = list(seqs)
            slots = [s.slot for s in rows]
            slot_tensor = None if slots == list(range(len(slots))) else torch.tensor(slots, device=self.device)
        windows = torch.stack([penalty_window(s.history, s.steps) for s in rows])
        generators = [s.generator for s in rows]
        greedy = [g is None for g in generators]
        if any(greedy) and not all(greedy):
            raise ValueError("greedy and sampled sequences cannot share a decode step")
        sampling = BatchSampling.build([s.params for s in rows], None if all(greedy) else generators,
                                       self.dtype, self.device)
        tokens = torch.stack([s.frames[-1] for s in rows])[:, :, None]
        pos = torch.tensor([[s.prompt.shape[1] + s.steps] for s in rows], device=self.device)
        frames = self.step_fn(self.model, tokens, pos, slot_tensor, sampling,
                              slow_history=windows[:, :, 0], fast_history=windows[:, 1:, :])
        ends = (frames[:, 0] == self.im_end_id).tolist()
        for s, frame, end in zip(rows, frames, ends):
            if s is self._idle:
                continue
            s.history[:, s.steps] = frame
            s.frames.append(frame)
            s.finished = end or len(s.frames) >= s.max_new_tokens

    def _idle_row(self, seqs: Sequence[SequenceState]) -> SequenceState:
        """The dummy row run in free slots of a static batch: position 0 of its own slot
        (which the next prefill there overwrites), results dropped."""
        if self._idle is None:
            n = self.model.config.num_codebooks + 1
            self._idle = SequenceState(torch.zeros((n, 0), dtype=torch.int32), 2, SamplingParams(), None)
            self._idle.frames.append(torch.zeros(n, dtype=torch.long, device=self.device))
            self._idle.history = torch.zeros((n, PENALTY_WINDOW), dtype=torch.long, device=self.device)
            self._idle_generator = torch.Generator(self.device)
        self._idle.generator = None if seqs[0].generator is None else self._idle_generator
        return self._idle
