"""Codec unit tests that need no reference: config, strict loading, batching, streaming,
precision, audio input and the command line."""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from s1_mini.checkpoint import CheckpointError
from s1_mini.codec import Codec, CodecConfig, CodecConfigError, encode_reference_audio, load_audio
from s1_mini.codec.audio import AudioError, audio_seconds
from s1_mini.codec.transformer import rope_table
from s1_mini.testing.codec_checkpoint import TINY_CONFIG, write_codec_checkpoint

FRAME = 64  # tiny config


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("codec_unit")
    write_codec_checkpoint(path, "tiny", seed=0)
    return path


@pytest.fixture(scope="module")
def codec(tiny_dir) -> Codec:
    return Codec.from_checkpoint(tiny_dir)


def codes_for(codec: Codec, frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    semantic = torch.randint(0, codec.config.semantic_codebook_size, (1, frames), generator=g)
    residual = torch.randint(0, codec.config.codebook_size, (codec.config.num_codebooks - 1, frames), generator=g)
    return torch.cat([semantic, residual])


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


# --- configuration ------------------------------------------------------------------


def test_official_config_derived_values():
    c = CodecConfig.official()
    assert (c.sample_rate, c.hop_length, c.frame_length) == (44100, 512, 2048)
    assert (c.num_codebooks, c.semantic_codebook_size, c.codebook_size) == (10, 4096, 1024)
    assert c.latent == 1024


def test_tiny_config_and_json_round_trip():
    c = CodecConfig.from_dict(TINY_CONFIG)
    assert (c.hop_length, c.frame_length, c.num_codebooks) == (16, 64, 4)
    assert CodecConfig.from_dict(c.to_dict()) == c
    assert CodecConfig.from_dict(CodecConfig.official().to_dict()) == CodecConfig.official()


@pytest.mark.parametrize(
    "patch, field",
    [
        (lambda d: d.update(bogus=1), "bogus"),
        (lambda d: d["quantizer"].update(_target_="x"), "quantizer._target_"),
        (lambda d: d["quantizer"]["post_module"]["config"].update(n_kv=2), "quantizer.post_module.config.n_kv"),
        (lambda d: d["transformer_general_config"].update(_partial_=True), "transformer_general_config._partial_"),
    ],
)
def test_unknown_config_field_is_named(tmp_path, patch, field):
    data = json.loads(json.dumps(TINY_CONFIG))
    patch(data)
    (tmp_path / "codec_config.json").write_text(json.dumps(data))
    with pytest.raises(CodecConfigError, match=f"unknown field.*{field}"):
        CodecConfig.from_json(tmp_path / "codec_config.json")


def test_unsupported_config_values_are_refused():
    data = json.loads(json.dumps(TINY_CONFIG))
    data["quantizer"]["pre_module"]["window_size"] = None
    with pytest.raises(CodecConfigError, match="pre_module.window_size"):
        CodecConfig.from_dict(data)
    with pytest.raises(CodecConfigError, match="causal"):
        CodecConfig.from_dict({**TINY_CONFIG, "causal": False})


def test_official_config_without_json(tmp_path):
    write_codec_checkpoint(tmp_path, "tiny", seed=0)
    (tmp_path / "codec_config.json").unlink()
    # Tiny weights against the official config: the tiny transformers' projections are unknown there.
    with pytest.raises(CheckpointError, match="unexpected keys.*input_proj"):
        Codec.from_checkpoint(tmp_path)


# --- strict loading -------------------------------------------------------------------


def _save_variant(src: Path, dst: Path, edit) -> Path:
    state = torch.load(src / "codec.pth", weights_only=True)
    state = edit(state) or state
    dst.mkdir(exist_ok=True)
    torch.save(state, dst / "codec.pth")
    (dst / "codec_config.json").write_text((src / "codec_config.json").read_text())
    return dst


def test_missing_key_is_named(tiny_dir, tmp_path):
    key = "decoder.model.2.block.1.conv.parametrizations.weight.original0"
    def edit(state):
        del state[key]

    with pytest.raises(CheckpointError, match=f"missing keys.*{key}"):
        Codec.from_checkpoint(_save_variant(tiny_dir, tmp_path / "v", edit))


def test_shape_mismatch_is_named(tiny_dir, tmp_path):
    key = "quantizer.post_module.layers.1.attention.wqkv.weight"

    def edit(state):
        state[key] = torch.zeros(3, 3)

    with pytest.raises(CheckpointError, match=f"shape mismatch for {key}"):
        Codec.from_checkpoint(_save_variant(tiny_dir, tmp_path / "v", edit))


def test_unexpected_key_is_named(tiny_dir, tmp_path):
    def edit(state):
        state["decoder.model.9.weight"] = torch.zeros(1)

    with pytest.raises(CheckpointError, match=r"unexpected keys \['decoder.model.9.weight'\]"):
        Codec.from_checkpoint(_save_variant(tiny_dir, tmp_path / "v", edit))


def test_either_weight_norm_naming_loads(tiny_dir, tmp_path, codec):
    """parametrizations.weight.original0/1 and weight_g/weight_v are interchangeable."""

    def swap(state):
        out = {}
        for k, v in state.items():
            k2 = k.replace("parametrizations.weight.original0", "weight_g").replace(
                "parametrizations.weight.original1", "weight_v"
            )
            if k2 == k:
                k2 = k.replace("weight_g", "parametrizations.weight.original0").replace(
                    "weight_v", "parametrizations.weight.original1"
                )
            out[k2] = v
        return out

    other = Codec.from_checkpoint(_save_variant(tiny_dir, tmp_path / "v", swap))
    codes = codes_for(codec, 10, 0)[None]
    assert torch.equal(other.decode(codes), codec.decode(codes))


def test_weight_norm_folding_matches_torch(tiny_dir, codec):
    """g per output channel for Conv1d, per INPUT channel for ConvTranspose1d (spec §1.5)."""
    state = torch.load(tiny_dir / "codec.pth", weights_only=True)
    for prefix, module in [
        ("decoder.model.1.block.1.conv", torch.nn.ConvTranspose1d(64, 32, 4, 2)),
        ("encoder.block.1.block.4.conv", torch.nn.Conv1d(8, 16, 4, 2)),
    ]:
        module = torch.nn.utils.parametrizations.weight_norm(module)
        module.parametrizations.weight.original0.data = state[prefix + ".parametrizations.weight.original0"]
        module.parametrizations.weight.original1.data = state[prefix + ".parametrizations.weight.original1"]
        ours = codec.get_submodule(prefix).weight
        assert torch.allclose(ours, module.weight, rtol=1e-6, atol=1e-7), prefix


def test_generator_prefix_and_wrapper(tiny_dir, tmp_path, codec):
    def wrap(state):
        return {"state_dict": {"generator." + k: v for k, v in state.items()} | {"discriminator.x": torch.zeros(1)}}

    other = Codec.from_checkpoint(_save_variant(tiny_dir, tmp_path / "v", wrap))
    codes = codes_for(codec, 10, 0)[None]
    assert torch.equal(other.decode(codes), codec.decode(codes))


def test_checkpoint_writer_is_deterministic(tmp_path):
    write_codec_checkpoint(tmp_path / "a", "tiny", seed=3)
    write_codec_checkpoint(tmp_path / "b", "tiny", seed=3)
    write_codec_checkpoint(tmp_path / "c", "tiny", seed=4)
    a, b, c = (torch.load(tmp_path / n / "codec.pth", weights_only=True) for n in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["quantizer.pre_module.norm.weight"], c["quantizer.pre_module.norm.weight"])


# --- encode / decode ----------------------------------------------------------------------


def test_encode_shapes_and_padding(codec):
    audio = torch.randn(2, 5 * FRAME + 1) * 0.3
    codes = codec.encode(audio)
    assert codes.shape == (2, 4, 6) and codes.dtype == torch.int64
    # Causal: the whole frames before the padded one do not depend on the padding.
    assert torch.equal(codec.encode(audio[:, : 5 * FRAME]), codes[:, :, :5])


def test_encode_skips_post_module_and_upsample(codec):
    """Deliberate difference: the reference runs and discards them on encode (spec §6.5)."""
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in (codec.quantizer.post_module, codec.decoder)]
    try:
        codec.encode(torch.randn(1, 3 * FRAME))
    finally:
        for h in hooks:
            h.remove()
    assert calls == []


