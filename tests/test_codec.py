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
from torch.utils._python_dispatch import TorchDispatchMode

from s1_mini.checkpoint import CheckpointError
from s1_mini.codec import Codec, CodecConfig, CodecConfigError, CodecStreams, encode_reference_audio, load_audio
from s1_mini.codec import layers
from s1_mini.codec.audio import AudioError, audio_seconds
from s1_mini.codec.context import LeftContext
from s1_mini.codec.layers import CausalConv1d, CausalConvTranspose1d, ResidualUnit, snake
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


def stream_all(streams: CodecStreams, codes: list[torch.Tensor], schedules: list[list[int]],
               slots: list[int] | None = None) -> list[torch.Tensor]:
    """Decode each stream of ``codes`` in the chunk sizes of its schedule (0: not in that
    step), in ``slots`` (default: newly opened, closed at the end)."""
    own = slots is None
    slots = [streams.open() for _ in codes] if own else slots
    done = [0] * len(codes)
    pieces: list[list[torch.Tensor]] = [[] for _ in codes]
    for step in range(len(schedules[0])):
        chunks = [(i, schedules[i][step]) for i in range(len(codes)) if schedules[i][step]]
        streams.launch([(slots[i], codes[i][:, done[i] : done[i] + n]) for i, n in chunks])
        for (i, n), audio in zip(chunks, streams.collect()):
            assert audio.shape == (n * FRAME,) and audio.dtype == np.float32
            pieces[i].append(torch.from_numpy(audio))
            done[i] += n
    if own:
        for slot in slots:
            streams.close(slot)
    return [torch.cat(p) for p in pieces]


def test_streaming_batched_uneven_chunks_match_offline(codec):
    """Three streams at different positions, different chunk sizes per step (0 … 13
    frames), in slots 0, 1 and 3; slot 2 holds a stream that decodes nothing meanwhile."""
    streams = CodecStreams(codec, slots=4, chunk_frames=13)
    schedules = [[1, 2, 13, 1, 7, 13, 13, 10], [3, 1, 0, 5, 0, 13, 13, 2], [1, 1, 1, 0, 1, 13, 13, 13]]
    codes = [codes_for(codec, sum(s), seed=10 + i) for i, s in enumerate(schedules)]
    slots = [streams.open() for _ in range(4)]
    idle = codes_for(codec, 9, seed=3)
    (idle_start,) = stream_all(streams, [idle[:, :5]], [[5]], [slots[2]])
    out = stream_all(streams, codes, schedules, [slots[0], slots[1], slots[3]])
    for c, audio in zip(codes, out):
        assert diff(audio, codec.decode(c[None])[0]) <= 1e-5
    (idle_rest,) = stream_all(streams, [idle[:, 5:]], [[4]], [slots[2]])  # its context survived
    assert diff(torch.cat([idle_start, idle_rest]), codec.decode(idle[None])[0]) <= 1e-5


def test_streaming_rows_above_the_due_slots_keep_their_context(codec):
    """A step runs a bucket of rows (here 4 for slots up to 2): the stream in slot 3,
    not due in step 3, must not decode its previous chunk again there."""
    streams = CodecStreams(codec, slots=4, chunk_frames=4)
    slots = [streams.open() for _ in range(4)]
    schedules = [[0, 0, 4, 4], [0, 0, 4, 0], [4, 4, 0, 4]]  # slots 0, 2, 3
    codes = [codes_for(codec, sum(s), seed=20 + i) for i, s in enumerate(schedules)]
    out = stream_all(streams, codes, schedules, [slots[0], slots[2], slots[3]])
    for c, audio in zip(codes, out):
        assert diff(audio, codec.decode(c[None])[0]) <= 1e-5


def test_streaming_slot_reused_by_a_new_stream_starts_fresh(codec):
    """A closed slot's context must not leak into the next stream that opens it."""
    streams = CodecStreams(codec, slots=1, chunk_frames=8)
    first, second = codes_for(codec, 24, 1), codes_for(codec, 20, 2)
    stream_all(streams, [first], [[8, 8, 8]])
    (again,) = stream_all(streams, [second], [[1, 8, 8, 3]])
    assert diff(again, codec.decode(second[None])[0]) <= 1e-5


def test_streaming_past_block_size(codec):
    """Past the reference's RoPE table (512 positions for the tiny quantizer transformers).

    The reference cannot go there (no parity claim); the stream must keep working and
    agree with our own offline decode, which extends the table the same way.
    """
    codes = codes_for(codec, 530, seed=5)
    (streamed,) = stream_all(CodecStreams(codec, slots=1, chunk_frames=500), [codes], [[500, 11, 1, 18]])
    assert diff(streamed, codec.decode(codes[None])[0]) <= 1e-5
    # The extended table agrees with the block-size table where both exist.
    assert torch.equal(rope_table(1100, 16, 10000)[:512], rope_table(512, 16, 10000))


