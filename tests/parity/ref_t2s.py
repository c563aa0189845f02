"""Reference oracle for the text-to-semantic parity tests.

Runs ONLY inside the isolated reference environment (tests/parity/build_reference_env.sh):
    .refenv/bin/python tests/parity/ref_t2s.py REQUEST.json OUT.npz

It loads a checkpoint with PyPI fish-speech 0.1.0's own code, in float32 on the CPU,
and dumps what spec §9.3 lists: token ids, prompt tensors, RoPE tables, effective
sampling parameters, all-position and prefill logits, fast input, first-frame fast
logits, greedy frames (the module-level multinomial helper replaced by argmax) and
seeded frames. The request JSON:
    {"checkpoint": DIR, "strings": [...], "max_new_tokens": 40, "temperature": 0.8,
     "top_p": 0.8, "repetition_penalty": 1.3, "seeds": [..],
     "cases": [{"name": "noref", "text": "...", "references": [{"text": "...", "codes": "x.npy"}]}],
     "sample_first_token": {"case": "noref", "draws": 2000}}
"""

import json
import sys

import numpy as np
import torch

import fish_speech.models.text2semantic.inference as ref_inference
from fish_speech.content_sequence import ContentSequence, TextPart, VQPart
from fish_speech.models.text2semantic.llama import BaseTransformer, DualARTransformer

torch.set_num_threads(max(1, torch.get_num_threads()))


def load(checkpoint):
    return DualARTransformer.from_pretrained(checkpoint, load_weights=True).to(torch.float32).eval()


def build_prompt(model, case):
    # exactly as generate_long builds it
    seq = ContentSequence(modality="interleave")
    for ref in case.get("references", []):
        codes = torch.from_numpy(np.load(ref["codes"]))
        seq.append([TextPart(text=ref["text"]), VQPart(codes=codes)], add_end=True, speaker=0)
    seq.append([TextPart(text=case["text"])], add_end=False, speaker=0)
    encoded, _, _ = seq.encode_for_inference(model.tokenizer, num_codebooks=model.config.num_codebooks)
    return encoded


def run_generate(model, prompt, req):
    return ref_inference.generate(
        model=model, prompt=prompt, max_new_tokens=req["max_new_tokens"], audio_masks=None,
        audio_parts=None, temperature=req["temperature"], top_p=req["top_p"],
        repetition_penalty=req["repetition_penalty"])


def codes_of(y, prompt_len):
    # as generate_long: rows 1.. of the generated part, last frame dropped
    return y[1:, prompt_len:-1].numpy().astype(np.int32)


def main():
    req = json.load(open(sys.argv[1]))
    out = {}
    model = load(req["checkpoint"])
    tok = model.tokenizer
    for i, s in enumerate(req["strings"]):
        out[f"tokens_{i}"] = np.asarray(tok.encode(s), dtype=np.int64)
    out["semantic_ids"] = np.asarray([tok.semantic_begin_id, tok.semantic_end_id,
                                      tok.get_token_id("<|im_end|>")], dtype=np.int64)
    out["freqs_cis"] = model.freqs_cis.float().numpy()
    out["fast_freqs_cis"] = model.fast_freqs_cis.float().numpy()

    # Effective sampling parameters: recorded from inside the reference's sampler.
    seen = {}
    original_logits_to_probs = ref_inference.logits_to_probs

    def recording_logits_to_probs(logits, temperature, top_p, repetition_penalty, previous_tokens=None):
        seen.setdefault("params", [temperature.item(), top_p.item(), repetition_penalty.item(),
                                   torch.clip(temperature, min=1e-5).item()])
        return original_logits_to_probs(logits, temperature, top_p, repetition_penalty, previous_tokens)

    sampler = ref_inference.multinomial_sample_one_no_sync
    greedy = lambda probs: torch.argmax(probs, dim=-1, keepdim=True).to(dtype=torch.int)  # noqa: E731

    for case in req["cases"]:
        name = case["name"]
        model = load(req["checkpoint"])  # caches not set up yet: all-position logits first
        prompt = build_prompt(model, case)
        T = prompt.shape[1]
        out[f"{name}_prompt"] = prompt.numpy()
        with torch.inference_mode():
            res = BaseTransformer.forward_generate(model, prompt[None], input_pos=None, return_all=True)
            out[f"{name}_all_logits"] = res.logits[0].numpy()
            # the pre-norm hidden states, projected as the fast input would be
            out[f"{name}_all_hidden"] = model.fast_project_in(res.hidden_states[0]).numpy()
            model.setup_caches(max_batch_size=1, max_seq_len=model.config.max_seq_len, dtype=torch.float32)
            res = model.forward_generate(prompt[None], input_pos=torch.arange(T))
            out[f"{name}_prefill_logits"] = res.logits[0, -1].numpy()
            out[f"{name}_fast_input"] = res.hidden_states[0, -1].numpy()

            fast_logits = []
            hook = model.fast_output.register_forward_hook(
                lambda m, i, o: fast_logits.append(o[0, -1].clone()))
            ref_inference.multinomial_sample_one_no_sync = greedy
            ref_inference.logits_to_probs = recording_logits_to_probs
            y = run_generate(model, prompt, req)
            hook.remove()
            ref_inference.logits_to_probs = original_logits_to_probs
            out[f"{name}_fast_logits"] = torch.stack(fast_logits[: model.config.num_codebooks]).numpy()
            out[f"{name}_greedy"] = codes_of(y, T)
            out[f"{name}_greedy_tokens"] = y[0, T:].numpy().astype(np.int64)

            ref_inference.multinomial_sample_one_no_sync = sampler
            for seed in req.get("seeds", []):
                torch.manual_seed(seed)
                out[f"{name}_seed{seed}"] = codes_of(run_generate(model, prompt, req), T)

    first = req.get("sample_first_token")
    if first:
        # The first slow token's distribution after penalty-free top-p and temperature.
        logits = torch.from_numpy(out[f"{first['case']}_prefill_logits"]).clone()
        probs = original_logits_to_probs(
            logits, temperature=torch.tensor(req["temperature"], dtype=torch.bfloat16),
            top_p=torch.tensor(req["top_p"], dtype=torch.bfloat16),
            repetition_penalty=torch.tensor(req["repetition_penalty"], dtype=torch.bfloat16))
        out["first_token_probs"] = probs.numpy()
    out["effective_params"] = np.asarray(seen["params"], dtype=np.float64)
    np.savez(sys.argv[2], **out)


if __name__ == "__main__":
    main()
