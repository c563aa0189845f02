"""Config parsing, checkpoint loading, tokenizer, prompt and generator behaviour of our
text-to-semantic model (no reference needed)."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from s1_mini.checkpoint import CheckpointError
from s1_mini.generation import GenerationError, generate, resolve_max_new_tokens
from s1_mini.model import ModelConfig, expected_shapes, load_text2semantic
from s1_mini.prompt import PromptError, Reference, build_prompt
from s1_mini.sampler import SamplingParams, bf16_round
from s1_mini.testing.make_checkpoint import PRESETS, make_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "tiny", seed=0, codec=False)


def _copy_with_weights(src: Path, dst: Path, state) -> Path:
    dst.mkdir()
    for name in ["config.json", "tokenizer.tiktoken", "special_tokens.json"]:
        (dst / name).write_bytes((src / name).read_bytes())
    torch.save(state, dst / "model.pth")
    return dst


# ---------------------------------------------------------------- config.json


def test_config_derived_values():
    c = ModelConfig.from_dict({"model_type": "dual_ar", "dim": 200, "n_head": 4, "head_dim": None,
                               "fast_dim": 0, "fast_attention_qk_norm": None, "attention_qk_norm": True})
    assert c.n_local_heads == 4  # -1 -> n_head
    assert c.intermediate_size == 768  # floor(2*800/3) = 533 rounded up to a multiple of 256
    assert c.head_dim == 50  # null -> dim // n_head
    assert c.fast_dim == 200  # 0 falls back by truthiness
    assert c.fast_attention_qk_norm is True  # null -> slow flag
    assert ModelConfig.from_dict({"model_type": "dual_ar"}).head_dim == 64  # default, not derived


def test_config_unknown_key_is_named():
    with pytest.raises(CheckpointError, match=r"unknown keys \['bogus_field'\]"):
        ModelConfig.from_dict({"model_type": "dual_ar", "bogus_field": 1})


@pytest.mark.parametrize("raw, rule", [
    ({"model_type": "naive"}, "model_type must be 'dual_ar'"),
    ({"model_type": "dual_ar", "dim": 65, "n_head": 4}, "dim must be divisible by n_head"),
    ({"model_type": "dual_ar", "dim": 96, "n_head": 6, "n_local_heads": 4}, "n_head must be divisible by n_local_heads"),
    ({"model_type": "dual_ar", "is_reward_model": True}, "is_reward_model must be false"),
    ({"model_type": "dual_ar", "n_layer": 0}, "n_layer must be a positive integer"),
])
def test_config_rules_are_named(raw, rule):
    with pytest.raises(CheckpointError, match=rule):
        ModelConfig.from_dict(raw)


def test_s1_mini_preset_shape():
    c = ModelConfig.from_dict(PRESETS["s1-mini"])
    n = sum(int(np.prod(s)) for s in expected_shapes(c).values())
    assert 7.1e8 < n < 7.2e8  # 1.43 GB of bf16 weights
    assert c.fast_logit_size == 1024 and c.num_codebooks == 10 and c.codebook_size == 4096


# ---------------------------------------------------------------- model.pth


def test_missing_key_is_named(tiny, tmp_path):
    state = torch.load(tiny / "model.pth", weights_only=True)
    del state["layers.1.feed_forward.w2.weight"]
    ckpt = _copy_with_weights(tiny, tmp_path / "c", state)
    with pytest.raises(CheckpointError, match="missing keys.*layers.1.feed_forward.w2.weight"):
        load_text2semantic(ckpt)


def test_shape_mismatch_names_key_and_both_shapes(tiny, tmp_path):
    state = torch.load(tiny / "model.pth", weights_only=True)
    state["norm.weight"] = torch.ones(63)
    ckpt = _copy_with_weights(tiny, tmp_path / "c", state)
    with pytest.raises(CheckpointError, match=r"norm.weight: checkpoint has \[63\], the config expects \[64\]"):
        load_text2semantic(ckpt)


def test_reference_key_rewrites(tiny, tmp_path):
    """state_dict wrapper, 'model.' removal, audio_ keys dropped, wq/wk/wv merged."""
    state = torch.load(tiny / "model.pth", weights_only=True)
    base, _ = load_text2semantic(tiny)
    rewritten = OrderedDict()
    for k, v in state.items():
        if k.endswith("attention.wqkv.weight"):
            s = base.fast_shape if k.startswith("fast") else base.slow_shape
            q, kk, vv = v.split([s.n_head * s.head_dim, s.n_kv_head * s.head_dim, s.n_kv_head * s.head_dim])
            p = "model." + k[: -len("wqkv.weight")]
            rewritten[p + "wq.weight"], rewritten[p + "wk.weight"], rewritten[p + "wv.weight"] = q, kk, vv
        else:
            rewritten["model." + k] = v
    rewritten["model.audio_projector.weight"] = torch.zeros(3)
    rewritten["model.layers.0.attention.kv_cache.k_cache"] = torch.zeros(2)
    ckpt = _copy_with_weights(tiny, tmp_path / "c", {"state_dict": rewritten})
    model, _ = load_text2semantic(ckpt)
    for (k, a), (_, b) in zip(base.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_weights_never_unpickle_objects(tiny, tmp_path):
    ckpt = _copy_with_weights(tiny, tmp_path / "c", {})
    with open(ckpt / "model.pth", "wb") as f:
        pickle.dump({"embeddings.weight": Evil()}, f)
    with pytest.raises(CheckpointError, match="cannot read weight file"):
        load_text2semantic(ckpt)


def test_tokenizer_larger_than_vocab_is_refused(tiny, tmp_path):
    ckpt = _copy_with_weights(tiny, tmp_path / "c", torch.load(tiny / "model.pth", weights_only=True))
    config = json.loads((ckpt / "config.json").read_text())
    config["vocab_size"] = 392
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="every token id must be < vocab_size"):
        load_text2semantic(ckpt)


def test_generator_is_deterministic_per_seed(tmp_path):
    a = make_checkpoint(tmp_path / "a", "tiny", seed=3, codec=False)
    b = make_checkpoint(tmp_path / "b", "tiny", seed=3, codec=False)
    c = make_checkpoint(tmp_path / "c", "tiny", seed=4, codec=False)
    sa, sb, sc = (torch.load(p / "model.pth", weights_only=True) for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["embeddings.weight"], sc["embeddings.weight"])
    assert (a / "tokenizer.tiktoken").read_text() == (b / "tokenizer.tiktoken").read_text()


def test_generator_refuses_a_model_that_does_not_fit_the_codec(tmp_path):
    with pytest.raises(CheckpointError, match="codebook_size >= 64"):
        make_checkpoint(tmp_path / "x", "tiny", seed=0, overrides={"codebook_size": 32})


# ---------------------------------------------------------------- prompt


def test_prompt_rejects_bad_reference_codes(tiny):
    model, tok = load_text2semantic(tiny)
    c = model.config

    def build(codes):
        return build_prompt(tok, "hi", [Reference("ref", codes)], c.num_codebooks, c.codebook_size)

    with pytest.raises(PromptError, match=r"references\[0\].codes: must have shape \[4, frames\]"):
        build(np.zeros((3, 5), dtype=np.int64))
    with pytest.raises(PromptError, match="codebook 0 values must be < 64"):
        build(np.full((4, 5), 64))
    with pytest.raises(PromptError, match="must be >= 0"):
        build(np.full((4, 5), -1))
    with pytest.raises(PromptError, match="must be integers"):
        build(np.zeros((4, 5), dtype=np.float32))
    prompt = build(np.ones((4, 5), dtype=np.int64))
    assert prompt.shape[0] == 5 and prompt.dtype == torch.int32


# ---------------------------------------------------------------- generation


def test_length_rules():
    assert resolve_max_new_tokens(10, 0, 256) == 246
    assert resolve_max_new_tokens(10, 1000, 256) == 246
    assert resolve_max_new_tokens(10, 40, 256) == 40
    for bad in (1, -3):
        with pytest.raises(GenerationError, match="max_new_tokens: must be 0"):
            resolve_max_new_tokens(10, bad, 256)
    with pytest.raises(GenerationError, match="must be shorter than max_seq_len"):
        resolve_max_new_tokens(256, 0, 256)
    with pytest.raises(GenerationError, match="fewer than 2 frames"):
        resolve_max_new_tokens(255, 0, 256)


@pytest.mark.parametrize("field, value", [("temperature", 0), ("temperature", 2.0), ("top_p", 0),
                                          ("top_p", 1.01), ("repetition_penalty", 2.0), ("top_p", "x")])
def test_sampling_param_rules(field, value):
    with pytest.raises(ValueError, match=f"^{field}: must satisfy"):
        SamplingParams(**{field: value}).validate()


def test_bf16_rounding_table():
    assert [bf16_round(x) for x in (0.7, 0.8, 0.9, 1.1, 1.2, 1.3, 1.5)] == [
        0.69921875, 0.80078125, 0.8984375, 1.1015625, 1.203125, 1.296875, 1.5]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_close_to_fp32(tiny, dtype):
    fp32, tok = load_text2semantic(tiny)
    low, _ = load_text2semantic(tiny, dtype=dtype)
    prompt = build_prompt(tok, "Hello there.", [], 4, 64)
    T = prompt.shape[1]
    outs = []
    with torch.inference_mode():
        for m in (fp32, low):
            m.setup_caches(1, T)
            outs.append(m.forward_slow(prompt[None].long(), torch.arange(T)[None]).logits.float())
    assert torch.isfinite(outs[1]).all()
    scale = outs[0].abs().max()
    assert (outs[0] - outs[1]).abs().max() < 0.1 * scale
    codes = generate(low, [prompt], tok.im_end_id, 20, SamplingParams(), [torch.Generator().manual_seed(0)])[0]
    assert codes.shape[0] == 4 and codes.dtype == torch.int32 and codes.shape[1] <= 19


def test_compiled_one_row_projections_equal_the_linear_layers(tiny):
    """Traced by torch.compile, a block's projections of a one-row input are a multiply and
    a float32 sum (``model.project``), of more rows the linear layers: both give the
    eager block's output (float32 rounding)."""
    from s1_mini.model import KVCache, run_block

    model, _ = load_text2semantic(tiny)
    layer = model.layers[0]
    s = model.slow_shape
    compiled = torch.compile(run_block, backend="eager", fullgraph=True, dynamic=False)
    for rows, T in ((1, 1), (2, 1), (1, 3)):
        torch.manual_seed(rows * 10 + T)
        x = torch.randn(rows, T, model.config.dim)
        pos = torch.arange(T)[None].expand(rows, T) + 4
        mask = (torch.arange(16)[None, None, :] <= pos[:, :, None])[:, None]
        outs = []
        for run in (run_block, compiled):
            cache = KVCache(rows, s.n_kv_head, 16, s.head_dim, torch.float32, "cpu")
            outs.append(run(layer, x, model.freqs_cis[pos], cache, None, pos, mask))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_generation_stops_at_im_end_and_drops_last_frame(tiny):
    model, tok = load_text2semantic(tiny)
    prompt = build_prompt(tok, "Stop.", [], 4, 64)
    slow = model.forward_slow

    def always_im_end(*args, **kwargs):
        out = slow(*args, **kwargs)
        out.logits[:, tok.im_end_id] += 1e4
        return out

    model.forward_slow = always_im_end
    # The prefill frame is not checked, the first decode step stops, and the end frame
    # is dropped: one frame of codes, codebook 0 = 0 for the non-semantic token.
    codes = generate(model, [prompt], tok.im_end_id, 40, SamplingParams())[0]
    assert codes.shape == (4, 1) and codes[0, 0] == 0


