"""The engine end to end on a GPU: start (compile + warm-up), one request, 8 concurrent
requests, and a stream's time to first audio. Random weights: speed only.

    python bench/engine_gpu.py --checkpoint DIR [--compile] --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch

from s1_mini import EngineConfig, ProductionTTSEngine

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest."


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    config = EngineConfig(checkpoint_path=args.checkpoint, device="cuda", precision="bfloat16",
                          compile_model=args.compile, max_new_tokens=200, max_batch_size=8, max_seq_len=2048)
    start = time.perf_counter()
    engine = ProductionTTSEngine(config).start()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "compiled": args.compile,
              "start_s": time.perf_counter() - start, "health": engine.health_check()}
    one = engine.generate(TEXT, seed=1)
    assert one.success, one.error
    result["single"] = one.timings.as_dict()
    responses = [None] * 8

    def call(i: int) -> None:
        responses[i] = engine.generate(TEXT, seed=i)

    start = time.perf_counter()
    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    assert all(r.success for r in responses), [r.error for r in responses]
    audio = sum(r.timings.audio_seconds for r in responses)
    result["concurrent8"] = {"wall_s": wall, "audio_s": audio, "audio_s_per_s": audio / wall,
                             "frames_per_s": sum(r.timings.frames for r in responses) / wall,
                             "peak_batch": engine.health_check()["peak_batch"]}
    start = time.perf_counter()
    stream = engine.generate_stream(TEXT, seed=3)
    next(stream)
    result["stream_ttfa_s"] = time.perf_counter() - start
    for _ in stream:
        pass
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    engine.stop()
    print(json.dumps(result, indent=1, default=str))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
