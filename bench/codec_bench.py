"""Codec speed of our implementation on one device: offline decode, incremental decode, encode.

    python bench/codec_bench.py --checkpoint DIR [--device cuda] [--precision bfloat16]
        [--seconds 10] [--batches 1,8,32] [--chunks 1,4] [--repeats 5] [--compile]
        [--dilation phases|cudnn] [--cudnn-benchmark] --json OUT.json

The codec is loaded as the engine loads it (``Codec.from_checkpoint`` + ``set_precision``).
Codes are random, of the right shape for ``--seconds`` of audio (frames = seconds ·
sample_rate / frame_length, from the codec config). Random weights: speed only.

- ``decode.b{B}``: ``Codec.decode`` of B sequences at once (the scheduler's offline
  path, ``decode_batch``, pads and calls the same decode); audio seconds per wall second
  counts all B sequences.
- ``stream.c{C}_b{B}``: B streams decoded in lockstep with ``CodecStreams`` (chunk_frames
  C) as the scheduler streams: a first chunk of 1 frame, then chunks of C frames.
  Latency is per step (launch + collect, all B streams).
- ``--compile``: the engine's compiled path: the convs' input passes (Snake, left
  context, padding) compiled by inductor and, on CUDA, the streaming steps replayed as
  CUDA graphs (``CodecStreams.compile``).
- ``--dilation``: how CUDA runs the dilated convs: undilated over their dilation phases
  (``phases``, the default) or as cuDNN's dilated convs (``cudnn``; the CPU always does).
- ``--cudnn-benchmark``: ``torch.backends.cudnn.benchmark`` on: cuDNN times its
  convolution algorithms for each new input shape and keeps the fastest (the first call
  of a shape pays for it, in the warm-up runs).
- ``encode.b1``: ``Codec.encode`` of ``--seconds`` of reference audio (sine + noise).

Every timing synchronises CUDA before and after; warm-up runs come first; offline figures
are medians of ``--repeats``. ``peak_gib`` is CUDA peak allocated memory per measurement
(null on CPU). The reference's version is bench/reference/ref_codec_bench.py (same keys).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s1_mini.codec import Codec, CodecStreams, layers
from s1_mini.compilation import compile_or_eager
from timing import guarded, peak_gib, reset_peak, sync, timed

PRECISIONS = ("float32", "bfloat16", "float16")


def random_codes(codec: Codec, batch: int, frames: int, seed: int) -> torch.Tensor:
    """Codes ``[B, N, T]``: semantic row from its own (larger) codebook, residual rows from theirs."""
    g = torch.Generator().manual_seed(seed)
    c = codec.config
    semantic = torch.randint(0, c.semantic_codebook_size, (batch, 1, frames), generator=g)
    residual = torch.randint(0, c.codebook_size, (batch, c.num_codebooks - 1, frames), generator=g)
    return torch.cat([semantic, residual], 1)


def reference_audio(samples: int, sample_rate: int) -> torch.Tensor:
    """0.5·sin(2π·220·t) + 0.1·N(0,1), clipped: a voiced-like signal, never silence."""
    t = np.arange(samples) / sample_rate
    rng = np.random.default_rng(0)
    audio = np.clip(0.5 * np.sin(2 * np.pi * 220 * t) + 0.1 * rng.standard_normal(samples), -1, 1)
    return torch.from_numpy(audio.astype(np.float32))


def bench_decode(codec: Codec, codes: torch.Tensor, seconds: float, warmup: int, repeats: int) -> dict[str, Any]:
    times = timed(lambda: codec.decode(codes), codec.device, warmup, repeats)
    batch = codes.shape[0]
    median = statistics.median(times)
    return {"batch": batch, "ms_p50": median * 1000, "ms_min": min(times) * 1000,
            "audio_s_per_s": batch * seconds / median}


def stream_pass(streams: CodecStreams, codes: torch.Tensor, max_chunks: int | None = None) -> list[float]:
    """Decode all streams of ``codes`` [B, N, T] (on the CPU) chunk by chunk; wall seconds of each step."""
    slots = [streams.open() for _ in range(codes.shape[0])]
    frames, position, times = codes.shape[2], 0, []
    while position < frames and (max_chunks is None or len(times) < max_chunks):
        n = min(1 if position == 0 else streams.chunk_frames, frames - position)  # the first chunk is 1 frame
        start = time.perf_counter()
        streams.launch([(slot, c[:, position:position + n]) for slot, c in zip(slots, codes)])
        streams.collect()
        times.append(time.perf_counter() - start)
        position += n
    for slot in slots:
        streams.close(slot)
    return times


def bench_stream(codec: Codec, codes: torch.Tensor, chunk: int, seconds: float, passes: int,
                 compile_fn: Any) -> dict[str, Any]:
    streams = CodecStreams(codec, codes.shape[0], chunk)
    if compile_fn:
        streams.compile(compile_fn)
    codes = codes.cpu()  # as the scheduler has them
    # Warm-up: the first chunk and two steady chunks, the shapes every later call repeats.
    stream_pass(streams, codes, max_chunks=3)
    rates, first, steady, times = [], [], [], []
    for _ in range(passes):
        times = stream_pass(streams, codes)
        rates.append(codes.shape[0] * seconds / sum(times))
        first.append(times[0])
        steady.extend(times[1:] or times)  # a 1-chunk stream has no steady chunks
    ms = np.array(steady) * 1000
    return {"batch": codes.shape[0], "chunk_frames": chunk, "chunks_per_stream": len(times),
            "audio_s_per_s": statistics.median(rates), "first_chunk_ms_p50": statistics.median(first) * 1000,
            "chunk_ms_p50": float(np.percentile(ms, 50)), "chunk_ms_p99": float(np.percentile(ms, 99))}


def bench_encode(codec: Codec, audio: torch.Tensor, seconds: float, warmup: int, repeats: int) -> dict[str, Any]:
    times = timed(lambda: codec.encode(audio), codec.device, warmup, repeats)
    median = statistics.median(times)
    return {"batch": audio.shape[0], "ms_p50": median * 1000, "ms_min": min(times) * 1000,
            "audio_s_per_s": audio.shape[0] * seconds / median}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="directory with codec.pth (+ codec_config.json)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bfloat16", choices=PRECISIONS)
    p.add_argument("--seconds", type=float, default=10.0, help="audio per sequence (decode, stream, encode)")
    p.add_argument("--batches", default="1,8,32", help="batch sizes; 1 is always measured")
    p.add_argument("--chunks", default="1,4", help="streaming chunk sizes in frames (after the 1-frame first chunk)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--stream-passes", type=int, default=3, help="whole streams decoded per chunk size and batch")
    p.add_argument("--compile", action="store_true",
                   help="the engine's compiled path (inductor input passes, CUDA graphs)")
    p.add_argument("--dilation", default="phases", choices=("phases", "cudnn"),
                   help="CUDA's dilated convs: undilated over their phases, or cuDNN's dilated kernels")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its convolution algorithms per input shape and keep the fastest")
    p.add_argument("--profile", action="store_true",
                   help="print torch.profiler's kernel table for one offline decode at the largest batch <= 8")
    p.add_argument("--json", required=True, type=Path)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device: pass --device cpu --precision float32 for a smoke run")
    if args.dilation == "cudnn":
        layers.PHASED_DILATION.discard("cuda")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    batches = sorted({1, *(int(b) for b in args.batches.split(","))})
    chunks = [int(c) for c in args.chunks.split(",")]

    reset_peak(device)
    start = time.perf_counter()
    codec = Codec.from_checkpoint(args.checkpoint, device).set_precision(getattr(torch, args.precision))
    sync(device)
    load_s = time.perf_counter() - start
    c = codec.config
    frames = max(1, round(args.seconds * c.sample_rate / c.frame_length))
    seconds = frames * c.frame_length / c.sample_rate  # whole frames: the audio actually produced
    compile_fn = None
    if args.compile:
        compile_fn = lambda fn: compile_or_eager(fn, "inductor", None, fullgraph=True, dynamic=True)  # noqa: E731
        codec.compile_pointwise(compile_fn)
    result: dict[str, Any] = {
        "impl": "ours", "compiled": args.compile, "dilation": args.dilation, "cudnn_benchmark": args.cudnn_benchmark,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "precision": args.precision, "checkpoint": str(args.checkpoint),
        "parameters": sum(t.numel() for t in codec.parameters()),
        "sample_rate": c.sample_rate, "frame_length": c.frame_length,
        "frames_per_second": c.sample_rate / c.frame_length, "frames": frames, "audio_seconds": seconds,
        "warmup": args.warmup, "repeats": args.repeats, "load_s": load_s, "load_peak_gib": peak_gib(device),
        "decode": {}, "stream": {}, "encode": {},
    }
    codes = random_codes(codec, max(batches), frames, seed=0).to(device)
    for b in batches:
        result["decode"][f"b{b}"] = guarded(device, lambda: bench_decode(codec, codes[:b], seconds, args.warmup,
                                                                         args.repeats))
        report("decode", f"b{b}", result["decode"][f"b{b}"])
    for chunk in chunks:
        for b in batches:
            key = f"c{chunk}_b{b}"
            result["stream"][key] = guarded(device, lambda: bench_stream(codec, codes[:b], chunk, seconds,
                                                                         args.stream_passes, compile_fn))
            report("stream", key, result["stream"][key])
    audio = reference_audio(round(seconds * c.sample_rate), c.sample_rate)[None].to(device)
    result["encode"]["b1"] = guarded(device, lambda: bench_encode(codec, audio, seconds, args.warmup, args.repeats))
    report("encode", "b1", result["encode"]["b1"])
    peaks = [v.get("peak_gib") for part in ("decode", "stream", "encode") for v in result[part].values()]
    peaks = [x for x in [result["load_peak_gib"], *peaks] if x is not None]
    result["peak_gib"] = max(peaks) if peaks else None
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    if args.profile:
        print_profile(codec, codes[: max(b for b in batches if b <= 8)])


def print_profile(codec: Codec, codes: torch.Tensor) -> None:
    """Where one offline decode's time goes: kernels and the ops (with shapes) behind them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        codec.decode(codes)
        sync(codec.device)
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cuda_time_total" if codec.device.type == "cuda" else "self_cpu_time_total", row_limit=25,
        max_name_column_width=60, max_shapes_column_width=80)
    print(f"profile: offline decode, batch {codes.shape[0]}\n{table}", flush=True)


def report(part: str, key: str, r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"{part:7s}{key:9s} {r['error']}", flush=True)
        return
    extra = (f"chunk p50 {r['chunk_ms_p50']:8.2f} ms  p99 {r['chunk_ms_p99']:8.2f} ms  first {r['first_chunk_ms_p50']:7.2f} ms"
             if part == "stream" else f"{r['ms_p50']:9.2f} ms")
    peak = "" if r.get("peak_gib") is None else f"  peak {r['peak_gib']:.2f} GiB"
    print(f"{part:7s}{key:9s} {r['audio_s_per_s']:9.2f} audio s/s  {extra}{peak}", flush=True)


if __name__ == "__main__":
    main()
