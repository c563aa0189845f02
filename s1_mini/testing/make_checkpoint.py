"""Write a random-weight checkpoint in the official S1-mini layout.

    python -m s1_mini.testing.make_checkpoint --preset tiny|s1-mini --out DIR --seed N
        [--config-json FILE] [--speaker-token] [--no-codec]

Files: config.json, model.pth (bf16), tokenizer.tiktoken, special_tokens.json and the
codec's codec.pth (+ codec_config.json for the tiny codec). Random weights produce
noise, not speech: these checkpoints exist to test and benchmark the code.

Weights follow spec §9.2 so that greedy decoding visits semantic, special and text
tokens: norms 1 + 0.3·N(0,1), biases 0.05·N(0,1), block and projection matrices with
std 0.12 (scaled down by sqrt(64 / fan_in) for wide layers, so the full-size model
stays finite), embeddings std 0.2 and semantic token rows twice that.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from s1_mini.checkpoint import CheckpointError
from s1_mini.config import EngineConfigError, check_seed
from s1_mini.model import ModelConfig, expected_shapes
from s1_mini.tokenizer import BASE_SPECIAL_TOKENS, semantic_token, write_ranks

# Codec facts of each preset: (codebook count, semantic codebook size).
CODEC_SHAPES = {"tiny": (4, 64), "s1-mini": (10, 4096)}

PRESETS: dict[str, dict[str, Any]] = {
    # spec §9.2's tiny model, with codebook_size 64 to fit the tiny codec's
    # 64-entry semantic codebook
    "tiny": dict(
        model_type="dual_ar", n_layer=2, n_head=4, n_local_heads=2, head_dim=16, dim=64,
        intermediate_size=128, rope_base=1e6, norm_eps=1e-6, max_seq_len=256,
        codebook_size=64, num_codebooks=4, attention_qk_norm=True, tie_word_embeddings=True,
        scale_codebook_embeddings=True, n_fast_layer=2, fast_dim=48, fast_n_head=4,
        fast_n_local_heads=1, fast_head_dim=12, fast_intermediate_size=96,
        fast_attention_qk_norm=False,
    ),
    # the full S1-mini shape as best known (1.43 GB of bf16 weights)
    "s1-mini": dict(
        model_type="dual_ar", vocab_size=155776, n_layer=28, n_head=16, n_local_heads=8,
        head_dim=128, dim=1024, intermediate_size=3072, rope_base=1e6, norm_eps=1e-6,
        max_seq_len=8192, codebook_size=4096, num_codebooks=10, attention_qk_norm=True,
        tie_word_embeddings=True, scale_codebook_embeddings=True, n_fast_layer=4,
        fast_dim=1024, fast_n_head=16, fast_n_local_heads=8, fast_head_dim=128,
        fast_intermediate_size=3072,
    ),
}
# Ranks of the full-size tokenizer (a Qwen-sized BPE); the extra ranks are filler
# tokens that BPE never produces, there to put the specials where the real ones are.
S1_MINI_RANKS = 151_643
TINY_RANKS = 320
# Written beside the weights so that tools can say plainly that the audio is noise.
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS.txt"

SAMPLE_TEXT = (
    "Hello, world! This is a test of the speech system. It's 12:30 -- are you ready?!\n"
    "The quick brown fox jumps over the lazy dog; the dog sleeps. "
    "你好，世界！今天天气很好。我们说话吧。 こんにちは、世界。 Ünïcödé façade, naïve café. "
    "Numbers 0123456789 and symbols <|>[]{}()@#$%^&*_+=~ \t tabs   spaces\n\n"
)


def learn_bpe(n_ranks: int, text: str = SAMPLE_TEXT) -> list[bytes]:
    """256 single bytes, then merges of the most frequent adjacent pair in ``text``,
    then (for large vocabularies) unreachable filler tokens up to ``n_ranks``."""
    tokens = [bytes([b]) for b in range(256)]
    seq = [bytes([b]) for b in text.encode()]
    known = set(tokens)
    while len(tokens) < n_ranks and len(seq) > 1:
        pairs = Counter(zip(seq, seq[1:]))
        (a, b), count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if count < 2:
            break
        merged, out, i = a + b, [], 0
        while i < len(seq):
            if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                out.append(merged)
                i += 2
            else:
                out.append(seq[i])
                i += 1
        seq = out
        if merged not in known:
            tokens.append(merged)
            known.add(merged)
    filler = 0
    while len(tokens) < n_ranks:
        token = b"\x00filler%d\x00" % filler
        filler += 1
        if token not in known:
            tokens.append(token)
            known.add(token)
    return tokens


def special_tokens(codebook_size: int, speaker_token: bool) -> list[str]:
    tokens = BASE_SPECIAL_TOKENS + [semantic_token(n) for n in range(codebook_size)]
    return tokens + ["<|speaker:0|>"] if speaker_token else tokens


def random_weights(config: ModelConfig, semantic_begin_id: int, semantic_end_id: int,
                   seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in expected_shapes(config).items():
        if key.endswith("norm.weight"):
            w = 1 + 0.3 * torch.randn(shape, generator=g)
        elif key.endswith(".bias"):
            w = 0.05 * torch.randn(shape, generator=g)
        elif "embeddings" in key:
            w = 0.2 * torch.randn(shape, generator=g)
            if key == "embeddings.weight":
                w[semantic_begin_id:semantic_end_id + 1] *= 2
        else:
            fan_in = shape[1]
            w = 0.12 * math.sqrt(64 / max(64, fan_in)) * torch.randn(shape, generator=g)
        state[key] = w.to(torch.bfloat16)
    return state


def make_checkpoint(out: Path, preset: str, seed: int, overrides: dict[str, Any] | None = None,
                    speaker_token: bool = False, codec: bool = True) -> Path:
    """Write the checkpoint directory ``out`` and return it."""
    if preset not in PRESETS:
        raise CheckpointError(f"preset: must be one of {sorted(PRESETS)}, got {preset!r}")
    raw = {**PRESETS[preset], **(overrides or {})}
    n_ranks = TINY_RANKS if preset == "tiny" else S1_MINI_RANKS
    specials = special_tokens(raw["codebook_size"], speaker_token)
    n_ids = n_ranks + len(specials)
    raw.setdefault("vocab_size", -(-n_ids // 8) * 8)  # rounded up: unused padding rows
    config = ModelConfig.from_dict(raw, source="generated config")
    if n_ids > config.vocab_size:
        raise CheckpointError(f"vocab_size: {config.vocab_size} is smaller than the {n_ids} token ids")
    if codec:
        n_codebooks, semantic_size = CODEC_SHAPES[preset]
        if config.num_codebooks != n_codebooks or config.codebook_size < semantic_size:
            raise CheckpointError(
                f"the {preset} codec has {n_codebooks} codebooks and a {semantic_size}-entry semantic "
                f"codebook: num_codebooks must be {n_codebooks} and codebook_size >= {semantic_size} "
                "(or pass --no-codec)")

    out.mkdir(parents=True, exist_ok=True)
    write_ranks(out / "tokenizer.tiktoken", learn_bpe(n_ranks))
    (out / "special_tokens.json").write_text(
        json.dumps({t: n_ranks + k for k, t in enumerate(specials)}, indent=1, ensure_ascii=False))
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    s0 = n_ranks + len(BASE_SPECIAL_TOKENS)
    torch.save(random_weights(config, s0, s0 + config.codebook_size - 1, seed), out / "model.pth")
    (out / RANDOM_WEIGHTS_MARKER).write_text(
        f"Random weights (preset {preset}, seed {seed}), written by s1_mini.testing.make_checkpoint: "
        "generated audio is noise, not speech.\n")
    if codec:
        from s1_mini.testing.codec_checkpoint import write_codec_checkpoint

        write_codec_checkpoint(out, preset, seed)
    return out


def _overrides(path: Path) -> dict[str, Any]:
    try:
        overrides = json.loads(path.read_text())
    except OSError as exc:
        raise CheckpointError(f"--config-json: cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"--config-json: {path} is not JSON ({exc})") from None
    if not isinstance(overrides, dict):
        raise CheckpointError("--config-json: must hold a JSON object")
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m s1_mini.testing.make_checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config-json", type=Path, help="JSON object overriding config.json fields")
    parser.add_argument("--speaker-token", action="store_true",
                        help="list <|speaker:0|> as a special token (single-token speaker path)")
    parser.add_argument("--no-codec", action="store_true", help="do not write codec.pth")
    args = parser.parse_args(argv)
    try:
        check_seed(args.seed, "--seed")
        overrides = _overrides(args.config_json) if args.config_json else None
        make_checkpoint(args.out, args.preset, args.seed, overrides, args.speaker_token, not args.no_codec)
    except (CheckpointError, EngineConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the inputs are checked above: what is left is writing --out
        print(f"error: --out: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.preset} checkpoint (random weights) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
