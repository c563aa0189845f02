"""From a prompt to semantic codes: prefill, per-frame decode, stop rule (spec §5).

``decode_frame`` is the one step both the prefill and every decode step use, for a
batch of sequences with their own positions, penalty histories and RNGs. ``generate``
runs a static batch of prompts to completion with it; the engine's continuous-batching
scheduler composes the same step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from s1_mini.model import DualARTransformer
from s1_mini.sampler import BatchSampling, SamplingParams, sample

# Decode steps look back this many frames for the repetition penalty (§5.5).
PENALTY_WINDOW = 16


class GenerationError(ValueError):
    """A request the generator cannot run (prompt too long, bad max_new_tokens, ...)."""


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


@dataclass
class _Row:
    prompt_len: int
    max_new_tokens: int
    frames: list[Tensor]
    done: bool = False


def resolve_max_new_tokens(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> int:
    """The reference's length bookkeeping (§5.2): 0 means up to the context limit,
    otherwise capped by it. Deviation: values that would crash it (< 2) are refused."""
    if prompt_len >= max_seq_len:
        raise GenerationError(f"prompt: {prompt_len} tokens, must be shorter than max_seq_len {max_seq_len}")
    if max_new_tokens < 0 or max_new_tokens == 1:
        raise GenerationError(f"max_new_tokens: must be 0 (up to the context limit) or >= 2, got {max_new_tokens}")
    room = max_seq_len - prompt_len
    n = min(max_new_tokens, room) if max_new_tokens else room
    if n < 2:
        raise GenerationError(f"prompt: {prompt_len} tokens leave room for fewer than 2 frames "
                              f"within max_seq_len {max_seq_len}")
    return n


@torch.inference_mode()
def generate(model: DualARTransformer, prompts: Sequence[Tensor], im_end_id: int,
             max_new_tokens: int | Sequence[int], params: SamplingParams | Sequence[SamplingParams],
             generators: Sequence[torch.Generator] | None = None) -> list[Tensor]:
    """Generate codes for a static batch of prompts ``[N+1, T_b]``.

    Returns per prompt the int32 codes ``[N, G-1]``: rows 1..N of the G generated
    frames with the last frame dropped, whether or not it was ``<|im_end|>`` (§5.7).
    ``generators=None`` decodes greedily. The prefill frame is not checked for
    ``<|im_end|>``; a decode step that produces it stops its sequence (§5.6).
    """
    B = len(prompts)
    device = model.embeddings.weight.device
    c = model.config
    limits = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    param_list = [params] * B if isinstance(params, SamplingParams) else list(params)
    for p in param_list:
        p.validate()
    rows = [_Row(p.shape[1], resolve_max_new_tokens(p.shape[1], n, c.max_seq_len), [])
            for p, n in zip(prompts, limits)]
    needed = max(r.prompt_len + r.max_new_tokens for r in rows)
    if model.max_batch_size < B or model.slow_caches[0].k.shape[2] < needed:
        model.setup_caches(B, min(c.max_seq_len, -(-needed // 64) * 64))
    sampling = BatchSampling.build(param_list, generators, model.embeddings.weight.dtype, device)

    # Prefill each prompt into its own cache slot (prompts differ in length).
    first = []
    for b, prompt in enumerate(prompts):
        T = prompt.shape[1]
        row_sampling = BatchSampling(sampling.temperature[b:b + 1], sampling.top_p[b:b + 1],
                                     sampling.repetition_penalty[b:b + 1],
                                     None if generators is None else [generators[b]])
        first.append(decode_frame(model, prompt[None].to(device).long(),
                                  torch.arange(T, device=device)[None],
                                  torch.tensor([b], device=device), row_sampling, None, None))
    frame = torch.cat(first)
    for r, f in zip(rows, frame):
        r.frames.append(f)

    steps = max(r.max_new_tokens for r in rows) - 1
    history = torch.zeros((B, c.num_codebooks + 1, max(PENALTY_WINDOW, steps)), dtype=torch.long, device=device)
    cache_last = model.slow_caches[0].k.shape[2] - 1
    for step in range(steps):
        window = penalty_window(history, step)
        # Finished rows keep computing in lock-step (their results are ignored); keep
        # their positions inside the cache.
        pos = torch.tensor([[min(r.prompt_len + step, cache_last)] for r in rows], device=device)
        frame = decode_frame(model, frame[:, :, None], pos, None, sampling,
                             slow_history=window[:, :, 0], fast_history=window[:, 1:, :])
        history[:, :, step] = frame
        for r, f in zip(rows, frame):
            if r.done:
                continue
            r.frames.append(f)
            if int(f[0]) == im_end_id or len(r.frames) == r.max_new_tokens:
                r.done = True
        if all(r.done for r in rows):
            break
    return [torch.stack(r.frames[:-1], dim=1)[1:].to(torch.int32).cpu() if len(r.frames) > 1
            else torch.zeros((c.num_codebooks, 0), dtype=torch.int32) for r in rows]
