"""How many graphs a start-up compiles, per compiled region: what cold start pays for.

    python bench/compile_count.py --checkpoint DIR [--max-batch-size 128] [--max-seq-len 2048]

Builds the runner and the codec streams as the engine does, compiles them through
dynamo with a backend that only counts (no inductor: seconds on a CPU), runs every step
the runner would capture on CUDA (decode per bucket of rows and attention length, prefill
per bucket of rows, prompt length and attention length) and the codec's step per bucket
of rows, and prints the graphs per region (as JSON). A step that does not trace whole
(``fullgraph``) raises: exit status 1. On the GPU each of them is one inductor
compile at start-up (an empty cache) or one cache load (a warm one). The text-to-semantic
counts depend only on the buckets (the tiny checkpoint gives S1-mini's); the codec's
depend on its layers and on the device (on CUDA its dilated convs run over phases, whose
strides add compiles), so a CPU run of the tiny codec only bounds them from below.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch

from s1_mini.codec import Codec, CodecStreams
from s1_mini.config import EngineConfig
from s1_mini.model import load_text2semantic
from s1_mini.runner import ModelRunner


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--max-batch-size", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--prefill-batch-size", type=int, default=EngineConfig.prefill_batch_size)
    p.add_argument("--stream-chunk-frames", type=int, default=EngineConfig.stream_chunk_frames)
    args = p.parse_args()
    graphs: collections.Counter = collections.Counter()

    def counting(fn, dynamic):
        def backend(gm, example_inputs):
            graphs[f"{fn.__name__} (dynamic={dynamic})"] += 1
            return gm.forward

        return torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)

    model, tokenizer = load_text2semantic(args.checkpoint)
    runner = ModelRunner(model, tokenizer.im_end_id, args.max_batch_size, args.max_seq_len,
                         prefill_batch_size=args.prefill_batch_size)
    start = time.perf_counter()
    steps = []
    with torch.inference_mode():
        runner.compile(counting)  # on a CPU this captures nothing: the steps run below
        runner.capture_graphs(lambda step, pool: steps.append(step) or (None, None), None)
        for step in steps:
            step()
    streams = CodecStreams(Codec.from_checkpoint(args.checkpoint), args.max_batch_size, args.stream_chunk_frames)
    streams.compile(lambda fn: counting(fn, True))
    with torch.inference_mode():
        for rows in reversed(streams.buckets):
            streams._step(rows)
    print(json.dumps({"captured_steps": {"decode": len(runner.graphs), "prefill": len(runner.prefill_graphs),
                                         "codec": len(streams.buckets)},
                      "steps_run": len(steps), "decode_row_buckets": runner.buckets,
                      "prefill_rows": sorted({rows for rows, _, _ in runner.prefill_graphs}),
                      "graphs": dict(graphs), "graphs_total": sum(graphs.values()),
                      "seconds": round(time.perf_counter() - start, 1)}, indent=1))


if __name__ == "__main__":
    main()
