"""Byte-level BPE tokenizer of S1 checkpoints, on tiktoken (spec §6).

``tokenizer.tiktoken`` holds the BPE ranks; ``special_tokens.json`` lists the special
tokens, whose ids are ``n_ranks + position`` in the file's key order (the ids written
in the file are ignored, as in the reference).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import tiktoken

from s1_mini.checkpoint import CheckpointError

# The reference's pre-tokenization regex. Alternative 7 is ``\s+(\?!\S)``: in the
# original raw string ``\?`` is an escaped literal "?", so this matches whitespace
# followed by the two characters "?!" and a non-space, not the usual lookahead.
PATTERN = "|".join([
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",
    r"\p{P}",
    r"[^\r\n\p{L}\p{N}]?\p{L}+",
    r"\p{N}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(\?!\S)",
    r"\s+",
])

IM_END = "<|im_end|>"
INTERLEAVE = "<|interleave|>"
BASE_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", IM_END,
    "<|phoneme_start|>", "<|phoneme_end|>", "<|tool_call_start|>", "<|tool_call_end|>",
    "<|text|>", "<|voice|>", INTERLEAVE, "<|audio_start|>", "<|audio_end|>", "<|audio|>",
]
# Without special_tokens.json, PyPI fish-speech 0.1.0 defines 1024 semantic tokens.
DEFAULT_SEMANTIC_TOKENS = 1024
# The reference encodes long inputs in pieces of this many characters.
ENCODE_PIECE_CHARS = 400_000

_SEMANTIC = re.compile(r"<\|semantic:(\d+)\|>")


def semantic_token(n: int) -> str:
    return f"<|semantic:{n}|>"


def read_ranks(path: Path) -> dict[bytes, int]:
    """``<base64> <rank>`` per line; empty lines and the ``=`` entry are skipped."""
    ranks: dict[bytes, int] = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        if not fields or fields[0] == "=":
            continue
        ranks[base64.b64decode(fields[0])] = int(fields[1])
    return ranks


def write_ranks(path: Path, tokens: list[bytes]) -> None:
    path.write_text("".join(f"{base64.b64encode(t).decode() or '='} {i}\n" for i, t in enumerate(tokens)))


class Tokenizer:
    def __init__(self, ranks: dict[bytes, int], special_tokens: list[str]) -> None:
        self.n_ranks = len(ranks)
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise CheckpointError(f"tokenizer.tiktoken: every single byte must be a token; missing {missing[:8]}")
        if len(set(special_tokens)) != len(special_tokens):
            raise CheckpointError("special_tokens.json: duplicate special tokens")
        self.special_ids = {tok: self.n_ranks + k for k, tok in enumerate(special_tokens)}
        self.encoding = tiktoken.Encoding(
            name="s1_mini", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=self.special_ids)

        semantic = {int(m.group(1)): i for t, i in self.special_ids.items() if (m := _SEMANTIC.fullmatch(t))}
        if 0 not in semantic:
            raise CheckpointError(f"special tokens: {semantic_token(0)} is missing")
        self.semantic_begin_id = semantic[0]
        self.semantic_end_id = semantic[max(semantic)]
        # The model's range test and the prompt builder assume id(n) = S0 + n.
        if any(i != self.semantic_begin_id + n for n, i in semantic.items()) or len(semantic) != max(semantic) + 1:
            raise CheckpointError("special tokens: the <|semantic:n|> ids must be contiguous in n from 0")
        self.num_semantic_tokens = len(semantic)
        for name in (IM_END, INTERLEAVE):
            if name not in self.special_ids:
                raise CheckpointError(f"special tokens: {name} is missing")
        self.im_end_id = self.special_ids[IM_END]
        self.interleave_id = self.special_ids[INTERLEAVE]

    @classmethod
    def from_dir(cls, checkpoint_dir: str | Path) -> "Tokenizer":
        d = Path(checkpoint_dir)
        bpe = d / "tokenizer.tiktoken"
        if not bpe.is_file():
            raise CheckpointError(f"tokenizer file not found: {bpe}")
        try:
            ranks = read_ranks(bpe)
        except (ValueError, IndexError) as exc:
            raise CheckpointError(f"{bpe}: malformed line: {exc}") from None
        specials_file = d / "special_tokens.json"
        if specials_file.is_file():
            try:
                specials = json.loads(specials_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{specials_file}: invalid JSON: {exc}") from None
            if not isinstance(specials, dict):
                raise CheckpointError(f"{specials_file}: expected a JSON object")
            special_tokens = list(specials)
        else:
            special_tokens = BASE_SPECIAL_TOKENS + [semantic_token(n) for n in range(DEFAULT_SEMANTIC_TOKENS)]
        return cls(ranks, special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer defines (BPE ranks + specials)."""
        return self.n_ranks + len(self.special_ids)

    def encode(self, text: str) -> list[int]:
        """Encode with every special token recognized, in pieces of 400k characters
        (a token can split at a piece boundary, as in the reference)."""
        ids: list[int] = []
        for start in range(0, len(text), ENCODE_PIECE_CHARS):
            ids += self.encoding.encode(text[start:start + ENCODE_PIECE_CHARS],
                                        allowed_special="all", disallowed_special=())
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)
