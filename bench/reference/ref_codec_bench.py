"""The reference's (fish-speech 0.1.0) codec speed, measured like bench/codec_bench.py.

Runs only with the unpacked reference on PYTHONPATH (never imported by the product):
    PYTHONPATH=.refenv/ref python bench/reference/ref_codec_bench.py --checkpoint DIR
        [--device cuda] [--precision bfloat16] [--seconds 10] [--batches 1,8,32] --json OUT.json

The model is the reference's ``DAC``, built and loaded by tests/parity/ref_codec.py (the
parity tests' oracle: the reference constructors without Hydra, its loader's key
rewriting). Config: the checkpoint's codec_config.json, else a copy of the reference's
``modded_dac_vq.yaml`` (Hydra is stubbed out in the reference environment).

Called as the reference's own engine calls it: weights stay float32, ``DAC.decode``
runs under ``torch.autocast(precision)`` (``TTSInferenceEngine.get_audio_segment``),
``DAC.encode`` runs without autocast (``VQManager.encode_reference``), both under
``inference_mode`` (as the engine's ``inference``). Batched decode uses ``DAC.decode`` with ``[B, N, T]`` codes (the
reference engine itself decodes one request at a time). There is no incremental decoder
in the reference, so ``stream`` is null.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "parity"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ref_codec import build, load  # noqa: E402  (needs the paths above)
from timing import guarded, peak_gib, reset_peak, sync, timed  # noqa: E402

PRECISIONS = ("float32", "bfloat16", "float16")

# fish_speech/configs/modded_dac_vq.yaml without Hydra's _target_/_partial_ keys.
_TRANSFORMER = {"block_size": 4096, "n_layer": 8, "n_head": 16, "dim": 1024, "intermediate_size": 3072,
                "n_local_heads": -1, "head_dim": 64, "rope_base": 10000, "norm_eps": 1e-5, "dropout_rate": 0.1,
                "attn_dropout_rate": 0.1, "channels_first": True}
_WINDOW = {"causal": True, "window_size": 128, "input_dim": 1024, "config": _TRANSFORMER}
MODDED_DAC_VQ = {
    "sample_rate": 44100, "encoder_dim": 64, "encoder_rates": [2, 4, 8, 8], "decoder_dim": 1536,
    "decoder_rates": [8, 8, 4, 2], "encoder_transformer_layers": [0, 0, 0, 4],
    "decoder_transformer_layers": [4, 0, 0, 0],
    "transformer_general_config": {"block_size": 16384, "n_local_heads": -1, "head_dim": 64, "rope_base": 10000,
                                   "norm_eps": 1e-5, "dropout_rate": 0.1, "attn_dropout_rate": 0.1,
                                   "channels_first": True},
    "quantizer": {"input_dim": 1024, "n_codebooks": 9, "codebook_size": 1024, "codebook_dim": 8,
                  "quantizer_dropout": 0.5, "downsample_factor": [2, 2], "post_module": _WINDOW,
                  "pre_module": _WINDOW, "semantic_codebook_size": 4096},
}
# Transformer buffers the reference recomputes; a checkpoint need not hold them.
BUFFERS = ("freqs_cis", "causal_mask")


def summary(times: list[float], batch: int, seconds: float) -> dict[str, Any]:
    median = statistics.median(times)
    return {"batch": batch, "ms_p50": median * 1000, "ms_min": min(times) * 1000,
            "audio_s_per_s": batch * seconds / median}


def load_model(checkpoint: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    config_path = checkpoint / "codec_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else MODDED_DAC_VQ
    torch.manual_seed(0)
    model = build(config)
    result = load(model, str(checkpoint / "codec.pth"))
    # strict=False in the reference: a wrong key would silently bench random init weights.
    missing = [k for k in result.missing_keys if not k.endswith(BUFFERS)]
    if missing or result.unexpected_keys:
        raise SystemExit(f"codec.pth does not fit the config: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    return model.to(device), config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bfloat16", choices=PRECISIONS)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", required=True, type=Path)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device: pass --device cpu --precision float32 for a smoke run")
    batches = sorted({1, *(int(b) for b in args.batches.split(","))})
    dtype = getattr(torch, args.precision)

    reset_peak(device)
    start = time.perf_counter()
    model, config = load_model(args.checkpoint, device)
    sync(device)
    load_s = time.perf_counter() - start
    sample_rate, frame_length = model.sample_rate, int(model.frame_length)
    n_codebooks = 1 + config["quantizer"]["n_codebooks"]
    frames = max(1, round(args.seconds * sample_rate / frame_length))
    seconds = frames * frame_length / sample_rate
    result: dict[str, Any] = {
        "impl": "reference fish-speech 0.1.0",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "precision": args.precision, "checkpoint": str(args.checkpoint),
        "parameters": sum(t.numel() for t in model.parameters()),
        "sample_rate": sample_rate, "frame_length": frame_length, "frames_per_second": sample_rate / frame_length,
        "frames": frames, "audio_seconds": seconds, "warmup": args.warmup, "repeats": args.repeats,
        "load_s": load_s, "load_peak_gib": peak_gib(device),
        "decode": {}, "stream": None,
        "stream_note": "the reference has no incremental decoder: DAC.decode decodes a whole code sequence",
        "encode": {}, "encode_precision": "float32 (its engine encodes references without autocast)",
    }
    g = torch.Generator().manual_seed(0)
    semantic = torch.randint(0, config["quantizer"]["semantic_codebook_size"], (max(batches), 1, frames), generator=g)
    residual = torch.randint(0, config["quantizer"]["codebook_size"], (max(batches), n_codebooks - 1, frames),
                             generator=g)
    codes = torch.cat([semantic, residual], 1).to(device)

    def decode(b: int) -> None:
        # float32: no autocast at all (a float32 autocast would only add casts).
        autocast = torch.autocast(device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            model.decode(codes[:b], torch.full((b,), frames, device=device))

    for b in batches:
        result["decode"][f"b{b}"] = guarded(
            device, lambda: summary(timed(lambda: decode(b), device, args.warmup, args.repeats), b, seconds))
        report("decode", f"b{b}", result["decode"][f"b{b}"])

    samples = round(seconds * sample_rate)
    t = np.arange(samples) / sample_rate
    rng = np.random.default_rng(0)  # the same signal as bench/codec_bench.py's reference_audio
    wave = np.clip(0.5 * np.sin(2 * np.pi * 220 * t) + 0.1 * rng.standard_normal(samples), -1, 1)
    audio = torch.from_numpy(wave.astype(np.float32)).to(device)[None, None]
    lengths = torch.tensor([samples], device=device, dtype=torch.long)

    def encode() -> None:
        with torch.inference_mode():
            model.encode(audio, lengths)

    result["encode"]["b1"] = guarded(
        device, lambda: summary(timed(encode, device, args.warmup, args.repeats),
                                1, seconds))
    report("encode", "b1", result["encode"]["b1"])
    peaks = [v.get("peak_gib") for part in ("decode", "encode") for v in result[part].values()]
    peaks = [x for x in [result["load_peak_gib"], *peaks] if x is not None]
    result["peak_gib"] = max(peaks) if peaks else None
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


def report(part: str, key: str, r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"{part:7s}{key:5s} {r['error']}", flush=True)
        return
    peak = "" if r.get("peak_gib") is None else f"  peak {r['peak_gib']:.2f} GiB"
    print(f"{part:7s}{key:5s} {r['audio_s_per_s']:9.2f} audio s/s  {r['ms_p50']:9.2f} ms{peak}", flush=True)


if __name__ == "__main__":
    main()
