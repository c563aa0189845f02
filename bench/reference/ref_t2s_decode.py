"""The reference's (fish-speech 0.1.0) text-to-semantic speed, measured like ours.

Runs only with the unpacked reference on PYTHONPATH (never imported by the product):
    PYTHONPATH=.refenv/ref python bench/reference/ref_t2s_decode.py --checkpoint DIR --json OUT.json [--compile]

Prefill and the per-frame step are the reference's own `decode_one_token_ar`, with its
bf16 sampling tensors and its MATH-attention context for decode steps, as in its
`decode_n_tokens` loop (without the <|im_end|> break, so every step counts).
"""

import argparse
import json
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import fish_speech.models.text2semantic.inference as ref
from fish_speech.content_sequence import ContentSequence, TextPart

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs far away. "


def prompt_of(model, tokens):
    text = SENTENCE * 40
    seq = ContentSequence(modality="interleave")
    seq.append([TextPart(text=text)], add_end=False, speaker=0)
    encoded, _, _ = seq.encode_for_inference(model.tokenizer, num_codebooks=model.config.num_codebooks)
    return encoded[:, :tokens].cuda()


@torch.inference_mode()  # as the reference's own generate(): no autograd history in the KV cache
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--frames", type=int, default=128)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    model, decode_one_token = ref.init_model(args.checkpoint, "cuda", torch.bfloat16, compile=args.compile)
    kw = dict(temperature=torch.tensor(0.8, device="cuda", dtype=torch.bfloat16),
              top_p=torch.tensor(0.8, device="cuda", dtype=torch.bfloat16),
              repetition_penalty=torch.tensor(1.1, device="cuda", dtype=torch.bfloat16),
              audio_masks=None, audio_parts=None)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "compiled": args.compile}
    for n in (30, 600):
        prompt = prompt_of(model, n)
        times = []
        for _ in range(7):
            torch.cuda.synchronize()
            start = time.perf_counter()
            ref.decode_one_token_ar(model, prompt.view(1, prompt.shape[0], -1), torch.arange(n, device="cuda"), **kw)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result[f"prefill_ms_{n}"] = statistics.median(times[2:]) * 1000
    prompt = prompt_of(model, 30)
    T = prompt.shape[1]
    cur = ref.decode_one_token_ar(model, prompt.view(1, prompt.shape[0], -1), torch.arange(T, device="cuda"), **kw)
    history = torch.zeros((model.config.num_codebooks + 1, model.config.max_seq_len), dtype=torch.int, device="cuda")
    input_pos = torch.tensor([T], device="cuda", dtype=torch.int)

    def step(i):
        nonlocal cur
        window = history[:, :16] if i < 16 else history[:, i - 16:i]
        with sdpa_kernel(SDPBackend.MATH):
            nxt = decode_one_token(model=model, x=cur.view(1, -1, 1), input_pos=input_pos,
                                   previous_tokens=window, **kw).clone()
        input_pos.add_(1)
        history[:, i:i + 1] = nxt.view(-1, 1)
        cur = nxt

    start = time.perf_counter()
    for i in range(8):
        step(i)
    torch.cuda.synchronize()
    if args.compile:
        result["compile_s"] = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(8, 8 + args.frames):
        step(i)
    torch.cuda.synchronize()
    result["decode_fps_b1"] = args.frames / (time.perf_counter() - start)
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(result, indent=1))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
