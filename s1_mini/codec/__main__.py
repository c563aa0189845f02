"""Codec command line.

    python -m s1_mini.codec encode IN.wav --checkpoint DIR --out codes.npy
    python -m s1_mini.codec decode codes.npy --checkpoint DIR --out OUT.wav [--device cuda] [--precision bf16]

Codes files are ``[N, T]`` integer ``.npy`` arrays, the layout of the reference's
``codes_<k>.npy``. Bad input ends with a one-line message and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile
import torch

from ..checkpoint import CheckpointError
from .audio import SAMPLE_RATE, AudioError, encode_reference_audio
from .config import CodecConfigError
from .model import Codec

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(Exception):
    """Bad input from the command line, reported without a traceback."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m s1_mini.codec", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    encode = commands.add_parser("encode", help="audio file -> codes .npy [N, T]")
    encode.add_argument("input", type=Path, help="audio file (WAV, FLAC, OGG, MP3, ...); any rate, any channels")
    decode = commands.add_parser("decode", help="codes .npy [N, T] -> WAV at 44.1 kHz")
    decode.add_argument("input", type=Path, help="codes .npy, integers [N, T]")
    for command in (encode, decode):
        command.add_argument("--checkpoint", type=Path, required=True, help="directory with codec.pth")
        command.add_argument("--out", type=Path, required=True)
        command.add_argument("--device", default="cpu")
        command.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    args = parser.parse_args(argv)
    try:
        if not args.input.is_file():
            raise UsageError(f"input file not found: {args.input}")
        if args.out.is_dir():
            raise UsageError(f"--out: {args.out} is a directory; pass a file name")
        device = _device(args.device)
        try:
            codec = Codec.from_checkpoint(args.checkpoint, device, PRECISIONS[args.precision])
        except (CheckpointError, CodecConfigError) as exc:
            raise UsageError(f"--checkpoint: {exc}") from None
        if args.command == "encode":
            try:
                codes = encode_reference_audio(codec, args.input)
            except AudioError as exc:
                raise UsageError(f"input: {exc}") from None
            _write(args.out, lambda: np.save(args.out, codes))
            print(f"{args.out}: codes {list(codes.shape)}")
        else:
            codes = _read_codes(args.input, codec)
            if args.out.suffix[1:].upper() not in soundfile.available_formats():
                raise UsageError(f"--out: the extension of {args.out.name!r} names no audio format; use .wav or .flac")
            audio = codec.decode(torch.from_numpy(codes)[None])[0].cpu().numpy()
            _write(args.out, lambda: soundfile.write(args.out, audio, SAMPLE_RATE, subtype="FLOAT"))
            print(f"{args.out}: {audio.size / SAMPLE_RATE:.2f} s at {SAMPLE_RATE} Hz")
    except (UsageError, CheckpointError, CodecConfigError, AudioError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _write(out: Path, write: Callable[[], object]) -> None:
    """Run ``write`` after creating the folder; a failure names ``--out`` and the reason."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write()
    except (OSError, soundfile.LibsndfileError) as exc:
        raise UsageError(f"--out: cannot write {out}: {getattr(exc, 'strerror', None) or exc}") from None


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device: invalid device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: CUDA was requested but is not available")
    return device


def _read_codes(path: Path, codec: Codec) -> np.ndarray:
    try:
        codes = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UsageError(f"input: cannot read codes from {path}: {exc}") from exc
    n = codec.config.num_codebooks
    if codes.ndim != 2 or codes.shape[0] != n:
        raise UsageError(f"input: {path}: expected codes [{n}, T], got shape {list(codes.shape)}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise UsageError(f"input: {path}: codes must be integers, got {codes.dtype}")
    if codes.size and codes.min() < 0:
        raise UsageError(f"input: {path}: codes must be non-negative")
    return codes.astype(np.int64)


if __name__ == "__main__":
    sys.exit(main())