def test_decode_batch_matches_single_decodes(codec):
    codes = [codes_for(codec, n, seed=n) for n in (5, 17, 1, 12)]
    batch = codec.decode_batch(codes)
    for c, audio in zip(codes, batch):
        single = codec.decode(c[None])[0]
        assert audio.shape == (c.shape[1] * FRAME,)
        assert diff(audio, single) <= 1e-5  # batching only changes float reduction order


def test_prefix_property(codec):
    codes = codes_for(codec, 40, 0)
    full = codec.decode(codes[None])[0]
    for k in (1, 9, 23):
        assert diff(codec.decode(codes[None, :, :k])[0], full[: k * FRAME]) <= 1e-5


def test_bad_codes_are_refused(codec):
    with pytest.raises(ValueError, match="N = 4"):
        codec.decode(torch.zeros(1, 3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="non-negative"):
        codec.decode(-torch.ones(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        codec.decode(torch.zeros(1, 4, 5))


# --- incremental decode -----------------------------------------------------------------


def test_streaming_batched_uneven_chunks_match_offline(codec):
    """Three streams at different positions, different chunk sizes per call (1 … 13 frames)."""
    lengths = [60, 37, 45]
    codes = [codes_for(codec, n, seed=10 + i) for i, n in enumerate(lengths)]
    schedules = [[1, 2, 13, 1, 7, 36], [3, 1, 1, 5, 20, 7], [1, 1, 1, 1, 1, 40]]
    states = [codec.new_stream() for _ in codes]
    pieces: list[list[torch.Tensor]] = [[] for _ in codes]
    for step in range(len(schedules[0])):
        sizes = [s[step] for s in schedules]
        starts = [st.frames for st in states]
        out = codec.decode_step(states, [c[:, t : t + n] for c, t, n in zip(codes, starts, sizes)])
        for i, (piece, n) in enumerate(zip(out, sizes)):
            assert piece.shape == (n * FRAME,)
            pieces[i].append(piece)
    for i, c in enumerate(codes):
        assert states[i].frames == lengths[i]
        assert diff(torch.cat(pieces[i]), codec.decode(c[None])[0]) <= 1e-5


def test_streaming_past_block_size(codec):
    """Past the reference's RoPE table (512 positions for the tiny quantizer transformers).

    The reference cannot go there (no parity claim); the stream must keep working and
    agree with our own offline decode, which extends the table the same way.
    """
    codes = codes_for(codec, 530, seed=5)
    state = codec.new_stream()
    pieces = [codec.decode_step([state], [codes[:, t : t + n]])[0] for t, n in [(0, 500), (500, 11), (511, 1), (512, 18)]]
    assert diff(torch.cat(pieces), codec.decode(codes[None])[0]) <= 1e-5
    # The extended table agrees with the block-size table where both exist.
    assert torch.equal(rope_table(1100, 16, 10000)[:512], rope_table(512, 16, 10000))


def test_streaming_work_is_proportional_to_new_frames(codec):
    """The state holds a fixed amount of context, whatever the stream's length."""
    state = codec.new_stream()
    codec.decode_step([state], [codes_for(codec, 30, 0)])
    size = sum(t.numel() for t in state.context.values())
    codec.decode_step([state], [codes_for(codec, 90, 1)])
    assert sum(t.numel() for t in state.context.values()) == size


# --- precision ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_close_to_fp32(tiny_dir, codec, dtype):
    low = Codec.from_checkpoint(tiny_dir, dtype=dtype)
    assert low.decoder.model[0].conv.weight.dtype == dtype
    assert low.decoder.model[1].block[0].alpha.dtype == torch.float32  # Snake stays fp32
    codes = codes_for(codec, 30, 0)[None]
    audio = low.decode(codes)
    assert audio.dtype == torch.float32 and torch.isfinite(audio).all()
    assert diff(audio, codec.decode(codes)) < 0.1
    state = low.new_stream()
    streamed = torch.cat([low.decode_step([state], [codes[0, :, t : t + 10]])[0] for t in (0, 10, 20)])
    assert torch.isfinite(streamed).all()
    assert low.encode(torch.randn(1, 10 * FRAME) * 0.3).shape == (1, 4, 10)


# --- audio input ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_load_audio_formats_rates_and_channels(tmp_path, fmt):
    t = np.arange(22050) / 22050
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 440 * t)], 1)
    path = tmp_path / f"a.{fmt.lower()}"
    soundfile.write(path, stereo, 22050, format=fmt)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size - 44100) <= 2400  # MP3 adds encoder delay/padding
    assert 0.2 < np.abs(audio).max() < 0.4
    assert np.array_equal(load_audio(path.read_bytes()), audio)