def test_streaming_state_is_fixed_per_slot(codec):
    """The context held per slot is a fixed size, whatever the stream's length."""
    streams = CodecStreams(codec, slots=2, chunk_frames=30)
    stream_all(streams, [codes_for(codec, 30, 0)], [[30]])
    size = sum(t.numel() for t in streams.context.values())
    stream_all(streams, [codes_for(codec, 90, 1)], [[30, 30, 30]])
    assert sum(t.numel() for t in streams.context.values()) == size


def test_streaming_refuses_bad_chunks(codec):
    streams = CodecStreams(codec, slots=1, chunk_frames=4)
    slot = streams.open()
    with pytest.raises(ValueError, match="1..4"):
        streams.launch([(slot, codes_for(codec, 5, 0))])
    with pytest.raises(RuntimeError, match="no step"):
        streams.collect()
    with pytest.raises(RuntimeError, match="slots are in use"):
        streams.open()


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
    (streamed,) = stream_all(CodecStreams(low, slots=1, chunk_frames=10), [codes[0]], [[10, 10, 10]])
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


# --- layout: time-major activations, channels-last convs --------------------------------


def conv_input(x: torch.Tensor, context: int, alpha: torch.Tensor | None) -> torch.Tensor:
    """The channels-first input of the reference's conv: Snake (if any), zero left padding."""
    return torch.nn.functional.pad(x if alpha is None else snake(x, alpha), (0, 0, context, 0)).mT


@pytest.mark.parametrize("phased", [False, True])
@pytest.mark.parametrize("k,stride,dilation,groups", [(7, 1, 1, 1), (7, 1, 3, 1), (7, 1, 9, 1), (3, 1, 2, 1),
                                                      (1, 1, 1, 1), (4, 2, 1, 1), (7, 1, 1, 6)])
def test_causal_conv_equals_padded_conv1d(monkeypatch, phased, k, stride, dilation, groups):
    """A time-major conv run as a channels-last conv2d (phased: a dilated one undilated over
    its phases, the input right-padded to whole phases) equals F.conv1d on the zero-padded
    channels-first input, with contiguous or channels-last weights, Snake fused or not."""
    monkeypatch.setattr(layers, "PHASED_DILATION", {"cpu"} if phased else set())
    g = torch.Generator().manual_seed(k * 100 + dilation)
    conv = CausalConv1d(6, 12, k, stride, dilation, groups)
    w, b = conv.conv.weight.detach().clone(), conv.conv.bias.detach()
    for length in (37 * stride, 45 * stride):
        x = torch.randn(2, length, 6, generator=g)
        alpha = torch.rand(6, generator=g) + 0.5
        for a in (None, alpha):
            expected = torch.nn.functional.conv1d(conv_input(x, conv.context, a), w, b, stride, 0, dilation, groups).mT
            for weight in (w, layers.channels_last(w)):
                conv.conv.weight.data = weight
                with torch.inference_mode():
                    y = conv(x, LeftContext(2, 1, "cpu"), a)
                # Time-major (a phased conv's output is cropped: a view with a longer batch stride).
                assert y.shape == expected.shape and y.stride()[1:] == (12, 1)
                assert torch.allclose(y, expected, atol=1e-5), (length, a is None)


@pytest.mark.parametrize("phased", [False, True])
def test_residual_unit_with_deferred_biases_equals_spec(monkeypatch, phased):
    """Spec §3.4 with the convs' biases added in the passes after them."""
    monkeypatch.setattr(layers, "PHASED_DILATION", {"cpu"} if phased else set())
    g = torch.Generator().manual_seed(7)
    unit = ResidualUnit(6, 3)
    for snake_module in unit.block[::2]:
        snake_module.alpha.data = torch.rand(1, 6, 1, generator=g) + 0.5
    a1, c1, a2, c2 = unit.block[0].alpha.view(-1), unit.block[1].conv, unit.block[2].alpha.view(-1), unit.block[3].conv
    x = torch.randn(2, 40, 6, generator=g)
    y = torch.nn.functional.conv1d(conv_input(x, 18, a1), c1.weight, c1.bias, dilation=3)
    expected = x + torch.nn.functional.conv1d(snake(y.mT, a2).mT, c2.weight, c2.bias).mT
    with torch.inference_mode():
        assert torch.allclose(unit(x, LeftContext(2, 1, "cpu")), expected, atol=1e-5)


