"""The main job end to end on a random checkpoint: text -> codes -> 44.1 kHz WAV.

    python -m s1_mini.demo [--out out/demo] [--preset tiny|s1-mini] [--text TEXT] [--seed N]

The checkpoint has RANDOM WEIGHTS (the official ones are gated), so the WAV is noise,
not speech: the demo shows that every stage runs and fits together.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from s1_mini.codec import Codec
from s1_mini.generation import generate
from s1_mini.model import load_text2semantic
from s1_mini.prompt import build_prompt
from s1_mini.sampler import SamplingParams
from s1_mini.testing.make_checkpoint import make_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m s1_mini.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--preset", choices=["tiny", "s1-mini"], default="tiny")
    p.add_argument("--text", default="Hello from S1-mini! This checkpoint has random weights.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=100)
    args = p.parse_args(argv)

    checkpoint = args.out / f"checkpoint-{args.preset}"
    if not (checkpoint / "codec.pth").exists():
        print(f"writing a random-weight {args.preset} checkpoint to {checkpoint}")
        make_checkpoint(checkpoint, args.preset, args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_text2semantic(checkpoint, device)
    codec = Codec.from_checkpoint(checkpoint, device)

    start = time.perf_counter()
    prompt = build_prompt(tokenizer, args.text, [], model.config.num_codebooks, model.config.codebook_size)
    codes = generate(model, [prompt], tokenizer.im_end_id, args.max_new_tokens, SamplingParams(),
                     [torch.Generator(device).manual_seed(args.seed)])[0]
    if codes.shape[1] == 0:
        print("error: the model produced no audio frames", file=sys.stderr)
        return 1
    with torch.inference_mode():
        audio = codec.decode(codes[None].long().to(device))[0].float().cpu().numpy()
    elapsed = time.perf_counter() - start

    wav = args.out / "demo.wav"
    sf.write(wav, audio, codec.config.sample_rate)
    np.save(args.out / "codes.npy", codes.numpy())
    seconds = len(audio) / codec.config.sample_rate
    print(f"wrote {wav}: {seconds:.2f} s of audio at {codec.config.sample_rate} Hz "
          f"({codes.shape[1]} frames, {elapsed:.2f} s on {device})")
    print("NOTE: random weights -- this audio is noise, not speech.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