def test_load_audio_arrays():
    mono = np.zeros(100, dtype=np.float32)
    assert load_audio(mono).shape == (100,)
    assert load_audio(np.ones((100, 2), dtype=np.int16) * 16384)[0] == pytest.approx(0.5)
    assert load_audio(np.zeros(22050, dtype=np.float32), sample_rate=22050).shape == (44100,)
    with pytest.raises(ValueError):
        load_audio(np.zeros((2, 3, 4)))


def test_load_audio_refuses_non_finite_samples(tmp_path):
    samples = np.zeros(100, dtype=np.float32)
    samples[[3, 50]] = [np.nan, np.inf]
    with pytest.raises(AudioError, match="samples must be finite numbers, got 2 NaN or infinite of 100"):
        load_audio(samples)
    soundfile.write(tmp_path / "nan.wav", samples, 44100, subtype="FLOAT")  # a float WAV can carry them too
    with pytest.raises(AudioError, match="got 2 NaN or infinite"):
        load_audio(tmp_path / "nan.wav")


def test_unreadable_bytes_are_named_without_a_memory_address():
    with pytest.raises(AudioError) as info:
        load_audio(b"not audio")
    assert str(info.value) == "cannot read audio bytes: Format not recognised."
    with pytest.raises(AudioError) as info:
        audio_seconds(b"not audio")
    assert str(info.value) == "cannot read audio bytes: Format not recognised."


