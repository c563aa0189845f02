"""Text (and optional voice references) to semantic codes.

    python -m s1_mini.generate --checkpoint DIR --text TEXT
        [--reference-text T --reference-codes codes.npy]... [--greedy] [--seed N]
        [--max-new-tokens N] [--temperature T] [--top-p P] [--repetition-penalty R]
        [--device auto|cpu|cuda[:i]] [--precision float32|bfloat16|float16] --out codes.npy

Writes the int32 codes ``[num_codebooks, frames]``, the same file as the reference's
``codes_<k>.npy`` (and, with the same seed on the same device and precision, the same
codes). The defaults are the reference CLI's: max_new_tokens 0 (up to the context
limit), top_p 0.8, repetition_penalty 1.1, temperature 0.8, seed 42.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from s1_mini.checkpoint import CheckpointError
from s1_mini.config import check_seed
from s1_mini.generation import GenerationError, generate
from s1_mini.model import load_text2semantic
from s1_mini.prompt import PromptError, Reference, build_prompt
from s1_mini.sampler import SamplingParams

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:  # torch lists every device type it knows; ours are fewer
        raise ValueError(f"--device: must be auto, cpu or cuda[:index], got {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {name} requested but CUDA is not available")
    return device


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m s1_mini.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--reference-text", action="append", default=[])
    p.add_argument("--reference-codes", type=Path, action="append", default=[])
    p.add_argument("--greedy", action="store_true", help="argmax over the penalized distribution")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=sorted(PRECISIONS),
                   help="default: bfloat16 on CUDA (as the reference), float32 on the CPU")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if len(args.reference_text) != len(args.reference_codes):
            raise ValueError("--reference-text and --reference-codes must be given the same number of times")
        check_seed(args.seed, "--seed")
        device = resolve_device(args.device)
        dtype = PRECISIONS[args.precision or ("bfloat16" if device.type == "cuda" else "float32")]
        params = SamplingParams(args.temperature, args.top_p, args.repetition_penalty)
        params.validate()
        references = []
        for text, path in zip(args.reference_text, args.reference_codes):
            try:
                codes = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ValueError(f"--reference-codes {path}: cannot read a .npy array: {exc}") from None
            references.append(Reference(text, codes))
        model, tokenizer = load_text2semantic(args.checkpoint, device, dtype)
        prompt = build_prompt(tokenizer, args.text, references, model.config.num_codebooks,
                              model.config.codebook_size)
        generator = None if args.greedy else [torch.Generator(device).manual_seed(args.seed)]
        codes = generate(model, [prompt], tokenizer.im_end_id, args.max_new_tokens, params, generator)[0]
    except (CheckpointError, PromptError, GenerationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.out, codes.numpy())
    except OSError as exc:
        print(f"error: --out: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote codes {list(codes.shape)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
