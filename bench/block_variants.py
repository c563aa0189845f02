"""Time one decode step's building blocks in variants, on a GPU, in CUDA graphs: which
formulation of the transformer block (and of the fast codebooks' sampler) to build.

    python bench/block_variants.py [--rows 1,64] [--variants model,cdt,...] [--kv 256,1024,10] [--json OUT]

S1-mini shapes, bf16, random weights. Block variants, each compiled by inductor (static
shapes) and replayed as a graph of ``LAYERS`` calls (like the slow stack), for a decode
step (T = 1) over a 256-position cache and for the fast stack (10 positions):

- ``model``: the block as ``s1_mini.model`` builds it (a one-row input's projections as
  inductor reductions, ``s1_mini.model.project``);
- ``gemv``: every projection through ``nn.Linear`` (cuBLAS GEMVs), as before;
- ``w13``: ``gemv`` with w1 and w3 as one concatenated projection;
- ``cdt``: ``model`` compiled with inductor's coordinate-descent tuning of its kernels'
  block sizes and warps (``coordinate_descent_tuning``, as gpt-fast compiles);
- ``math_attn``: ``model`` with a one-query attention written as multiply-and-sum
  reductions and a float32 softmax, which inductor generates, instead of SDPA;
- ``math_attn_cdt``: both;
- ``efficient``: ``model`` with SDPA's cuDNN backend off (the memory-efficient kernel).

Prints microseconds per block call and kernels per call; the fastest variant per shape is
what the model should use. Speed only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time

import torch
import torch.nn.functional as F

import s1_mini.model as model
from s1_mini.compilation import capture_graph
from s1_mini.model import Block, KVCache, StackShape

LAYERS = 28
SHAPE = StackShape(dim=1024, n_head=16, n_kv_head=8, head_dim=128, intermediate_size=3072,
                   qkv_bias=False, o_bias=False, qk_norm=True, eps=1e-6)


def w13_forward(ff):
    w13 = torch.cat([ff.w1.weight, ff.w3.weight])

    def forward(x):
        a, b = F.linear(x, w13).chunk(2, dim=-1)
        return ff.w2(F.silu(a) * b)

    return forward


def math_attend(q, keys, values, mask, grouped):
    """One query per row as reductions: scores, float32 softmax, weighted sum of values."""
    if q.shape[2] != 1:
        return attend(q, keys, values, mask, grouped)
    B, H, _, d = q.shape
    kv = keys.shape[1]
    qg = q.view(B, kv, H // kv, 1, d).float()
    scores = (qg[..., None, :] * keys.float()[:, :, None, None]).sum(-1) / math.sqrt(d)  # [B, kv, G, 1, L]
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = (weights[..., None] * values.float()[:, :, None, None]).sum(-2)  # [B, kv, G, 1, d]
    return out.view(B, H, 1, d).to(q.dtype)


attend = model.attend


@contextlib.contextmanager
def variant_setup(variant: str):
    """Patch the model module (and inductor's config) for one variant; undo after."""
    saved_project, saved_attend = model.project, model.attend
    inductor = {"coordinate_descent_tuning": variant.endswith("cdt")}
    if variant in ("gemv", "w13"):
        model.project = lambda x, weight, bias=None: F.linear(x, weight, bias)
    if variant.startswith("math_attn"):
        model.attend = math_attend
    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(variant != "efficient")
    try:
        with torch._inductor.config.patch(inductor):
            yield
    finally:
        model.project, model.attend = saved_project, saved_attend
        torch.backends.cuda.enable_cudnn_sdp(cudnn)


def time_graph(fn, reps=200) -> float:
    g, _ = capture_graph(fn, torch.cuda.graph_pool_handle())
    for _ in range(10):
        g.replay()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3  # us per graph


def kernels_of(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.self_device_time_total > 0)


@torch.inference_mode()
def run(rows: int, kv_len: int, variant: str, torch_seed: int = 0) -> dict:
    torch.manual_seed(torch_seed)
    dev, dt = torch.device("cuda"), torch.bfloat16
    block = Block(SHAPE).to(dev, dt)
    for p in block.parameters():
        p.normal_(0, 0.02)
    if variant == "w13":
        block.feed_forward.forward = w13_forward(block.feed_forward)
    cache = KVCache(rows, SHAPE.n_kv_head, max(kv_len, 10), SHAPE.head_dim, dt, dev)
    cache.k.normal_()
    cache.v.normal_()
    x = torch.randn(rows, 1, SHAPE.dim, device=dev, dtype=dt)
    pos = torch.full((rows, 1), kv_len - 1, device=dev)
    mask = (torch.arange(kv_len, device=dev)[None, None, :] <= pos[:, :, None])[:, None]
    rope = torch.randn(rows, 1, SHAPE.head_dim // 2, 2, device=dev, dtype=dt)
    eager = block(x, rope, cache, None, pos, mask)
    with variant_setup(variant):
        step = torch.compile(lambda x: block(x, rope, cache, None, pos, mask), fullgraph=True, dynamic=False)
        return measure(step, eager, x, rows, kv_len, variant)


def measure(step, eager, x, rows: int, kv_len: int, variant: str) -> dict:
    def stack():
        h = x
        for _ in range(LAYERS):
            h = step(h)
        return h

    t0 = time.perf_counter()
    stack()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    us = time_graph(stack) / LAYERS
    return {"rows": rows, "kv_len": kv_len, "variant": variant, "us_per_block": round(us, 2),
            "kernels_per_block": kernels_of(lambda: step(x)), "compile_s": round(compile_s, 1),
            "max_abs_vs_eager": float((step(x) - eager).abs().max())}


@torch.inference_mode()
def run_sampler(rows: int, variant: str) -> dict:
    """The 9 fast-codebook draws of a frame (1024 logits per row, top-p, penalty, counter
    noise): ``cumsum_op`` as ``s1_mini.sampler`` (the scan an opaque custom op), or
    ``cumsum_inductor`` (torch.cumsum, which inductor generates and fuses)."""
    import s1_mini.sampler as sampler
    dev = torch.device("cuda")
    logits = torch.randn(rows, 1024, device=dev, dtype=torch.bfloat16) * 3
    history = torch.randint(0, 1024, (rows, 16), device=dev)
    seed = torch.arange(rows, device=dev)
    step = torch.zeros(rows, dtype=torch.long, device=dev)
    par = torch.full((rows, 1), 0.8, device=dev, dtype=torch.bfloat16)
    s = sampler.BatchSampling(par, par, par + 0.3, sampler.counter_noise(seed, step), torch.zeros(rows, dtype=torch.bool, device=dev))
    saved = sampler.cumsum_last_dim
    if variant == "cumsum_inductor":
        sampler.cumsum_last_dim = lambda x: torch.cumsum(x, dim=-1)
    try:
        fn = torch.compile(sampler.sample, fullgraph=True, dynamic=False)
        draws = torch.arange(10, device=dev)
        us = time_graph(lambda: [fn(logits, history, s, draws[k]) for k in range(1, 10)]) / 9
        n = kernels_of(lambda: fn(logits, history, s, draws[1]))
        same = bool((fn(logits, history, s, draws[1]) == sampler.sample(logits, history, s, draws[1])).all())
    finally:
        sampler.cumsum_last_dim = saved
    return {"rows": rows, "sampler": variant, "us_per_draw": round(us, 2), "kernels_per_draw": n,
            "equal_to_eager": same}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="1,64")
    p.add_argument("--variants", default="model,cdt,math_attn,math_attn_cdt,efficient,gemv")
    p.add_argument("--kv", default="256,1024,10", help="cache lengths: slow-stack decode steps, the fast stack's 10")
    p.add_argument("--sampler", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json")
    args = p.parse_args()
    torch._dynamo.config.cache_size_limit = 256
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        for kv_len in [int(n) for n in args.kv.split(",")]:
            for variant in args.variants.split(","):
                try:
                    r = run(rows, kv_len, variant)
                except Exception as exc:  # report and go on: one variant failing is a result too
                    r = {"rows": rows, "kv_len": kv_len, "variant": variant, "error": repr(exc)[:300]}
                print(json.dumps(r), flush=True)
                results.append(r)
    for rows in [int(r) for r in args.rows.split(",")] if args.sampler else []:
        for variant in ("cumsum_op", "cumsum_inductor"):
            try:
                r = run_sampler(rows, variant)
            except Exception as exc:
                r = {"rows": rows, "sampler": variant, "error": repr(exc)[:300]}
            print(json.dumps(r), flush=True)
            results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