def test_audio_seconds_reads_the_header_or_the_array_length(tmp_path):
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(16000, np.float32), 8000, format="FLAC")
    flac = buffer.getvalue()
    assert audio_seconds(flac) == 2.0
    soundfile.write(tmp_path / "a.wav", np.zeros(441, np.float32), 44100)
    assert audio_seconds(tmp_path / "a.wav") == 0.01
    assert audio_seconds(np.zeros((22050, 2), np.int16)) == 0.5
    assert audio_seconds(np.zeros(22050, np.float32), sample_rate=22050) == 1.0
    # a FLAC whose header leaves the total at 0 (a streaming encoder) does not state its length
    unknown = bytearray(flac)
    unknown[21] &= 0xF0  # STREAMINFO's 36-bit total sample count: the low 4 bits of byte 21 and bytes 22-25
    unknown[22:26] = bytes(4)
    assert audio_seconds(bytes(unknown)) == math.inf


def test_encode_reference_audio(codec, tmp_path):
    soundfile.write(tmp_path / "r.wav", np.random.default_rng(0).uniform(-0.5, 0.5, 700), 44100)
    codes = encode_reference_audio(codec, tmp_path / "r.wav")
    assert codes.shape == (4, 11) and codes.dtype == np.int64
    with pytest.raises(ValueError, match="cannot read"):
        encode_reference_audio(codec, b"not audio")


# --- command line -------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "s1_mini.codec", *args], capture_output=True, text=True)


def test_cli_round_trip(tiny_dir, tmp_path, codec):
    soundfile.write(tmp_path / "in.flac", np.random.default_rng(0).uniform(-0.5, 0.5, (3000, 2)), 48000)
    r = run_cli("encode", str(tmp_path / "in.flac"), "--checkpoint", str(tiny_dir), "--out", str(tmp_path / "c.npy"))
    assert r.returncode == 0, r.stderr
    codes = np.load(tmp_path / "c.npy")
    assert codes.shape == (4, -(-2757 // FRAME)) and codes.dtype == np.int64
    r = run_cli("decode", str(tmp_path / "c.npy"), "--checkpoint", str(tiny_dir), "--out", str(tmp_path / "o.wav"))
    assert r.returncode == 0, r.stderr
    audio, rate = soundfile.read(tmp_path / "o.wav", dtype="float32")
    assert rate == 44100
    assert np.abs(audio - codec.decode(torch.from_numpy(codes)[None])[0].numpy()).max() <= 1e-6


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: ["decode", str(d / "missing.npy")], "input file not found"),
        (lambda d: ["decode", str(d / "bad_shape.npy")], "expected codes \\[4, T\\]"),
        (lambda d: ["decode", str(d / "floats.npy")], "must be integers"),
        (lambda d: ["encode", str(d / "bad_shape.npy")], "cannot read"),
    ],
)
def test_cli_errors_without_traceback(tiny_dir, tmp_path, make, message):
    np.save(tmp_path / "bad_shape.npy", np.zeros((3, 5), dtype=np.int64))
    np.save(tmp_path / "floats.npy", np.zeros((4, 5), dtype=np.float32))
    r = run_cli(*make(tmp_path), "--checkpoint", str(tiny_dir), "--out", str(tmp_path / "out"))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error:") and re.search(message, r.stderr), r.stderr


def test_cli_missing_checkpoint(tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((10, 5), dtype=np.int64))
    r = run_cli("decode", str(tmp_path / "c.npy"), "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "not found" in r.stderr
