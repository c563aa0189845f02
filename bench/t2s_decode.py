"""Text-to-semantic speed of our model on one GPU: prefill and steady decode.

    python bench/t2s_decode.py --checkpoint DIR [--precision bfloat16] [--frames 128]
        [--batch-sizes 1,8,32] [--compile] --json OUT.json

Decode runs with <|im_end|> disabled so every step produces a frame; frames/s counts
frames of all sequences together (per-stream = aggregate / batch). Random weights:
speed only, the audio would be noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from s1_mini.compilation import buckets, compile_or_eager
from s1_mini.model import load_text2semantic
from s1_mini.prompt import build_prompt
from s1_mini.runner import ModelRunner, SequenceState
from s1_mini.sampler import SamplingParams

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs far away. "


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prompt_of(tokenizer, model, tokens: int) -> torch.Tensor:
    text = SENTENCE
    while build_prompt(tokenizer, text, [], model.config.num_codebooks, model.config.codebook_size).shape[1] < tokens:
        text += SENTENCE
    p = build_prompt(tokenizer, text, [], model.config.num_codebooks, model.config.codebook_size)
    return p[:, :tokens]


def time_prefill(runner: ModelRunner, prompt: torch.Tensor, repeats: int = 7) -> float:
    times = []
    for i in range(repeats):
        seq = SequenceState(prompt, 2048, SamplingParams(), i, torch.Generator(runner.device).manual_seed(i))
        runner.acquire(seq)
        sync()
        start = time.perf_counter()
        runner.prefill(seq)
        sync()
        times.append(time.perf_counter() - start)
        runner.release(seq)
    return statistics.median(times[2:]) * 1000


def time_decode(runner: ModelRunner, prompt: torch.Tensor, batch: int, frames: int, warmup: int) -> float:
    seqs = [SequenceState(prompt, frames + warmup + 4, SamplingParams(), b, torch.Generator(runner.device).manual_seed(b))
            for b in range(batch)]
    for s in seqs:
        runner.acquire(s)
        runner.prefill(s)
    for _ in range(warmup):
        runner.decode(seqs)
    sync()
    start = time.perf_counter()
    for _ in range(frames):
        runner.decode(seqs)
    sync()
    elapsed = time.perf_counter() - start
    for s in seqs:
        runner.release(s)
    return batch * frames / elapsed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--precision", default="bfloat16")
    p.add_argument("--frames", type=int, default=128)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cache-len", type=int, default=0, help="KV positions per sequence (0: the model's, as the reference)")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.precision)
    model, tok = load_text2semantic(args.checkpoint, device, dtype)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    runner = ModelRunner(model, im_end_id=-1, max_batch_size=max(batches),
                         max_seq_len=args.cache_len or model.config.max_seq_len)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "precision": args.precision, "compiled": args.compile}
    result["buckets"] = buckets(runner.max_batch_size)
    if args.compile:  # inductor, then one CUDA graph per batch bucket and prompt-length bucket (the engine's path)
        start = time.perf_counter()
        runner.compile(lambda fn, dynamic: compile_or_eager(fn, "inductor", None, fullgraph=True, dynamic=dynamic))
        result["compile_s"] = time.perf_counter() - start
    result["prefill_ms_30"] = time_prefill(runner, prompt_of(tok, model, 30))
    if runner.max_seq_len > 700:
        result["prefill_ms_600"] = time_prefill(runner, prompt_of(tok, model, 600))
    prompt = prompt_of(tok, model, 30)
    for b in batches:
        result[f"decode_fps_b{b}"] = time_decode(runner, prompt, b, args.frames, warmup=8 if args.compile else 4)
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(result, indent=1))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
