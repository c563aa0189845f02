"""Parity of our text-to-semantic model with PyPI fish-speech 0.1.0 (spec §9.3).

The reference runs live, in its isolated environment, on checkpoints generated here:
the tiny preset (codebook_size 64), a codebook_size 1040 variant (fast-logit cut to
1024) and a variant with <|speaker:0|> as a special token.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from s1_mini.generation import generate
from s1_mini.runner import decode_frame
from s1_mini.model import load_text2semantic
from s1_mini.prompt import Reference, build_prompt
from s1_mini.sampler import BatchSampling, SamplingParams
from s1_mini.testing.make_checkpoint import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REF_PYTHON = ROOT / ".refenv" / "bin" / "python"

pytestmark = pytest.mark.parity

STRINGS = [
    "Hello, world!",
    "你好，世界！今天天气很好。",
    "Numbers 0123456789 and 3.14159",
    "  runs   of spaces\n\n\nand newlines\r\n\t",
    "Really?! Yes?!x no ?!",
    "embedded <|im_end|> and <|semantic:3|> and <|speaker:0|> tokens",
    "it's we'll they'd I'M",
    "",
]
PARAMS = dict(max_new_tokens=40, temperature=0.8, top_p=0.8, repetition_penalty=1.3)
SEEDS = [1, 7]
VARIANTS = {
    "tiny": dict(overrides=None, speaker=False),
    "c1040": dict(overrides={"codebook_size": 1040}, speaker=False),
    "speaker": dict(overrides=None, speaker=True),
}


def _cases(tmp: Path, num_codebooks: int, codebook_size: int) -> list[dict]:
    rng = np.random.default_rng(0)
    paths = []
    for i, frames in enumerate([7, 5]):
        codes = rng.integers(0, min(codebook_size, 1024), size=(num_codebooks, frames)).astype(np.int64)
        np.save(tmp / f"ref{i}.npy", codes)
        paths.append(str(tmp / f"ref{i}.npy"))
    return [
        {"name": "noref", "text": "Hello world, this is S1 mini. 你好!"},
        {"name": "oneref", "text": "Say it again.", "references": [{"text": "The reference voice.", "codes": paths[0]}]},
        {"name": "tworef", "text": "Two voices?!",
         "references": [{"text": "First.", "codes": paths[0]}, {"text": "Second one", "codes": paths[1]}]},
    ]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def parity(request, tmp_path_factory):
    """(our model, tokenizer, reference dump, cases) for one checkpoint variant."""
    if not REF_PYTHON.exists():
        pytest.skip("reference environment missing: run `bash tests/parity/build_reference_env.sh`")
    variant = VARIANTS[request.param]
    tmp = tmp_path_factory.mktemp(f"t2s-{request.param}")
    ckpt = make_checkpoint(tmp / "ckpt", "tiny", seed=0, overrides=variant["overrides"],
                           speaker_token=variant["speaker"], codec=False)
    model, tok = load_text2semantic(ckpt)
    cases = _cases(tmp, model.config.num_codebooks, model.config.codebook_size)
    req = {"checkpoint": str(ckpt), "strings": STRINGS, "cases": cases, "seeds": SEEDS,
           "sample_first_token": {"case": "noref"}, **PARAMS}
    (tmp / "req.json").write_text(json.dumps(req))
    proc = subprocess.run([str(REF_PYTHON), str(ROOT / "tests/parity/ref_t2s.py"), str(tmp / "req.json"),
                           str(tmp / "ref.npz")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref = dict(np.load(tmp / "ref.npz"))
    return request.param, model, tok, ref, cases


def _prompt(model, tok, case):
    refs = [Reference(r["text"], np.load(r["codes"])) for r in case.get("references", [])]
    return build_prompt(tok, case["text"], refs, model.config.num_codebooks, model.config.codebook_size)


def test_token_ids_exact(parity):
    _, _, tok, ref, _ = parity
    for i, s in enumerate(STRINGS):
        assert tok.encode(s) == ref[f"tokens_{i}"].tolist(), s
    assert [tok.semantic_begin_id, tok.semantic_end_id, tok.im_end_id] == ref["semantic_ids"].tolist()


def test_speaker_token_is_single_token_only_when_listed(parity):
    name, _, tok, _, _ = parity
    assert (len(tok.encode("<|speaker:0|>")) == 1) == (name == "speaker")


def test_prompt_tensors_exact(parity):
    _, model, tok, ref, cases = parity
    for case in cases:
        ours = _prompt(model, tok, case)
        assert ours.dtype == torch.int32
        np.testing.assert_array_equal(ours.numpy(), ref[f"{case['name']}_prompt"], err_msg=case["name"])


def test_rope_tables_exact(parity):
    _, model, _, ref, _ = parity
    np.testing.assert_array_equal(model.freqs_cis.float().numpy(), ref["freqs_cis"])
    np.testing.assert_array_equal(model.fast_freqs_cis.float().numpy(), ref["fast_freqs_cis"])


def test_effective_sampling_params_exact(parity):
    _, _, _, ref, _ = parity
    t, p, r = SamplingParams(PARAMS["temperature"], PARAMS["top_p"], PARAMS["repetition_penalty"]).effective()
    temperature, top_p, penalty, clipped_temperature = ref["effective_params"].tolist()
    assert (top_p, penalty, t) == (p, r, clipped_temperature)
    assert penalty == 1.296875 and temperature == 0.80078125


@torch.inference_mode()
def test_all_position_logits_and_hidden(parity):
    _, model, tok, ref, cases = parity
    for case in cases:
        prompt = _prompt(model, tok, case)
        T = prompt.shape[1]
        model.setup_caches(1, T)
        out = model.forward_slow(prompt[None].long(), torch.arange(T)[None], all_positions=True)
        name = case["name"]
        assert np.abs(out.logits[0].numpy() - ref[f"{name}_all_logits"]).max() <= 1e-4
        assert np.abs(out.fast_input[0].numpy() - ref[f"{name}_all_hidden"]).max() <= 1e-4


@torch.inference_mode()
def test_prefill_logits_fast_input_and_first_frame_fast_logits(parity):
    _, model, tok, ref, cases = parity
    c = model.config
    for case in cases:
        name = case["name"]
        prompt = _prompt(model, tok, case)
        T = prompt.shape[1]
        model.setup_caches(1, c.max_seq_len)
        out = model.forward_slow(prompt[None].long(), torch.arange(T)[None])
        assert np.abs(out.logits[0].numpy() - ref[f"{name}_prefill_logits"]).max() <= 1e-4
        assert np.abs(out.fast_input[0].numpy() - ref[f"{name}_fast_input"]).max() <= 1e-4
        # First frame, greedy: the reference's fast_output at positions 1..N-1, cut to 1024.
        token = int(ref[f"{name}_greedy_tokens"][0])
        model.forward_fast(out.fast_input, 0, logits=False)
        code = torch.tensor([max(token - model.semantic_begin_id, 0)])
        for k in range(1, c.num_codebooks):
            logits = model.forward_fast(model.fast_embeddings(code), k)
            want = ref[f"{name}_fast_logits"][k][: c.fast_logit_size]
            assert logits.shape[-1] == min(c.codebook_size, 1024)
            assert np.abs(logits[0].numpy() - want).max() <= 1e-4
            code = logits.argmax(-1)


def test_greedy_frames_identical(parity):
    _, model, tok, ref, cases = parity
    params = SamplingParams(PARAMS["temperature"], PARAMS["top_p"], PARAMS["repetition_penalty"])
    for case in cases:
        codes = generate(model, [_prompt(model, tok, case)], tok.im_end_id, PARAMS["max_new_tokens"], params)[0]
        np.testing.assert_array_equal(codes.numpy(), ref[f"{case['name']}_greedy"], err_msg=case["name"])


def test_seeded_sampling_matches_reference_rng(parity):
    """Same seed, same CPU generator, same draws: the seeded frames are identical."""
    _, model, tok, ref, cases = parity
    params = SamplingParams(PARAMS["temperature"], PARAMS["top_p"], PARAMS["repetition_penalty"])
    for case in cases:
        prompt = _prompt(model, tok, case)
        for seed in SEEDS:
            codes = generate(model, [prompt], tok.im_end_id, PARAMS["max_new_tokens"], params,
                             [torch.Generator().manual_seed(seed)])[0]
            np.testing.assert_array_equal(codes.numpy(), ref[f"{case['name']}_seed{seed}"])


@torch.inference_mode()
def test_first_token_distribution_matches_reference(parity):
    """2000 seeded draws of the first token follow the reference's probabilities."""
    _, model, tok, ref, cases = parity
    prompt = _prompt(model, tok, cases[0])
    T = prompt.shape[1]
    model.setup_caches(1, T)
    out = model.forward_slow(prompt[None].long(), torch.arange(T)[None])
    draws = 2000
    params = SamplingParams(PARAMS["temperature"], PARAMS["top_p"], PARAMS["repetition_penalty"])
    from s1_mini.sampler import sample

    sampling = BatchSampling.build([params] * draws, [torch.Generator().manual_seed(s) for s in range(draws)],
                                   torch.float32, "cpu")
    ids = sample(out.logits.expand(draws, -1).clone(), None, sampling)
    freq = np.bincount(ids.numpy(), minlength=out.logits.shape[-1]) / draws
    probs = ref["first_token_probs"]
    assert freq[probs == 0].sum() == 0  # never a token the reference's top-p removed
    assert 0.5 * np.abs(freq - probs).sum() < 0.05  # total variation


