"""The reference's (fish-speech 0.1.0) side of bench/gpu_parity.py, on one device.

Runs only with the unpacked reference on PYTHONPATH (never imported by the product):
    PYTHONPATH=.refenv/ref .refenv/bin/python bench/reference/ref_gpu_parity.py \
        --checkpoint DIR --request W/request.npz --device cuda --out W/ref.npz --json W/ref.json

The request (written by `gpu_parity.py prompts`) holds the prompt tensors, the frame
count, the greedy sampling values and the reduced precision. For each prompt it writes:
  greedy_<i>  [F, N+1]  float32 greedy frames: the reference's prefill and per-frame step
                        (`decode_one_token_ar`, MATH attention for decode steps, bf16
                        sampling tensors, penalty window as in `decode_n_tokens`), with
                        its multinomial helper replaced by argmax and no <|im_end|> stop,
                        so every prompt gives F frames;
  margin_<i>  [F, N+1]  the top-2 gap of the (penalized) logits of each draw (codebook 0
                        comes from the token: its gap is the token's); a frame that
                        differs where this is ~1e-4 or less is a near tie (spec §9.3 #9);
  top1_<i>    [T]       argmax of the all-position logits in the reduced precision
                        (no caches, input_pos None: spec §9.3 #5);
  topk_ids_<i>, topk_vals_<i> [T, K]  their top K, for a logit-level comparison.
"""

import argparse
import json
import time

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import fish_speech.models.text2semantic.inference as ref
from fish_speech.models.text2semantic.llama import BaseTransformer, DualARTransformer

PENALTY_WINDOW = 16  # decode_n_tokens' window


class PastSemanticRange(Exception):
    """A greedy token past the semantic range: the reference's fast embedding lookup would
    index out of range (on CUDA a device assert that kills the process), so stop first."""


def load(checkpoint, device, dtype):
    return DualARTransformer.from_pretrained(checkpoint, load_weights=True).to(device=device, dtype=dtype).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def greedy(model, prompt, frames, params, device):
    """F greedy frames [F, N+1] and the top-2 logit gap of each draw; stops early (with
    the reason) at a token the reference cannot embed."""
    n = model.config.num_codebooks
    end_id = model.tokenizer.semantic_end_id
    margins = []

    original, sampler = ref.logits_to_probs, ref.multinomial_sample_one_no_sync

    def recording(logits, temperature, top_p, repetition_penalty, previous_tokens=None):
        probs = original(logits, temperature, top_p, repetition_penalty, previous_tokens)
        # logits_to_probs applied the penalty to `logits` in place: its top 2 are the ones argmax saw
        top = logits.float().topk(2).values
        margins.append(top[0] - top[1])
        return probs

    def argmax(probs):
        idx = torch.argmax(probs, dim=-1, keepdim=True).to(dtype=torch.int)
        if probs.shape[-1] == model.config.vocab_size and int(idx) > end_id:
            raise PastSemanticRange(f"greedy token {int(idx)} > semantic end {end_id}")
        return idx

    t, p, r = (torch.tensor(v, device=device, dtype=torch.bfloat16) for v in params)  # as generate() builds them
    kw = {"temperature": t, "top_p": p, "repetition_penalty": r, "audio_masks": None, "audio_parts": None}
    ref.logits_to_probs, ref.multinomial_sample_one_no_sync = recording, argmax
    out, error = [], None
    try:
        with torch.device(device):
            model.setup_caches(max_batch_size=1, max_seq_len=model.config.max_seq_len, dtype=torch.float32)
        T = prompt.shape[1]
        cur = ref.decode_one_token_ar(model, prompt[None], torch.arange(T, device=device), **kw)
        out.append(cur.view(-1))
        history = torch.zeros((n + 1, model.config.max_seq_len), dtype=torch.int, device=device)
        pos = torch.tensor([T], device=device, dtype=torch.int)
        for i in range(frames - 1):
            window = history[:, :PENALTY_WINDOW] if i < PENALTY_WINDOW else history[:, i - PENALTY_WINDOW:i]
            with sdpa_kernel(SDPBackend.MATH):
                cur = ref.decode_one_token_ar(model, cur.view(1, n + 1, 1), pos, previous_tokens=window, **kw).clone()
            pos += 1
            history[:, i:i + 1] = cur.view(-1, 1)
            out.append(cur.view(-1))
    except PastSemanticRange as exc:
        error = f"frame {len(out)}: {exc}; the reference stops there"
    finally:
        ref.logits_to_probs, ref.multinomial_sample_one_no_sync = original, sampler
    done = len(out)
    codes = torch.stack(out).cpu().numpy().astype(np.int64) if out else np.zeros((0, n + 1), np.int64)
    # N draws per frame: the token, then codebooks 1..N-1 (codebook 0 is the token's, so its gap too)
    gaps = torch.stack(margins[:done * n]).view(done, n) if out else torch.zeros(0, n)
    gaps = torch.cat([gaps[:, :1], gaps], dim=1)
    return codes, gaps.cpu().numpy().astype(np.float32), error


@torch.inference_mode()
def top1(model, prompt, k):
    """Argmax and top k of the all-position logits, on a model without caches."""
    logits = BaseTransformer.forward_generate(model, prompt[None], input_pos=None, return_all=True).logits[0]
    top = logits.float().topk(k, dim=-1)
    return logits.argmax(-1).cpu().numpy(), top.indices.cpu().numpy(), top.values.cpu().numpy()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--request", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--out", required=True)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    device = torch.device(args.device)
    req = np.load(args.request)
    prompts = [torch.from_numpy(req[f"prompt_{i}"]).to(device) for i in range(int(req["count"]))]
    frames, params = int(req["frames"]), [float(v) for v in req["greedy_params"]]
    precision = str(req["precision"])
    out = {}
    result = {"impl": "reference", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "matmul_precision": torch.get_float32_matmul_precision(),
              "frames": frames, "greedy_params": params, "precision": precision, "errors": {}}

    model = load(args.checkpoint, device, torch.float32)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        out[f"greedy_{i}"], out[f"margin_{i}"], error = greedy(model, prompt, frames, params, device)
        if error:
            result["errors"][f"greedy_{i}"] = error
        print(f"reference greedy float32 prompt {i} ({prompt.shape[1]} tokens): "
              f"{len(out[f'greedy_{i}'])}/{frames} frames" + (f" ({error})" if error else ""), flush=True)
    sync(device)
    result["greedy_s"] = time.perf_counter() - start
    del model

    model = load(args.checkpoint, device, getattr(torch, precision))  # fresh: caches not set up (spec §9.3 #5)
    for i, prompt in enumerate(prompts):
        out[f"top1_{i}"], out[f"topk_ids_{i}"], out[f"topk_vals_{i}"] = top1(model, prompt, args.topk)
        print(f"reference all-position logits {precision} prompt {i}: {prompt.shape[1]} positions", flush=True)
    np.savez(args.out, **out)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
