"""Where a decode step's time goes on a GPU: compile + capture time, captured prefill,
n prompts prefilled as one batch or one by one, graph replay vs the runner's whole decode call, and a torch.profiler table (kernel count
and kernel time per step) for each batch size. Random weights: speed only.

    python bench/profile_decode.py CHECKPOINT MAX_BATCH BATCHES      # e.g. /tmp/ck 8 1,8
"""

import sys
import time

import torch
from s1_mini.compilation import compile_or_eager
from s1_mini.model import load_text2semantic
from s1_mini.runner import ModelRunner, SequenceState, decode_step, prefill_step
from s1_mini.sampler import SamplingParams
sys.path.insert(0, "bench")
from t2s_decode import prompt_of  # noqa: E402
checkpoint, max_batch, test_b = sys.argv[1], int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")]
model, tok = load_text2semantic(checkpoint, "cuda", torch.bfloat16)
runner = ModelRunner(model, -1, max_batch, 2048, prefill_batch_size=16)
t = time.perf_counter()
runner.compile(lambda fn, dynamic: compile_or_eager(fn, "inductor", None, fullgraph=True, dynamic=dynamic))
print("compile+capture s", time.perf_counter() - t, flush=True)
def profile_table(label, step, reps=3):
    """The kernels of ``step`` (the same as its graph's), launched one by one under the profiler."""
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            with torch.inference_mode():
                step()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    kernels = [e for e in ka if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in kernels) / reps
    n = sum(e.count for e in kernels) / reps
    print(f"{label}: GPU kernels per call {n:.0f}, kernel time per call {total/1e3:.3f} ms")
    print(ka.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=70))
def prefill_ms(n, reps=6):
    p = prompt_of(tok, model, n); ts = []
    for i in range(reps):
        s = SequenceState(p, 100, SamplingParams(), i); runner.acquire(s)
        torch.cuda.synchronize(); t = time.perf_counter(); runner.prefill(s); torch.cuda.synchronize()
        ts.append(time.perf_counter() - t); runner.release(s)
    return [round(x * 1e3, 1) for x in ts]
print("prefill 30 ms", prefill_ms(30), flush=True)
print("prefill 600 ms", prefill_ms(600), flush=True)
seq = SequenceState(prompt_of(tok, model, 30), 100, SamplingParams(), 0); runner.acquire(seq)
with torch.inference_mode():
    runner.prefill_inputs.load([seq], [0], 1)
profile_table("prefill 30 (bucket 64)", lambda: prefill_step(model, runner.prefill_inputs, 1, 64, 256, runner.sample_fn,
                                                                    runner.prefill_block, runner.head))
runner.release(seq)
def prefill_batch_ms(n, batched, reps=3):
    """n 30-token prompts arriving together: one batched prefill, or n one by one."""
    ts = []
    for i in range(reps):
        seqs = [SequenceState(prompt_of(tok, model, 30 + j), 100, SamplingParams(), j) for j in range(n)]
        for s in seqs: runner.acquire(s)
        torch.cuda.synchronize(); t = time.perf_counter()
        if batched:
            runner.prefill_batch(seqs)
        else:
            for s in seqs: runner.prefill(s)
        torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
        for s in seqs: runner.release(s)
    return [round(x * 1e3, 1) for x in ts]
for n in [n for n in (4, 8, 16) if n <= max_batch]:
    print(f"prefill {n} prompts ms: batched {prefill_batch_ms(n, True)}, one by one {prefill_batch_ms(n, False)}", flush=True)
p = prompt_of(tok, model, 30)
for B in test_b:
    seqs = [SequenceState(p, 10**6, SamplingParams(), b) for b in range(B)]
    for s in seqs: runner.acquire(s); runner.prefill(s)
    for _ in range(5): runner.decode(seqs)
    kv = runner._kv_len(max(s.prompt.shape[1] + len(s.frames) for s in seqs))  # the bucket decode() replays
    g, _ = runner.graphs[B, kv]
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(100): g.replay()
    torch.cuda.synchronize(); replay = (time.perf_counter() - t) / 100
    t = time.perf_counter()
    for _ in range(100): runner.decode(seqs)
    torch.cuda.synchronize(); dec = (time.perf_counter() - t) / 100
    print(f"B={B} kv_len {kv} replay {replay*1e3:.3f} ms ({B/replay:.0f} fps)  decode {dec*1e3:.3f} ms ({B/dec:.0f} fps)", flush=True)
    profile_table(f"B={B} step", lambda: decode_step(model, runner.state, B, None, runner.sample_fn,
                                                     runner.decode_block, kv, runner.head))
    for s in seqs: runner.release(s)
