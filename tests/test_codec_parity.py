"""Parity of the codec with PyPI fish-speech 0.1.0, run live in its isolated environment.

The reference (tests/parity/ref_codec.py) runs as a subprocess on checkpoints written
here: the tiny configuration of spec §11.2 with the weights of §11.3, the same file in
the wrapped ``{"state_dict": {"generator.…"}}`` layout with buffers, and the full-size
S1 configuration with random weights. Tolerances are spec §11.4's.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from s1_mini.codec import Codec, CodecConfig, CodecStreams
from s1_mini.codec.context import LeftContext
from s1_mini.codec.loading import buffer_keys, expected_shapes
from s1_mini.codec.transformer import WindowedTransformer, rope_table
from s1_mini.testing.codec_checkpoint import TINY_CONFIG, write_codec_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REF_PYTHON = ROOT / ".refenv" / "bin" / "python"
REF_SCRIPT = ROOT / "tests" / "parity" / "ref_codec.py"

pytestmark = [
    pytest.mark.parity,
    pytest.mark.skipif(
        not REF_PYTHON.exists(), reason="reference env .refenv missing: run bash tests/parity/build_reference_env.sh"
    ),
]

AUDIO_TOL = 1e-5
# Stage tensors, relative to their peak: spec §11.4 allows 5e-5 at a scale of 2.5. Our
# test weights keep the signal's variance through the encoder (see codec_checkpoint),
# so its activations, and their float noise, are larger than the spec's (~1e-5 of peak).
STAGE_REL_TOL = 3e-5


def spec_test_audio(length: int) -> np.ndarray:
    """Spec §11.2: 0.5·sin(2π·220·t) + 0.1·N(0,1), clipped to [−1, 1]."""
    t = np.arange(length) / 44100
    rng = np.random.default_rng(0)
    return np.clip(0.5 * np.sin(2 * np.pi * 220 * t) + 0.1 * rng.standard_normal(length), -1, 1).astype(np.float32)


def random_codes(config: CodecConfig, frames: int, seed: int, batch: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    semantic = rng.integers(0, config.semantic_codebook_size, (batch, 1, frames))
    residual = rng.integers(0, config.codebook_size, (batch, config.num_codebooks - 1, frames))
    return np.concatenate([semantic, residual], 1).astype(np.int64)


def run_reference(tmp: Path, config: dict, checkpoint: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    (tmp / "ref_config.json").write_text(json.dumps(config))
    np.savez(tmp / "ref_in.npz", **inputs)
    subprocess.run(
        [str(REF_PYTHON), str(REF_SCRIPT), str(tmp / "ref_config.json"), str(checkpoint), str(tmp / "ref_in.npz"),
         str(tmp / "ref_out.npz")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    with np.load(tmp / "ref_out.npz") as out:
        return dict(out)


def max_diff(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b).max())


def stage_diffs(codec: Codec, audio: np.ndarray, codes: np.ndarray, ref: dict[str, np.ndarray]) -> dict[str, float]:
    """Max abs difference of each stage's output over its peak, each stage fed the reference's input to it.

    Feeding the reference's own input isolates a stage: the random test weights amplify
    float noise from earlier stages ~50× by the end of the encoder path.
    """
    frame = codec.config.frame_length
    frames = -(-audio.shape[-1] // frame)
    x = torch.nn.functional.pad(torch.from_numpy(audio), (0, frames * frame - audio.shape[-1]))[..., None]
    c = torch.from_numpy(codes)
    q = codec.quantizer
    # Our stages are time-major ([B, L, C]); the reference's tensors are channels-first.
    with torch.inference_mode():
        ctx = LeftContext(x.shape[0], frames, "cpu")
        encoder = codec.encoder(x, ctx)
        z = torch.from_numpy(ref["audio.encoder"]).mT
        for stage in q.downsample:
            z = stage(z, ctx)
        pre = q.pre_module(z, ctx)
        ctx = LeftContext(c.shape[0], c.shape[2], "cpu")
        post = q.post_module(q.latent(c).mT, ctx)
        z = torch.from_numpy(ref["codes.post_module"]).mT
        for stage in q.upsample:
            z = stage(z, ctx)
    ours = {"audio.encoder": encoder, "audio.pre_module": pre, "codes.post_module": post, "codes.upsample": z}
    return {key: max_diff(value.mT, ref[key]) / np.abs(ref[key]).max() for key, value in ours.items()}


def stream(codec: Codec, codes: np.ndarray, chunks: list[int]) -> np.ndarray:
    streams = CodecStreams(codec, slots=1, chunk_frames=max(chunks))
    slot, pieces, t = streams.open(), [], 0
    for n in chunks:
        streams.launch([(slot, torch.from_numpy(codes[:, t : t + n]))])
        (piece,) = streams.collect()
        assert piece.shape == (n * codec.config.frame_length,)
        pieces.append(piece)
        t += n
    assert t == codes.shape[1]
    return np.concatenate(pieces)


# ---------------------------------------------------------------------------------------
# Tiny configuration (spec §11.2), 150 frames


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("codec_tiny")
    write_codec_checkpoint(tmp, "tiny", seed=0)
    codec = Codec.from_checkpoint(tmp)
    audio = spec_test_audio(64 * 150 - 37)[None]
    codes = random_codes(codec.config, 150, seed=1)
    oob = codes.copy()
    oob[0, 0, 10:15] = 10**6
    oob[0, 1:, 40:44] = 5000
    ref = run_reference(tmp, TINY_CONFIG, tmp / "codec.pth", {"audio": audio, "codes": codes, "codes_oob": oob})
    return dict(dir=tmp, codec=codec, audio=audio, codes=codes, oob=oob, ref=ref)


def test_reference_loads_our_checkpoint(tiny):
    # Only the six recomputed buffers are absent from the file written by the checkpoint writer.
    assert sorted(tiny["ref"]["missing_keys"]) == sorted(buffer_keys(tiny["codec"]))
    assert len(tiny["ref"]["unexpected_keys"]) == 0


def test_encode_codes_identical(tiny):
    ours = tiny["codec"].encode(torch.from_numpy(tiny["audio"])).numpy()
    ref = tiny["ref"]["audio.codes"]
    assert ours.shape == ref.shape == (1, 4, 150)
    assert ours.dtype == np.int64
    mismatches = np.argwhere(ours != ref)
    assert len(mismatches) == 0, f"code mismatches at [batch, row, frame]: {mismatches[:20].tolist()}"
    assert len(np.unique(ref[0, 0])) > 10  # the test input really exercises the codebooks


def test_stage_tensors(tiny):
    diffs = stage_diffs(tiny["codec"], tiny["audio"], tiny["codes"], tiny["ref"])
    assert all(d <= STAGE_REL_TOL for d in diffs.values()), diffs


def test_decode_audio(tiny):
    ours = tiny["codec"].decode(torch.from_numpy(tiny["codes"])).numpy()
    ref = tiny["ref"]["codes.audio"]
    assert ours.dtype == np.float32 and ours.shape == (1, 150 * 64)
    assert 0.1 < np.abs(ref).max() < 0.99  # not silent, not saturated: the comparison means something
    assert max_diff(ours, ref) <= AUDIO_TOL


def test_decode_clamps_out_of_range_codes(tiny):
    ours = tiny["codec"].decode(torch.from_numpy(tiny["oob"])).numpy()
    assert max_diff(ours, tiny["ref"]["codes_oob.audio"]) <= AUDIO_TOL
    # Clamping from above: 10**6 and 5000 decode like the last code of each codebook.
    clamped = tiny["oob"].copy()
    clamped[0, 0] = np.minimum(clamped[0, 0], 63)
    clamped[0, 1:] = np.minimum(clamped[0, 1:], 31)
    assert max_diff(ours, tiny["codec"].decode(torch.from_numpy(clamped)).numpy()) == 0


def test_streaming_matches_reference(tiny):
    # Uneven chunks, down to 1 frame, through the 8-frame attention window and past it.
    streamed = stream(tiny["codec"], tiny["codes"][0], [1, 3, 7, 2, 20, 1, 50, 66])
    assert max_diff(streamed, tiny["ref"]["codes.audio"][0]) <= AUDIO_TOL


def test_decode_of_reference_codes(tiny):
    # Our decoder on the reference's own codes of the test input, against our encode's codes.
    codes = torch.from_numpy(tiny["ref"]["audio.codes"])
    ours = tiny["codec"].decode(codes).numpy()
    assert ours.shape == (1, 9600)
    assert max_diff(ours, tiny["codec"].decode(tiny["codec"].encode(torch.from_numpy(tiny["audio"])))) == 0


def test_wrapped_generator_checkpoint_with_buffers(tiny, tmp_path):
    """Spec §11.3 (b): {"state_dict": {"generator." + k: …, "discriminator.dummy": …}} with buffers."""
    state = torch.load(tiny["dir"] / "codec.pth", weights_only=True)
    codec = tiny["codec"]
    for name, module in codec.named_modules():
        if isinstance(module, WindowedTransformer):
            args = module.args
            state[f"{name}.freqs_cis"] = rope_table(args.block_size, args.head_dim, args.rope_base).bfloat16()
            state[f"{name}.causal_mask"] = torch.ones(args.block_size, args.block_size, dtype=torch.bool).tril()
    assert sorted(k for k in state if k.endswith(("freqs_cis", "causal_mask"))) == sorted(buffer_keys(codec))
    wrapped = {"state_dict": {"generator." + k: v for k, v in state.items()} | {"discriminator.dummy": torch.zeros(3)}}
    torch.save(wrapped, tmp_path / "codec.pth")
    (tmp_path / "codec_config.json").write_text(json.dumps(TINY_CONFIG))
    codes = tiny["codes"][:, :, :24]
    ref = run_reference(tmp_path, TINY_CONFIG, tmp_path / "codec.pth", {"codes": codes})
    assert len(ref["missing_keys"]) == 0 and len(ref["unexpected_keys"]) == 0  # "All keys matched"
    ours = Codec.from_checkpoint(tmp_path).decode(torch.from_numpy(codes)).numpy()
    assert max_diff(ours, ref["codes.audio"]) <= AUDIO_TOL
    # The file's bf16 RoPE table is the one we compute.
    assert torch.equal(state["quantizer.post_module.freqs_cis"].float(), rope_table(512, 16, 10000))


# ---------------------------------------------------------------------------------------
# Full-size S1 configuration, random weights: shapes, key names, k16/k8/k4 transposed
# convs, the 4096-entry semantic codebook. Kept short (2 CPU cores).


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("codec_full")
    write_codec_checkpoint(tmp, "s1-mini", seed=0)
    codec = Codec.from_checkpoint(tmp)
    audio = spec_test_audio(2048 * 8 - 300)[None]
    codes = random_codes(codec.config, 12, seed=2)
    ref = run_reference(tmp, CodecConfig.official().to_dict(), tmp / "codec.pth", {"audio": audio, "codes": codes})
    return dict(dir=tmp, codec=codec, audio=audio, codes=codes, ref=ref)


@pytest.mark.slow
def test_full_size_loads_in_reference(full):
    assert sorted(full["ref"]["missing_keys"]) == sorted(buffer_keys(full["codec"]))
    assert len(full["ref"]["unexpected_keys"]) == 0
    # Spec §1.6: parameter count of the official layout (weight norm as g and v).
    assert sum(math.prod(s) for s in expected_shapes(full["codec"]).values()) == 391_430_530


@pytest.mark.slow
def test_full_size_encode_decode(full):
    codec, ref = full["codec"], full["ref"]
    codes = codec.encode(torch.from_numpy(full["audio"])).numpy()
    assert codes.shape == (1, 10, 8)
    assert np.array_equal(codes, ref["audio.codes"])
    audio = codec.decode(torch.from_numpy(full["codes"])).numpy()
    assert audio.shape == (1, 12 * 2048)
    assert max_diff(audio, ref["codes.audio"]) <= AUDIO_TOL
    diffs = stage_diffs(codec, full["audio"], full["codes"], ref)
    assert all(d <= STAGE_REL_TOL for d in diffs.values()), diffs
    streamed = stream(codec, full["codes"][0], [1, 4, 2, 5])
    assert max_diff(streamed, ref["codes.audio"][0]) <= AUDIO_TOL
