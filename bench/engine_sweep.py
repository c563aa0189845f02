"""Concurrent streams through the engine on one GPU: c = 1, 8, 32, 64 streams at once,
unique texts, with and without a registered voice. Per stream: time to first audio and
real-time factor (wall time / audio seconds); per round: aggregate audio seconds per
second and errors. Random weights: speed only (they rarely emit the end token, so every
stream runs to ``--frames``).

    python bench/engine_sweep.py --checkpoint DIR [--concurrency 1,8,32,64] --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import numpy as np
import torch

from s1_mini import EngineConfig, ProductionTTSEngine

VOICE_TEXT = "This is the voice we register once and use for every request of the round."


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def round_of(engine: ProductionTTSEngine, c: int, voice: str | None, tag: str) -> dict:
    ttfa: list[float] = []
    rtf: list[float] = []
    audio_total = [0.0]
    errors: list[str] = []
    lock = threading.Lock()
    rate = engine.sample_rate

    def stream(i: int) -> None:
        text = f"Stream {i} of round {tag}: the quick brown fox number {i * 7919 % 1000} jumps over the dog."
        start = time.perf_counter()
        first = None
        samples = 0
        try:
            for chunk in engine.generate_stream(text, seed=i, reference_id=voice, timeout=600):
                if first is None:
                    first = time.perf_counter() - start
                samples += len(chunk)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
            return
        elapsed = time.perf_counter() - start
        with lock:
            if first is None or samples == 0:
                errors.append("no audio")
                return
            ttfa.append(first)
            rtf.append(elapsed / (samples / rate))
            audio_total[0] += samples / rate

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(c)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"concurrency": c, "voice": voice is not None, "wall_s": wall, "audio_s": audio_total[0],
            "audio_s_per_s": audio_total[0] / wall, "errors": len(errors), "error_examples": errors[:3],
            "ttfa_p50_ms": percentile(ttfa, 50) * 1e3, "ttfa_p99_ms": percentile(ttfa, 99) * 1e3,
            "rtf_p50": percentile(rtf, 50), "rtf_p99": percentile(rtf, 99),
            "streams_real_time": sum(r < 1 for r in rtf)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--voice-seconds", type=float, default=20.0, help="registered voice's audio (20 s: ~470-token prompt)")
    p.add_argument("--prefix-cache-size", type=int, default=16, help="EngineConfig.prefix_cache_size (0: off)")
    p.add_argument("--prefill-batch-size", type=int, default=16, help="EngineConfig.prefill_batch_size")
    p.add_argument("--stream-chunk-frames", type=int, default=EngineConfig.stream_chunk_frames,
                   help="EngineConfig.stream_chunk_frames (frames per streamed chunk after the first)")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    config = EngineConfig(checkpoint_path=args.checkpoint, device="cuda", precision="bfloat16",
                          max_new_tokens=args.frames, max_batch_size=max(levels), max_seq_len=2048,
                          max_queue_size=4 * max(levels), prefix_cache_size=args.prefix_cache_size,
                          prefill_batch_size=args.prefill_batch_size, stream_chunk_frames=args.stream_chunk_frames)
    start = time.perf_counter()
    engine = ProductionTTSEngine(config).start()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "start_s": time.perf_counter() - start,
              "frames": args.frames, "prefix_cache_size": args.prefix_cache_size,
              "prefill_batch_size": args.prefill_batch_size, "stream_chunk_frames": args.stream_chunk_frames,
              "rounds": []}
    rate = engine.sample_rate
    t = np.arange(int(args.voice_seconds * rate)) / rate
    engine.register_voice("narrator", (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), VOICE_TEXT, rate)
    for voice in (None, "narrator"):
        for c in levels:
            round_of(engine, min(c, 4), voice, "warm")  # new prompt lengths, first chunks
            r = round_of(engine, c, voice, f"{c}-{voice}")
            print(json.dumps(r), flush=True)
            result["rounds"].append(r)
            with open(args.json, "w") as f:  # what is done so far, should a later round not finish
                json.dump(result, f, indent=1)
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["health"] = engine.health_check()
    engine.stop()
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print("median ttfa all rounds", statistics.median(r["ttfa_p50_ms"] for r in result["rounds"]))


if __name__ == "__main__":
    main()