def test_batched_decode_equals_alone(parity):
    """The same seed gives the same codes alone and beside other sequences."""
    _, model, tok, _, cases = parity
    params = SamplingParams(0.7, 0.9, 1.2)
    prompts = [_prompt(model, tok, case) for case in cases]
    alone = [generate(model, [p], tok.im_end_id, 30, params, [torch.Generator().manual_seed(i)])[0]
             for i, p in enumerate(prompts)]
    together = generate(model, prompts, tok.im_end_id, 30, params,
                        [torch.Generator().manual_seed(i) for i in range(len(prompts))])
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    greedy_alone = [generate(model, [p], tok.im_end_id, 30, params)[0] for p in prompts]
    greedy_together = generate(model, prompts, tok.im_end_id, 30, params)
    for a, b in zip(greedy_alone, greedy_together):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_decode_frame_shape(parity):
    _, model, tok, _, cases = parity
    prompt = _prompt(model, tok, cases[0])
    model.setup_caches(1, prompt.shape[1])
    s = BatchSampling.build([SamplingParams()], None, torch.float32, "cpu")
    with torch.inference_mode():
        frame = decode_frame(model, prompt[None].long(), torch.arange(prompt.shape[1])[None], None, s, None, None)
    assert frame.shape == (1, model.config.num_codebooks + 1)