@pytest.mark.parametrize("k,stride", [(4, 2), (16, 8), (2, 2), (3, 2), (5, 2)])
def test_causal_conv_transpose_equals_cropped_transposed_conv(k, stride):
    """The transposed conv's padding drops exactly the outputs the crop of spec §3.2 drops
    (and its output padding restores the last ones when k is not a multiple of s)."""
    g = torch.Generator().manual_seed(k * 10 + stride)
    conv = CausalConvTranspose1d(6, 5, k, stride, weight_norm=False)
    w, b = conv.conv.weight.detach().clone(), conv.conv.bias.detach()
    x, alpha = torch.randn(2, 11, 6, generator=g), torch.rand(6, generator=g) + 0.5
    skip = conv.context * stride
    for a in (None, alpha):
        full = torch.nn.functional.conv_transpose1d(conv_input(x, conv.context, a), w, b, stride)
        expected = full[..., skip : skip + 11 * stride].mT
        for weight in (w, layers.channels_last(w)):
            conv.conv.weight.data = weight
            with torch.inference_mode():
                y = conv(x, LeftContext(2, 1, "cpu"), a)
            assert y.shape == expected.shape and y.is_contiguous()
            assert torch.allclose(y, expected, atol=1e-5)


class ConvLayouts(TorchDispatchMode):
    """Records the memory layout of every conv's input, weight and output."""

    def __init__(self) -> None:
        super().__init__()
        self.convs: list[tuple[bool, bool, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.conv2d, torch.ops.aten.conv_transpose2d):
            self.convs.append(tuple(t.is_contiguous(memory_format=torch.channels_last) for t in (*args[:2], out)))
        return out


def test_every_conv_reads_and_writes_channels_last(codec, monkeypatch):
    """No conv of a decode, a phased decode, a stream or an encode needs a layout copy:
    inputs, weights (laid out at load) and outputs are all channels-last."""
    monkeypatch.setattr(layers, "PHASED_DILATION", {"cpu"})
    codes = codes_for(codec, 7, 0)
    with ConvLayouts() as record:
        codec.decode(codes[None])
        stream_all(CodecStreams(codec, slots=1, chunk_frames=4), [codes], [[1, 4, 2]])
        codec.encode(torch.randn(2, 5 * FRAME))
    assert len(record.convs) > 50 and all(all(c) for c in record.convs), record.convs


def test_state_dict_keeps_the_reference_shapes(codec):
    """Weights laid out channels-last for the convs keep their shapes (and so the file layout)."""
    with torch.device("meta"):
        fresh = Codec(codec.config)
    assert {k: v.shape for k, v in codec.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    weight = codec.decoder.model[1].block[2].block[1].conv.weight
    assert not weight.is_contiguous() and weight.transpose(1, 2).is_contiguous()


def test_phased_dilation_decodes_and_streams_like_dilated_convs(codec, monkeypatch):
    """The CUDA path of the dilated convs (phases), on the CPU: the same audio offline and
    streamed, with lengths that are not whole phases (1 frame = 8 samples at the tiny
    decoder's first residual units; dilations 3 and 9)."""
    codes = codes_for(codec, 23, 4)
    dilated = codec.decode(codes[None])[0]
    monkeypatch.setattr(layers, "PHASED_DILATION", {"cpu"})
    assert diff(codec.decode(codes[None])[0], dilated) <= 1e-5
    (streamed,) = stream_all(CodecStreams(codec, slots=1, chunk_frames=5), [codes], [[1, 5, 5, 5, 5, 2]])
    assert diff(streamed, dilated) <= 1e-5


@pytest.mark.parametrize("phased", [False, True])
def test_compiled_pointwise_passes_trace_whole(tiny_dir, monkeypatch, phased):
    """Every input pass the codec runs traces as one graph (fullgraph, dynamic shapes;
    dynamo's eager backend: inductor's CPU compile is too slow for a unit test) and gives
    the eager audio, offline and streamed."""
    monkeypatch.setattr(layers, "PHASED_DILATION", {"cpu"} if phased else set())
    codec = Codec.from_checkpoint(tiny_dir)
    codes = codes_for(codec, 11, 6)
    expected = codec.decode(codes[None])[0]
    codec.compile_pointwise(lambda fn: torch.compile(fn, backend="eager", fullgraph=True, dynamic=True))
    assert diff(codec.decode(codes[None])[0], expected) <= 1e-6
    (streamed,) = stream_all(CodecStreams(codec, slots=2, chunk_frames=4), [codes], [[1, 4, 4, 2]])
    assert diff(streamed, expected) <= 1e-5
    assert codec.encode(torch.randn(1, 3 * FRAME)).shape == (1, 4, 3)
