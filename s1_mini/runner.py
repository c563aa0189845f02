"""The model runner: KV-cache slots, prefill into a slot, one batched decode step.

It owns the text-to-semantic model's caches and, per slot, the state a decode step
reads and advances (last frame, position, penalty window, sampling parameters, seed).
Each running sequence holds one slot; a decode step runs the slots together, each at
its own position (spec §5.3-§5.6). Compiled on CUDA, decode and prefill are replayed
as CUDA graphs (one per batch bucket, one per prompt-length bucket), and a voice's
prompt part can come from the prefix cache.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from s1_mini.compilation import buckets, capture_graph
from s1_mini.model import BlockFn, DualARTransformer, HeadFn, run_block, run_head
from s1_mini.sampler import BatchSampling, NoiseFn, SamplingParams, counter_noise, generator_noise, sample

SampleFn = Callable[[Tensor, Tensor | None, BatchSampling, "int | Tensor"], Tensor]

# Decode steps look back this many frames for the repetition penalty (§5.5).
PENALTY_WINDOW = 16
# The shortest attention length a step runs: below it, a step's cost hardly depends on it.
KV_SMALLEST = 256
# Prompts up to this long are prefilled in batches by captured graphs; longer ones one by
# one (graphs for every batch size of every length would multiply start-up and memory).
BATCHED_PREFILL_LENGTH = 512


def decode_frame(model: DualARTransformer, tokens: Tensor, pos: Tensor, slots: Tensor | None,
                 sampling: BatchSampling, slow_history: Tensor | None,
                 fast_history: Tensor | None, sample_fn: SampleFn = sample, block: BlockFn = run_block,
                 at: Tensor | None = None, kv_len: int | None = None, head: HeadFn = run_head) -> Tensor:
    """One frame for each sequence of the batch (§5.3).

    ``tokens [B, N+1, T]`` at positions ``pos [B, T]``; ``slow_history [B, H]`` are the
    ids penalized for the slow token and ``fast_history [N, B, W]`` entry k the codes
    penalized for codebook k (both None in the prefill). The frame follows position
    ``at [B]`` (default: the last); the slow stack attends to the first ``kv_len``
    cache positions (default: all). Returns ``[B, N+1]`` int64: the token, then
    codebooks 0..N-1.
    """
    c = model.config
    out = model.forward_slow(tokens, pos, slots, block=block, at=at, kv_len=kv_len)
    # The draw index as a tensor: a compiled sampler given a Python int compiles once per value.
    draws = torch.arange(c.num_codebooks, device=tokens.device)
    token = sample_fn(out.logits, slow_history, sampling, draws[0])
    # The fast stack sees u0 at position 0; its logits there are discarded.
    model.forward_fast(out.fast_input, 0, slots, logits=False, block=block)
    # Codebook 0 = token - S0, clamped below at 0 as in the reference. Deviation: a
    # token past the semantic range (which crashes the reference with an index error)
    # also gives 0.
    code = token - model.semantic_begin_id
    code = torch.where((code >= 0) & (code < c.codebook_size), code, 0)
    codes = [code]
    for k in range(1, c.num_codebooks):
        logits = model.forward_fast(model.fast_embeddings(code), k, slots, block=block, head=head)
        code = sample_fn(logits, None if fast_history is None else fast_history[k], sampling, draws[k])
        codes.append(code)
    return torch.stack([token, *codes], dim=1)


class SlotState:
    """What a decode step needs of every cache slot, on the model's device, so that a
    step reads and advances it without the host (and can be replayed as a CUDA graph).

    Per slot: the last frame (the next step's input), the next position, the decode
    step (for counter noise), the sampling parameters, the seed, whether it is greedy,
    and the penalty window as a ring of the last ``PENALTY_WINDOW`` frames. The ring
    holds the same ids as the reference's window (§5.5): before step 16 the frames so
    far plus zeros, then the 16 previous; the codebooks' penalty treats it as a set.
    The ring is codebook-major (``[N+1, slots, W]``) so that one codebook's windows over
    the rows are contiguous, like the slow token's gathered ones: the compiled sampler
    then sees one layout of its penalty history (a strided one cost it extra graphs).
    """

    def __init__(self, slots: int, width: int, max_pos: int, dtype: torch.dtype, device: torch.device) -> None:
        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.max_pos = max_pos
        self.last = zeros(slots, width)
        self.pos = zeros(slots)
        self.step = zeros(slots)
        self.ring = zeros(width, slots, PENALTY_WINDOW)
        self.seed = zeros(slots)
        self.greedy = zeros(slots, dtype=torch.bool)
        self.temperature = zeros(slots, dtype=dtype)
        self.top_p = zeros(slots, dtype=dtype)
        self.penalty = zeros(slots, dtype=dtype)

    def reset(self, slot: int, frame: Tensor, pos: int, params: SamplingParams, seed: int | None) -> None:
        """A sequence enters ``slot`` after its prefill produced ``frame`` at ``pos - 1``."""
        self.last[slot] = frame
        self.pos[slot] = pos
        self.step[slot] = 0
        self.ring[:, slot] = 0
        self.seed[slot] = (seed or 0) % 2**63
        self.greedy[slot] = seed is None
        t, p, r = params.effective()
        self.temperature[slot], self.top_p[slot], self.penalty[slot] = t, p, r

    def sampling(self, rows: int, noise: NoiseFn | None) -> BatchSampling:
        """The first ``rows`` slots' parameters; ``noise=None``: counter noise."""
        if noise is None:
            noise = counter_noise(self.seed[:rows], self.step[:rows])
        return BatchSampling(self.temperature[:rows, None], self.top_p[:rows, None], self.penalty[:rows, None],
                             noise, self.greedy[:rows])

    def advance(self, rows: int, frames: Tensor) -> None:
        """Record ``frames [rows, N+1]`` as the first ``rows`` slots' newest frames. Free
        slots run along on dummy state: their position stops at the cache's end."""
        column = (self.step[:rows] % PENALTY_WINDOW)[None, :, None].expand(frames.shape[1], -1, 1)
        self.ring[:, :rows].scatter_(2, column, frames.T[:, :, None])
        self.last[:rows] = frames
        self.pos[:rows] = (self.pos[:rows] + 1).clamp(max=self.max_pos)
        self.step[:rows] += 1


def decode_step(model: DualARTransformer, state: SlotState, rows: int, noise: NoiseFn | None = None,
                sample_fn: SampleFn = sample, block: BlockFn = run_block, kv_len: int | None = None,
                head: HeadFn = run_head) -> Tensor:
    """One frame for slots ``0..rows-1`` from their state, which it then advances;
    attention reads the first ``kv_len`` cache positions, which must cover every
    running row's position. Returns the frames ``[rows, N+1]``. Pure tensor work, so it
    can be captured in a CUDA graph (``noise=None``: counter noise)."""
    window = state.ring[:, :rows]
    # The slow token's penalty ids are the window's first column, all N+1 rows of it,
    # as in the reference (§5.5): in the ring, column 0 until it wraps, then the oldest.
    step = state.step[:rows]
    first = torch.where(step >= PENALTY_WINDOW, step % PENALTY_WINDOW, 0)
    columns = first[:, None, None].expand(-1, window.shape[0], 1)
    slow_history = window.transpose(0, 1).gather(2, columns)[:, :, 0]  # [rows, N+1], a new tensor
    frames = decode_frame(model, state.last[:rows, :, None], state.pos[:rows, None], None,
                          state.sampling(rows, noise), slow_history, window[1:], sample_fn, block,
                          kv_len=kv_len, head=head)
    state.advance(rows, frames)
    return frames


def padded_prompts(seqs: Sequence["SequenceState"], starts: Sequence[int]) -> tuple[Tensor, list[int]]:
    """The prompts of ``seqs`` from columns ``starts`` (the columns before a start are in
    the cache), padded at their ends: int64 ``[len(seqs), N+1, longest]``, and their lengths."""
    lengths = [s.prompt.shape[1] - start for s, start in zip(seqs, starts)]
    tokens = torch.zeros(len(seqs), seqs[0].prompt.shape[0], max(lengths), dtype=torch.long)
    for row, (s, start, n) in enumerate(zip(seqs, starts, lengths)):
        tokens[row, :, :n] = s.prompt[:, start:]
    return tokens, lengths


class PrefillInputs:
    """The static inputs of a captured prefill of up to ``rows`` prompts: each padded at
    its end to the length of a bucket, the index of its last real position, its first
    position (> 0 after a cached prefix), slot, seed and sampling parameters. Padding is
    harmless: causal attention keeps the real positions from seeing it, and the decode
    steps overwrite its cache entries before reading them. Rows past the batch repeat its
    last prompt (same slot, same tokens): they write the same cache entries with the same
    values, and their frames are dropped."""

    def __init__(self, rows: int, width: int, length: int, dtype: torch.dtype, device: torch.device) -> None:
        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.tokens = zeros(rows, width, length)
        self.offset = zeros(rows)
        self.last = zeros(rows)
        self.slot = zeros(rows)
        self.seed = zeros(rows)
        self.step = torch.full((rows,), -1, device=device)  # counter noise: the prefill's draws
        self.greedy = zeros(rows, dtype=torch.bool)
        self.params = zeros(rows, 3, dtype=dtype)  # temperature, top_p, repetition penalty

    def load(self, seqs: Sequence["SequenceState"], starts: Sequence[int], rows: int) -> None:
        """The prompts of ``seqs`` from positions ``starts`` (the columns before a start
        are in the cache) into the first ``rows`` rows."""
        picked = [*zip(seqs, starts)] + [(seqs[-1], starts[-1])] * (rows - len(seqs))
        tokens, lengths = padded_prompts([s for s, _ in picked], [start for _, start in picked])
        self.tokens[:rows, :, : tokens.shape[2]] = tokens
        self.offset[:rows] = torch.tensor([start for _, start in picked])
        self.last[:rows] = torch.tensor(lengths) - 1
        self.slot[:rows] = torch.tensor([s.slot for s, _ in picked])
        self.seed[:rows] = torch.tensor([(s.seed or 0) % 2**63 for s, _ in picked])
        self.greedy[:rows] = torch.tensor([s.seed is None for s, _ in picked])
        self.params[:rows] = torch.tensor([s.params.effective() for s, _ in picked])


def prefill_step(model: DualARTransformer, inputs: PrefillInputs, rows: int, length: int,
                 kv_len: int | None = None, sample_fn: SampleFn = sample, block: BlockFn = run_block,
                 head: HeadFn = run_head) -> Tensor:
    """The first frames ``[rows, N+1]`` of the prompts in ``inputs``' first ``rows``
    rows, run padded to ``length`` positions and attending to the first ``kv_len``
    cache positions (which must cover every prompt), with counter noise. Pure tensor
    work: captured per bucket of rows, length and ``kv_len``. Padding past the cache's
    end all lands on its last position (never read before a decode step rewrites it)."""
    t, p, r = inputs.params[:rows, :, None].unbind(1)
    sampling = BatchSampling(t, p, r, counter_noise(inputs.seed[:rows], inputs.step[:rows]), inputs.greedy[:rows])
    end = model.slow_caches[0].k.shape[2] - 1
    pos = (inputs.offset[:rows, None] + torch.arange(length, device=inputs.tokens.device)).clamp(max=end)
    return decode_frame(model, inputs.tokens[:rows, :, :length], pos, inputs.slot[:rows], sampling, None, None,
                        sample_fn, block, at=inputs.last[:rows], kv_len=kv_len, head=head)


class PrefixCache:
    """The slow stack's K/V of a voice's prompt part (``<|interleave|>`` and its
    reference turns, registered or sent inline), saved from the first request that
    prefills it and copied into the slot of every later one, which then prefills only
    its own text. At most ``capacity`` entries, least recently used out first. Keys are
    the prompt part's content hash, so a voice registered again with other audio never
    meets its old entry."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[Hashable, list[tuple[Tensor, Tensor]]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> list[tuple[Tensor, Tensor]] | None:
        kv = self.entries.get(key)
        if kv is None:
            self.misses += 1
        else:
            self.hits += 1
            self.entries.move_to_end(key)
        return kv

    def put(self, key: Hashable, kv: list[tuple[Tensor, Tensor]]) -> None:
        self.entries[key] = kv
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


@dataclass(eq=False)  # identity, like the slot it holds
class SequenceState:
    """One prompt being generated in one cache slot. ``seed=None``: greedy. The
    ``generator`` (seeded from ``seed`` by whoever builds the state) serves the eager
    runner, whose draws equal the reference's; a compiled runner uses counter noise."""

    prompt: Tensor  # [N+1, T] int32
    max_new_tokens: int  # frames, counting the final end frame (§5.2)
    params: SamplingParams
    seed: int | None
    generator: torch.Generator | None = None
    prefix: tuple[Hashable, int] | None = None  # (key, columns): a prompt part the prefix cache may hold
    slot: int = -1
    frames: list[Tensor] = field(default_factory=list)  # generated frames [N+1], on the CPU
    finished: bool = False

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
    """Owns the KV caches and the slot state; prefills one sequence into a slot and
    advances every running sequence one frame per ``decode``.

    A step always runs the slots ``0..rows-1`` (``rows`` >= the highest occupied slot
    + 1; free slots in that range run on dummy state), so no cache is gathered, and
    attends to the caches' first ``kv_len`` positions, a bucket that covers the longest
    running sequence: a step's attention reads what the sequences filled, not the whole
    ``max_seq_len`` (at 64 rows of a 2048-position cache, reading it all took half of
    an H100's decode step). Eager: ``rows`` is exactly that and seeded rows draw from
    their generators. Compiled (``compile``): on CUDA one captured CUDA graph per
    bucket of ``rows`` and of ``kv_len``, counter noise, and the host only replays a
    graph and reads the frames back. Prompts admitted together are prefilled up to
    ``prefill_batch_size`` at a time, compiled as one graph per bucket of rows, prompt
    length and ``kv_len``.
    """

    def __init__(self, model: DualARTransformer, im_end_id: int, max_batch_size: int, max_seq_len: int,
                 prefix_cache_size: int = 16, prefill_batch_size: int = 1) -> None:
        self.model = model
        self.im_end_id = im_end_id
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.device = model.embeddings.weight.device
        self.dtype = model.embeddings.weight.dtype
        self.free_slots = list(range(max_batch_size))
        self.occupied: dict[int, SequenceState] = {}
        # Decode steps launched whose frames are not read yet: (sequences and their slots
        # at launch, frames on the host, the event after which they are there).
        self._in_flight: deque[tuple[list[tuple[SequenceState, int]], Tensor, torch.cuda.Event | None]] = deque()
        self.prefix_cache = PrefixCache(prefix_cache_size)
        # Test hook: called at the start of every prefill and decode step (fault injection).
        self.fault_hook: Callable[[str], None] | None = None
        self.sample_fn: SampleFn = sample
        self.decode_block: BlockFn = run_block
        self.prefill_block: BlockFn = run_block
        self.head: HeadFn = run_head
        self.compiled = False  # compile() ran: padded prefill, counter noise instead of generators
        self.buckets: list[int] = []
        self.kv_lengths = buckets(max_seq_len, smallest=min(KV_SMALLEST, max_seq_len))
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.prefill_rows = buckets(min(prefill_batch_size, max_batch_size))
        self.prefill_lengths: list[int] = []
        self.prefill_graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        model.setup_caches(max_batch_size, max_seq_len)
        with torch.inference_mode():  # like every tensor a step makes: one kind of input for compiled code
            self.state = SlotState(max_batch_size, model.config.num_codebooks + 1, max_seq_len - 1,
                                   self.dtype, self.device)

    @torch.inference_mode()
    def compile(self, wrap: Callable[[Callable, bool | None], Callable]) -> None:
        """Compile (``wrap(fn, dynamic)``, e.g. torch.compile) the repeated regions, not
        the whole step: the transformer block every layer of both stacks runs, and the
        sampler; static shapes for decode (one compile per bucket of rows: dynamic-shape
        kernels ran a 32-row step 3x slower per row than static 64-row ones; only the
        attention length is dynamic), dynamic lengths for the prefill's block.
        Inductor's time grows with the graph: a whole frame (68 block calls, 10 draws)
        took over 3 minutes per batch shape on an H100. Then, on CUDA, capture the whole
        step, compiled regions and the glue between them, as one CUDA graph per bucket,
        now, before any request: running a step moves every slot's state."""
        # Shapes that vary (rows per bucket, prompt length, codebook index) cost a few
        # compiles of each region; more than dynamo's default limit of 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.decode_block = wrap(run_block, False)
        self.prefill_block = wrap(run_block, True)
        self.sample_fn = wrap(sample, None)  # static, then dynamic rows once a second bucket comes
        self.head = wrap(run_head, None)
        self.compiled = True
        self.buckets = buckets(self.max_batch_size)
        self.prefill_lengths = buckets(self.max_seq_len, smallest=64)
        self.prefill_inputs = PrefillInputs(self.prefill_rows[-1], self.state.last.shape[1], self.max_seq_len,
                                            self.dtype, self.device)
        if self.device.type == "cuda":
            self.capture_graphs(capture_graph, torch.cuda.graph_pool_handle())
            torch.cuda.synchronize()

    def capture_graphs(self, capture: Callable[[Callable[[], Tensor], tuple], tuple], pool: tuple) -> None:
        """Capture (``capture(step, pool)``, which runs the step) every decode and prefill
        step the runner replays: decode per bucket of rows and ``kv_len``, prefill per
        bucket of rows, prompt length and ``kv_len``."""
        for rows in reversed(self.buckets):  # the largest first: its memory is reused by the rest
            for kv_len in reversed(self.kv_lengths):
                self.graphs[rows, kv_len] = capture(partial(
                    decode_step, self.model, self.state, rows, None, self.sample_fn, self.decode_block, kv_len,
                    self.head), pool)
        for rows in reversed(self.prefill_rows):
            for length in reversed(self.prefill_lengths):
                if rows > 1 and length > BATCHED_PREFILL_LENGTH:
                    continue
                for kv_len in [n for n in reversed(self.kv_lengths) if n >= length]:  # those a prompt can need
                    self.prefill_graphs[rows, length, kv_len] = capture(partial(
                        prefill_step, self.model, self.prefill_inputs, rows, length, kv_len, self.sample_fn,
                        self.prefill_block, self.head), pool)

    def acquire(self, seq: SequenceState) -> None:
        self.free_slots.sort()
        seq.slot = self.free_slots.pop(0)
        self.occupied[seq.slot] = seq

    def release(self, seq: SequenceState) -> None:
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            del self.occupied[seq.slot]
            seq.slot = -1

    def prefill(self, seq: SequenceState) -> None:
        """Run the prompt through the model in the sequence's slot; adds the first frame."""
        self.prefill_batch([seq])

    @torch.inference_mode()
    def prefill_batch(self, seqs: Sequence[SequenceState]) -> None:
        """Prefill sequences, each in its slot, as one batch of prompts padded at their
        ends (each from the end of its cached prefix, if any); adds each one's first
        frame, the frame it gets prefilled alone (the same draws)."""
        if self.fault_hook:
            self.fault_hook("prefill")
        starts = [self._restore_prefix(s) for s in seqs]
        frames = (self._prefill_compiled if self.compiled else self._prefill_eager)(seqs, starts)
        for s, start, frame in zip(seqs, starts, frames):
            self._prefilled(s, start, frame)

    def _prefill_compiled(self, seqs: Sequence[SequenceState], starts: Sequence[int]) -> Tensor:
        """The first frames ``[len(seqs), N+1]`` from the static prefill inputs, replayed
        as the graph of the batch's buckets, with counter noise; a batch with no graph
        (prompts too long for batched graphs) one sequence at a time."""
        most = self.prefill_rows[-1]
        if len(seqs) > most:
            return torch.cat([self._prefill_compiled(seqs[i : i + most], starts[i : i + most])
                              for i in range(0, len(seqs), most)])
        rows = next(b for b in self.prefill_rows if b >= len(seqs))
        length = next(n for n in self.prefill_lengths if n >= max(s.prompt.shape[1] - st for s, st in zip(seqs, starts)))
        kv_len = self._kv_len(max(length, *(s.prompt.shape[1] for s in seqs)))  # captured for every kv_len >= length
        key = (rows, length, kv_len)
        if self.prefill_graphs and key not in self.prefill_graphs and len(seqs) > 1:
            return torch.cat([self._prefill_compiled([s], [st]) for s, st in zip(seqs, starts)])
        graph = self.prefill_graphs[key] if self.prefill_graphs else None
        self.prefill_inputs.load(seqs, starts, rows)
        if graph is None:
            frames = prefill_step(self.model, self.prefill_inputs, rows, length, kv_len, self.sample_fn,
                                  self.prefill_block, self.head)
        else:
            graph[0].replay()
            frames = graph[1]
        return frames[: len(seqs)].clone()  # the graph's output is overwritten by its next replay

    def _prefill_eager(self, seqs: Sequence[SequenceState], starts: Sequence[int]) -> Tensor:
        """The first frames ``[len(seqs), N+1]``, seeded rows drawn from their generators."""
        tokens, lengths = padded_prompts(seqs, starts)
        # Padding past the cache's end lands on its last position, as in prefill_step.
        end = self.model.slow_caches[0].k.shape[2] - 1
        pos = (torch.tensor(starts)[:, None] + torch.arange(tokens.shape[2])).clamp(max=end)
        generators = [None if s.seed is None else s.generator for s in seqs]
        sampling = BatchSampling.build([s.params for s in seqs], generators, self.dtype, self.device)
        sampling.greedy = torch.tensor([s.seed is None for s in seqs], device=self.device)
        return decode_frame(self.model, tokens.to(self.device), pos.to(self.device),
                            torch.tensor([s.slot for s in seqs], device=self.device), sampling, None, None,
                            self.sample_fn, self.prefill_block, at=torch.tensor(lengths, device=self.device) - 1,
                            kv_len=self._kv_len(max(s.prompt.shape[1] for s in seqs)), head=self.head)

    def _prefilled(self, seq: SequenceState, start: int, frame: Tensor) -> None:
        """Record a prefill's first frame; keep the voice prefix it computed, if any."""
        T = seq.prompt.shape[1]
        if seq.prefix is not None and start == 0 and self.prefix_cache.capacity and 0 < seq.prefix[1] < T:
            P = seq.prefix[1]
            self.prefix_cache.put(seq.prefix[0], [(c.k[seq.slot, :, :P].clone(), c.v[seq.slot, :, :P].clone())
                                                  for c in self.model.slow_caches])
        self.state.reset(seq.slot, frame, T, seq.params, seq.seed)
        seq.frames.append(frame.cpu())
        seq.finished = seq.max_new_tokens <= 1

    def _restore_prefix(self, seq: SequenceState) -> int:
        """Copy a cached prompt prefix into the sequence's slot; returns the columns to
        skip (0 when nothing is cached). At least one column is always prefilled: the
        frame comes from the last one."""
        if seq.prefix is None or not self.prefix_cache.capacity:
            return 0
        key, P = seq.prefix
        if not 0 < P < seq.prompt.shape[1]:
            return 0
        kv = self.prefix_cache.get(key)
        if kv is None:
            return 0
        for cache, (k, v) in zip(self.model.slow_caches, kv):
            cache.k[seq.slot, :, :P] = k
            cache.v[seq.slot, :, :P] = v
        return P

    def _kv_len(self, positions: int) -> int:
        """The attention-length bucket that covers the first ``positions`` positions."""
        return next(n for n in self.kv_lengths if n >= min(positions, self.max_seq_len))

    @torch.inference_mode()
    def decode(self, seqs: Sequence[SequenceState], lag: int = 0) -> None:
        """One decode step for every sequence in ``seqs`` (every occupied slot runs; a
        finished sequence still holding its slot gets a frame it ignores).

        ``lag`` steps may stay in flight: the frames appended are those of the step
        launched ``lag`` calls ago, so the host reads one step while the device runs the
        next (no idle device between steps). A sequence that turns out to have finished
        got ``lag`` more frames, which are dropped, not appended. Only for steps that
        draw no generator (compiled): an eager step's draws must stop at the end."""
        try:
            if self.fault_hook:
                self.fault_hook("decode")
            self._launch_decode(seqs)
            while len(self._in_flight) > lag:
                self._collect_decode(*self._in_flight.popleft())
        except BaseException:
            self._in_flight.clear()  # a failed step's frames are not read
            raise

    def _launch_decode(self, seqs: Sequence[SequenceState]) -> None:
        rows = max(self.occupied) + 1
        # The step writes each sequence's position prompt + frames - 1 (one more per step
        # in flight) and attends up to it.
        ahead = len(self._in_flight)
        kv_len = self._kv_len(max(s.prompt.shape[1] + len(s.frames) + ahead for s in self.occupied.values()))
        if self.graphs:
            rows = next(b for b in self.buckets if b >= rows)
            graph, frames = self.graphs[rows, kv_len]
            graph.replay()
        elif self.compiled:
            frames = decode_step(self.model, self.state, rows, None, self.sample_fn, self.decode_block, kv_len,
                                 self.head)
        else:
            generators = [None] * rows
            for slot, s in self.occupied.items():
                generators[slot] = s.generator
            frames = decode_step(self.model, self.state, rows, generator_noise(generators), self.sample_fn,
                                 self.decode_block, kv_len, self.head)
        # Copied off now: a graph rewrites its output at its next replay.
        if frames.is_cuda:
            frames = frames.to("cpu", non_blocking=True)  # into pinned memory, read once `done`
            done = torch.cuda.Event()
            done.record()
        else:
            frames, done = frames.to("cpu", copy=True), None
        self._in_flight.append(([(s, s.slot) for s in seqs], frames, done))

    def _collect_decode(self, seqs: list[tuple[SequenceState, int]], frames: Tensor,
                        done: torch.cuda.Event | None) -> None:
        if done is not None:
            done.synchronize()
        for s, slot in seqs:
            if s.finished or s.slot != slot:  # ended meanwhile: frames past its end are dropped
                continue
            frame = frames[slot]
            s.frames.append(frame)
            s.finished = int(frame[0]) == self.im_end_id or len(s.frames) >= s.max_new_tokens
