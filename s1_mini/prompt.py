"""The S1 prompt: one interleaved sequence of text and reference codes (spec §7).

    <|interleave|>
      for each reference:  <|speaker:0|> REF_TEXT REF_CODES <|im_end|>
    <|speaker:0|> TARGET_TEXT

Every text part is encoded on its own (no BPE merge crosses a part boundary) and used
verbatim: no normalization, no stripping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from s1_mini.tokenizer import IM_END, INTERLEAVE, Tokenizer

SPEAKER = "<|speaker:0|>"


class PromptError(ValueError):
    """Bad prompt input (text or reference codes), with the field and the rule."""


@dataclass(frozen=True)
class Reference:
    """A voice reference: its transcript and its codec codes ``[N, T]``."""

    text: str
    codes: np.ndarray


def build_prompt(tokenizer: Tokenizer, text: str, references: Sequence[Reference],
                 num_codebooks: int, codebook_size: int) -> torch.Tensor:
    """Return the int32 prompt ``[N+1, T]``: row 0 token ids, rows 1..N the reference
    codes at reference positions and 0 elsewhere."""
    if not isinstance(text, str):
        raise PromptError("text: must be a string")
    rows: list[np.ndarray] = []

    def add_text(s: str) -> None:
        ids = np.asarray(tokenizer.encode(s), dtype=np.int64)
        block = np.zeros((num_codebooks + 1, len(ids)), dtype=np.int64)
        block[0] = ids
        rows.append(block)

    add_text(INTERLEAVE)
    for i, ref in enumerate(references):
        codes = _check_codes(np.asarray(ref.codes), i, tokenizer, num_codebooks, codebook_size)
        add_text(SPEAKER)
        add_text(ref.text)
        rows.append(np.concatenate([codes[:1] + tokenizer.semantic_begin_id, codes], axis=0))
        add_text(IM_END)
    add_text(SPEAKER)
    add_text(text)
    return torch.from_numpy(np.concatenate(rows, axis=1).astype(np.int32))


def _check_codes(codes: np.ndarray, index: int, tokenizer: Tokenizer, num_codebooks: int,
                 codebook_size: int) -> np.ndarray:
    field = f"references[{index}].codes"
    if codes.ndim != 2 or codes.shape[0] != num_codebooks:
        raise PromptError(f"{field}: must have shape [{num_codebooks}, frames], got {list(codes.shape)}")
    if codes.shape[1] == 0:
        raise PromptError(f"{field}: must have at least one frame")
    if not np.issubdtype(codes.dtype, np.integer):
        raise PromptError(f"{field}: must be integers, got {codes.dtype}")
    codes = codes.astype(np.int64)
    if codes.min() < 0:
        raise PromptError(f"{field}: codes must be >= 0")
    if codes[0].max() >= tokenizer.num_semantic_tokens:
        raise PromptError(f"{field}: codebook 0 values must be < {tokenizer.num_semantic_tokens} "
                          "(the number of semantic tokens)")
    if codes.max() >= codebook_size:
        raise PromptError(f"{field}: codes must be < codebook_size {codebook_size}")
    return codes


def target_length(tokenizer: Tokenizer, text: str) -> int:
    """Columns of the prompt's last part, ``<|speaker:0|> TARGET_TEXT``: everything
    before it (``<|interleave|>`` and the reference turns) is the same for every
    request with the same references, which is what the runner's prefix cache reuses."""
    return len(tokenizer.encode(SPEAKER)) + len(tokenizer.encode(text))
