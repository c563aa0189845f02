"""The main job: text (and an optional voice reference) to a WAV file.

    python -m s1_mini.synthesize --checkpoint DIR --text TEXT --out speech.wav
        [--reference-audio voice.wav --reference-text "what the voice says"]
        [--seed N] [--max-new-tokens N] [--temperature T] [--top-p P] [--repetition-penalty R]
        [--device cuda|cpu] [--precision float16|bfloat16|float32] [--no-compile]

Runs the engine once, streaming: the progress bar counts seconds of audio as they are
decoded. Defaults come from EngineConfig and the S1_MINI_* environment variables.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from s1_mini.checkpoint import CheckpointError
from s1_mini.config import EngineConfig, EngineConfigError
from s1_mini.engine import ProductionTTSEngine
from s1_mini.scheduler import TTSError
from s1_mini.testing.make_checkpoint import RANDOM_WEIGHTS_MARKER


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m s1_mini.synthesize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reference-audio", type=Path)
    p.add_argument("--reference-text")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--device")
    p.add_argument("--precision", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--no-compile", action="store_true")
    return p.parse_args(argv)


def check_out(out: Path) -> None:
    """Refuse an output path that soundfile cannot write, before minutes of synthesis."""
    if out.is_dir():
        raise ValueError(f"--out: {out} is a directory; pass a file name such as speech.wav")
    if out.suffix[1:].upper() not in sf.available_formats():
        raise ValueError(f"--out: the extension of {out.name!r} names no audio format; use .wav, .flac or .ogg")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_out(args.out)
        config = EngineConfig.from_env(checkpoint_path=args.checkpoint, device=args.device,
                                       precision=args.precision, compile_model=False if args.no_compile else None,
                                       max_new_tokens=args.max_new_tokens)
        reference_audio = None
        if args.reference_audio is not None:
            try:
                reference_audio = args.reference_audio.read_bytes()
            except OSError as exc:
                raise ValueError(f"--reference-audio: cannot read {args.reference_audio}: {exc.strerror}") from None
        if (Path(args.checkpoint) / RANDOM_WEIGHTS_MARKER).exists():
            print("NOTE: this checkpoint has RANDOM weights: the audio will be noise, not speech.", file=sys.stderr)
        start = time.perf_counter()
        with ProductionTTSEngine(config) as engine:
            chunks = []
            with tqdm(unit="s audio", desc="synthesizing", bar_format="{desc}: {n:.2f} {unit} [{elapsed}]") as bar:
                for chunk in engine.generate_stream(
                        args.text, temperature=args.temperature, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, seed=args.seed,
                        reference_audio=reference_audio, reference_text=args.reference_text):
                    chunks.append(chunk)
                    bar.update(len(chunk) / engine.sample_rate)
            audio = np.concatenate(chunks)
            try:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                sf.write(args.out, audio, engine.sample_rate)
            except (OSError, sf.LibsndfileError) as exc:
                raise ValueError(f"--out: cannot write {args.out}: {getattr(exc, 'strerror', None) or exc}") from None
            seconds = len(audio) / engine.sample_rate
            device = engine.health_check()["device"]
    except (CheckpointError, EngineConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TTSError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {seconds:.2f} s of 44.1 kHz audio in {time.perf_counter() - start:.1f} s on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