def test_cli_codes_equal_reference_seeded_codes(parity, tmp_path):
    """`python -m s1_mini.generate` writes the reference's codes_<k>.npy for the same seed."""
    import sys

    name, model, tok, ref, cases = parity
    case = cases[1]
    ref_case = case["references"][0]
    out = tmp_path / "codes.npy"
    ckpt = Path(ref_case["codes"]).parent / "ckpt"
    proc = subprocess.run(
        [sys.executable, "-m", "s1_mini.generate", "--checkpoint", str(ckpt), "--text", case["text"],
         "--reference-text", ref_case["text"], "--reference-codes", ref_case["codes"],
         "--seed", str(SEEDS[0]), "--max-new-tokens", str(PARAMS["max_new_tokens"]),
         "--temperature", str(PARAMS["temperature"]), "--top-p", str(PARAMS["top_p"]),
         "--repetition-penalty", str(PARAMS["repetition_penalty"]), "--device", "cpu",
         "--precision", "float32", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(out), ref[f"{case['name']}_seed{SEEDS[0]}"])


def test_full_size_rope_tables_exact(tmp_path):
    """S1-mini's slow table (8192 x 128, base 1e6) and fast table, against the reference's builder."""
    if not REF_PYTHON.exists():
        pytest.skip("reference environment missing: run `bash tests/parity/build_reference_env.sh`")
    from s1_mini.rope import rope_table

    code = ("import sys, numpy as np; from fish_speech.models.text2semantic.llama import precompute_freqs_cis as f; "
            "np.savez(sys.argv[1], slow=f(8192, 128, 1e6).float().numpy(), fast=f(10, 128, 1e6).float().numpy())")
    subprocess.run([str(REF_PYTHON), "-c", code, str(tmp_path / "rope.npz")], check=True, capture_output=True)
    ref = np.load(tmp_path / "rope.npz")
    np.testing.assert_array_equal(rope_table(8192, 128, 1e6).float().numpy(), ref["slow"])
    np.testing.assert_array_equal(rope_table(10, 128, 1e6).float().numpy(), ref["fast"])