# ---------------------------------------------------------------- CLI


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "s1_mini.generate", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_codes(tiny, tmp_path):
    ref = tmp_path / "ref.npy"
    np.save(ref, np.ones((4, 6), dtype=np.int64))
    out = tmp_path / "codes.npy"
    proc = _cli("--checkpoint", tiny, "--text", "Hello!", "--reference-text", "Ref.", "--reference-codes", ref,
                "--max-new-tokens", 12, "--out", out)
    assert proc.returncode == 0, proc.stderr
    codes = np.load(out)
    assert codes.dtype == np.int32 and codes.shape[0] == 4 and 1 <= codes.shape[1] <= 11


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "1"], "max_new_tokens: must be 0"),
    (["--temperature", "3"], "temperature: must satisfy 0 < temperature < 2"),
    (["--reference-text", "x"], "same number of times"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--top-p", "0"], "--device|top_p"),
])
def test_cli_bad_input_is_a_clear_error(tiny, tmp_path, args, message):
    proc = _cli("--checkpoint", tiny, "--text", "Hi", "--out", tmp_path / "c.npy", *args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert re.search(message, proc.stderr), proc.stderr


def test_cli_missing_checkpoint(tmp_path):
    proc = _cli("--checkpoint", tmp_path / "nope", "--text", "Hi", "--out", tmp_path / "c.npy")
    assert proc.returncode == 2 and "checkpoint directory not found" in proc.stderr
