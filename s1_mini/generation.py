"""From prompts to semantic codes: length rules and a static batch run (spec §5).

The per-frame work lives in :mod:`s1_mini.runner`; ``generate`` runs a fixed set of
prompts to completion with it (the CLI, tests), while the engine's scheduler admits
and retires sequences between steps (continuous batching).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from s1_mini.model import DualARTransformer
from s1_mini.runner import ModelRunner, SequenceState
from s1_mini.sampler import SamplingParams


class GenerationError(ValueError):
    """A request the generator cannot run (prompt too long, bad max_new_tokens, ...)."""


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
    max_seq_len = model.config.max_seq_len
    limits = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    param_list = [params] * B if isinstance(params, SamplingParams) else list(params)
    for p in param_list:
        p.validate()
    seqs = [SequenceState(prompt, resolve_max_new_tokens(prompt.shape[1], n, max_seq_len), p,
                          None if generators is None else generators[b].initial_seed() % 2**63,
                          None if generators is None else generators[b])
            for b, (prompt, n, p) in enumerate(zip(prompts, limits, param_list))]
    needed = max(s.prompt.shape[1] + s.max_new_tokens for s in seqs)
    runner = ModelRunner(model, im_end_id, B, min(max_seq_len, -(-needed // 64) * 64))
    for s in seqs:
        runner.acquire(s)
        runner.prefill(s)
    active = [s for s in seqs if not s.finished]
    while active:
        runner.decode(active)
        active = [s for s in active if not s.finished]
    return [s.codes().cpu() for s in seqs]
