"""Bad input to the Python API: ``ProductionTTSEngine.generate`` / ``generate_stream`` /
``agenerate`` / ``agenerate_stream``, ``register_voice`` and ``EngineConfig``.

Each table row is one bad input: its id, the input, the expected error (an engine error
code, or an exception type) and the field the message must start with (``"<field>: <rule>"``).
One engine on the tiny checkpoint serves every row; after each group a good request still
works, so a bad request never leaves the engine broken. Hypothesis then throws arbitrary
values at the request fields and at EngineConfig: only the documented errors come out.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s1_mini import EngineConfig, ProductionTTSEngine
from s1_mini.config import EngineConfigError
from s1_mini.scheduler import ErrorCode, TTSError
from s1_mini.voices import InvalidReferenceAudio, InvalidVoiceId, VoiceError
from server_utils import sine_wav, tiny_checkpoint

INVALID, NOT_FOUND = ErrorCode.INVALID, ErrorCode.NOT_FOUND
MAX_TEXT = 200
WAV = sine_wav(0.05)  # short: the tiny model's context holds 256 positions (~0.37 s of audio)
NOT_AUDIO = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
HOUR_AT_1_HZ = sine_wav(3600, rate=1)  # 7 KB whose header says one hour: past max_reference_seconds (30 s)


def case(id: str, expect: Any, field: str, **inputs: Any) -> Any:
    return pytest.param(inputs, expect, field, id=id)


def assert_names(message: str, field: str) -> None:
    """``message`` is ``"<field>: <rule>"``, with a rule, and no traceback in it."""
    assert message.startswith(f"{field}: ") and message[len(field) + 2:].strip(), message
    assert "Traceback" not in message


@pytest.fixture(scope="module")
def engine():
    config = EngineConfig(checkpoint_path=str(tiny_checkpoint()), device="cpu", precision="float32",
                          compile_model=False, warmup=False, max_new_tokens=8, max_text_length=MAX_TEXT)
    with ProductionTTSEngine(config) as started:
        yield started


def assert_serves(engine: ProductionTTSEngine) -> None:
    response = engine.generate("Still serving.", seed=1)
    assert response.success, response.error
    assert len(list(engine.generate_stream("Still streaming.", seed=2))) > 0
    health = engine.health_check()
    assert health["healthy"] and health["queue_depth"] == 0, health


# ---------------------------------------------------------------- generate and friends

GENERATE = [
    # text
    case("text-none", INVALID, "text", text=None),
    case("text-int", INVALID, "text", text=1),
    case("text-float", INVALID, "text", text=1.5),
    case("text-bool", INVALID, "text", text=True),
    case("text-bytes", INVALID, "text", text=b"hello"),
    case("text-list", INVALID, "text", text=["hello"]),
    case("text-dict", INVALID, "text", text={"text": "hello"}),
    case("text-empty", INVALID, "text", text=""),
    case("text-spaces", INVALID, "text", text="   "),
    case("text-whitespace", INVALID, "text", text="\n\t\r "),
    case("text-too-long", INVALID, "text", text="x" * (MAX_TEXT + 1)),
    case("text-huge", INVALID, "text", text="y" * 1_000_000),
    # sampling
    case("temperature-negative", INVALID, "temperature", temperature=-0.5),
    case("temperature-zero", INVALID, "temperature", temperature=0),
    case("temperature-two", INVALID, "temperature", temperature=2),
    case("temperature-nan", INVALID, "temperature", temperature=math.nan),
    case("temperature-inf", INVALID, "temperature", temperature=math.inf),
    case("temperature-minus-inf", INVALID, "temperature", temperature=-math.inf),
    case("temperature-string", INVALID, "temperature", temperature="0.5"),
    case("temperature-bool", INVALID, "temperature", temperature=True),
    case("temperature-list", INVALID, "temperature", temperature=[0.5]),
    case("top-p-zero", INVALID, "top_p", top_p=0),
    case("top-p-negative", INVALID, "top_p", top_p=-0.1),
    case("top-p-above-one", INVALID, "top_p", top_p=1.5),
    case("top-p-nan", INVALID, "top_p", top_p=math.nan),
    case("top-p-inf", INVALID, "top_p", top_p=math.inf),
    case("top-p-string", INVALID, "top_p", top_p="x"),
    case("top-p-bool", INVALID, "top_p", top_p=False),
    case("penalty-zero", INVALID, "repetition_penalty", repetition_penalty=0),
    case("penalty-two", INVALID, "repetition_penalty", repetition_penalty=2),
    case("penalty-negative", INVALID, "repetition_penalty", repetition_penalty=-1),
    case("penalty-nan", INVALID, "repetition_penalty", repetition_penalty=math.nan),
    case("penalty-string", INVALID, "repetition_penalty", repetition_penalty="1.1"),
    case("max-new-tokens-one", INVALID, "max_new_tokens", max_new_tokens=1),
    case("max-new-tokens-negative", INVALID, "max_new_tokens", max_new_tokens=-1),
    case("max-new-tokens-float", INVALID, "max_new_tokens", max_new_tokens=1.5),
    case("max-new-tokens-nan", INVALID, "max_new_tokens", max_new_tokens=math.nan),
    case("max-new-tokens-string", INVALID, "max_new_tokens", max_new_tokens="10"),
    case("max-new-tokens-bool", INVALID, "max_new_tokens", max_new_tokens=True),
    # seed: torch's generators take [-2**63, 2**64 - 1] and overflow beyond
    case("seed-string", INVALID, "seed", seed="1"),
    case("seed-float", INVALID, "seed", seed=1.5),
    case("seed-bool", INVALID, "seed", seed=True),
    case("seed-list", INVALID, "seed", seed=[1]),
    case("seed-too-big", INVALID, "seed", seed=2**64),
    case("seed-too-small", INVALID, "seed", seed=-(2**63) - 1),
    case("seed-huge", INVALID, "seed", seed=2**70),
    # timeout: NaN passes "<= 0", inf overflowed the wait (both used to end as a timeout error)
    case("timeout-zero", INVALID, "timeout", timeout=0),
    case("timeout-negative", INVALID, "timeout", timeout=-1),
    case("timeout-nan", INVALID, "timeout", timeout=math.nan),
    case("timeout-inf", INVALID, "timeout", timeout=math.inf),
    case("timeout-huge", INVALID, "timeout", timeout=1e300),
    case("timeout-string", INVALID, "timeout", timeout="5"),
    case("timeout-bool", INVALID, "timeout", timeout=True),
    # a registered voice (the registry names it voice_id)
    case("reference-id-int", INVALID, "voice_id", reference_id=5),
    case("reference-id-empty", INVALID, "voice_id", reference_id=""),
    case("reference-id-slash", INVALID, "voice_id", reference_id="a/b"),
    case("reference-id-dotdot", INVALID, "voice_id", reference_id=".."),
    case("reference-id-traversal", INVALID, "voice_id", reference_id="../../etc/passwd"),
    case("reference-id-too-long", INVALID, "voice_id", reference_id="a" * 65),
    case("reference-id-nul", INVALID, "voice_id", reference_id="nul\x00"),
    case("reference-id-space", INVALID, "voice_id", reference_id="with space"),
    case("reference-id-unicode", INVALID, "voice_id", reference_id="é"),
    case("reference-id-unknown", NOT_FOUND, "voice_id", reference_id="nobody"),
    # one inline reference
    case("reference-audio-empty", INVALID, "reference_audio", reference_audio=b"", reference_text="t"),
    case("reference-audio-junk", INVALID, "reference_audio", reference_audio=b"junk", reference_text="t"),
    case("reference-audio-png", INVALID, "reference_audio", reference_audio=NOT_AUDIO, reference_text="t"),
    case("reference-audio-wav-header-only", INVALID, "reference_audio", reference_audio=WAV[:44],
         reference_text="t"),
    case("reference-audio-string", INVALID, "reference_audio", reference_audio="voice.wav", reference_text="t"),
    case("reference-audio-int", INVALID, "reference_audio", reference_audio=5, reference_text="t"),
    case("reference-audio-list", INVALID, "reference_audio", reference_audio=[0.1] * 100, reference_text="t"),
    case("reference-audio-bytearray", INVALID, "reference_audio", reference_audio=bytearray(WAV),
         reference_text="t"),
    case("reference-audio-tensor", INVALID, "reference_audio", reference_audio=torch.zeros(100),
         reference_text="t"),
    case("reference-audio-no-samples", INVALID, "reference_audio", reference_audio=np.zeros(0, np.float32),
         reference_text="t"),
    case("reference-audio-3d", INVALID, "reference_audio", reference_audio=np.zeros((10, 10, 2), np.float32),
         reference_text="t"),
    case("reference-audio-complex", INVALID, "reference_audio", reference_audio=np.zeros(100, complex),
         reference_text="t"),
    case("reference-audio-unsigned", INVALID, "reference_audio", reference_audio=np.zeros(100, np.uint8),
         reference_text="t"),
    case("reference-audio-objects", INVALID, "reference_audio", reference_audio=np.array(["a"], dtype=object),
         reference_text="t"),
    # within max_reference_seconds, but more than the tiny model's context holds
    case("reference-audio-too-long", INVALID, "prompt", reference_audio=sine_wav(2.0), reference_text="t"),
    case("reference-audio-past-the-limit", INVALID, "reference_audio", reference_audio=HOUR_AT_1_HZ,
         reference_text="t"),
    case("reference-audio-nan", INVALID, "reference_audio", reference_audio=np.full(100, np.nan, np.float32),
         reference_text="t"),
    case("reference-text-missing", INVALID, "reference_text", reference_audio=WAV),
    case("reference-text-empty", INVALID, "reference_text", reference_audio=WAV, reference_text=""),
    case("reference-text-not-string", INVALID, "reference_text", reference_audio=WAV, reference_text=5),
    case("reference-text-alone", INVALID, "reference_text", reference_text="what the voice says"),
    # several inline references
    case("references-string", INVALID, "references", references="abc"),
    case("references-dict", INVALID, "references", references={"audio": WAV, "text": "t"}),
    case("references-int", INVALID, "references", references=5),
    case("references-item-string", INVALID, "references[0]", references=["x"]),
    case("references-item-one", INVALID, "references[0]", references=[(WAV,)]),
    case("references-item-three", INVALID, "references[0]", references=[(WAV, "t", "extra")]),
    case("references-item-junk", INVALID, "references[0].audio", references=[(b"junk", "t")]),
    case("references-second-bad", INVALID, "references[1].audio", references=[(WAV, "t"), (NOT_AUDIO, "t")]),
    case("references-past-the-limit", INVALID, "references[0].audio", references=[(HOUR_AT_1_HZ, "t")]),
    case("references-text-empty", INVALID, "references[0].text", references=[(WAV, "")]),
    case("references-text-none", INVALID, "references[0].text", references=[(WAV, None)]),
    case("references-with-id", INVALID, "reference_id", reference_id="narrator", references=[(WAV, "t")]),
    case("references-with-audio", INVALID, "reference_audio", reference_audio=WAV, reference_text="t",
         references=[(WAV, "t")]),
]


def _stream_error(engine: ProductionTTSEngine, text: Any, kwargs: dict[str, Any]) -> TTSError:
    with pytest.raises(TTSError) as info:
        for _ in engine.generate_stream(text, **kwargs):
            pass
    return info.value


async def _async_errors(engine: ProductionTTSEngine, text: Any, kwargs: dict[str, Any]) -> tuple[Any, TTSError]:
    response = await engine.agenerate(text, **kwargs)
    with pytest.raises(TTSError) as info:
        async for _ in engine.agenerate_stream(text, **kwargs):
            pass
    return response, info.value


@pytest.mark.parametrize("inputs, code, field", GENERATE)
def test_generate_names_the_field_and_rule(engine, inputs, code, field):
    kwargs = dict(inputs)
    text = kwargs.pop("text", "Hello.")
    response = engine.generate(text, **kwargs)
    assert not response.success and response.error_code == code, response.error
    assert_names(response.error, field)
    streamed = _stream_error(engine, text, kwargs)
    awaited, astreamed = asyncio.run(_async_errors(engine, text, kwargs))
    assert streamed.code == awaited.error_code == astreamed.code == code
    for message in (streamed.message, awaited.error, astreamed.message):
        assert_names(message, field)


UNKNOWN_KWARGS = [
    case("unknown-field", INVALID, "voice", voice="alloy"),
    case("unknown-misspelt", INVALID, "temprature", temprature=0.5),
    case("unknown-format", INVALID, "format", format="wav"),
    case("unknown-two", INVALID, "a_field", a_field=1, b_field=2),
]


@pytest.mark.parametrize("inputs, code, field", UNKNOWN_KWARGS)
def test_unknown_request_fields_are_named(engine, inputs, code, field):
    # generate has explicit keyword arguments (Python's own TypeError names the field);
    # the streaming and async calls take **kwargs and validate them
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{field}'"):
        engine.generate("Hello.", **inputs)
    error = _stream_error(engine, "Hello.", inputs)
    assert error.code == code
    assert_names(error.message, field)
    awaited, astreamed = asyncio.run(_async_errors(engine, "Hello.", inputs))
    assert awaited.error_code == astreamed.code == code and awaited.error == astreamed.message == error.message


def test_engine_serves_after_bad_requests(engine):
    assert_serves(engine)


# ---------------------------------------------------------------- register_voice

REGISTER = [
    case("id-none", InvalidVoiceId, "voice_id", voice_id=None),
    case("id-int", InvalidVoiceId, "voice_id", voice_id=5),
    case("id-list", InvalidVoiceId, "voice_id", voice_id=["a"]),
    case("id-empty", InvalidVoiceId, "voice_id", voice_id=""),
    case("id-slash", InvalidVoiceId, "voice_id", voice_id="a/b"),
    case("id-backslash", InvalidVoiceId, "voice_id", voice_id="a\\b"),
    case("id-dotdot", InvalidVoiceId, "voice_id", voice_id=".."),
    case("id-dot", InvalidVoiceId, "voice_id", voice_id="a.b"),
    case("id-too-long", InvalidVoiceId, "voice_id", voice_id="a" * 65),
    case("id-nul", InvalidVoiceId, "voice_id", voice_id="a\x00"),
    case("id-unicode", InvalidVoiceId, "voice_id", voice_id="café"),
    case("id-space", InvalidVoiceId, "voice_id", voice_id="a b"),
    case("text-none", VoiceError, "text", text=None),
    case("text-int", VoiceError, "text", text=5),
    case("text-empty", VoiceError, "text", text=""),
    case("text-spaces", VoiceError, "text", text="   "),
    case("text-too-long", VoiceError, "text", text="x" * 2001),
    case("audio-empty", InvalidReferenceAudio, "audio", audio=b""),
    case("audio-junk", InvalidReferenceAudio, "audio", audio=b"junk"),
    case("audio-png", InvalidReferenceAudio, "audio", audio=NOT_AUDIO),
    case("audio-header-only", InvalidReferenceAudio, "audio", audio=WAV[:44]),
    case("audio-past-the-limit", InvalidReferenceAudio, "audio", audio=HOUR_AT_1_HZ),
    case("audio-inf", InvalidReferenceAudio, "audio", audio=np.full(100, np.inf, np.float32)),
    case("audio-string", InvalidReferenceAudio, "audio", audio="voice.wav"),
    case("audio-int", InvalidReferenceAudio, "audio", audio=5),
    case("audio-list", InvalidReferenceAudio, "audio", audio=[0.1, 0.2]),
    case("audio-bytearray", InvalidReferenceAudio, "audio", audio=bytearray(WAV)),
    case("audio-memoryview", InvalidReferenceAudio, "audio", audio=memoryview(WAV)),
    case("audio-tensor", InvalidReferenceAudio, "audio", audio=torch.zeros(100)),
    case("audio-no-samples", InvalidReferenceAudio, "audio", audio=np.zeros(0, np.float32)),
    case("audio-3d", InvalidReferenceAudio, "audio", audio=np.zeros((10, 10, 2), np.float32)),
    case("audio-objects", InvalidReferenceAudio, "audio", audio=np.array([None, 1], dtype=object)),
    case("audio-strings", InvalidReferenceAudio, "audio", audio=np.array(["a", "b"])),
    case("audio-bool", InvalidReferenceAudio, "audio", audio=np.ones(100, bool)),
    case("audio-complex", InvalidReferenceAudio, "audio", audio=np.zeros(100, complex)),
    case("audio-unsigned", InvalidReferenceAudio, "audio", audio=np.zeros(100, np.uint8)),
    case("rate-with-file", InvalidReferenceAudio, "sample_rate", sample_rate=22050),
    case("rate-zero", InvalidReferenceAudio, "sample_rate", audio=np.zeros(100, np.float32), sample_rate=0),
    case("rate-negative", InvalidReferenceAudio, "sample_rate", audio=np.zeros(100, np.float32), sample_rate=-1),
    case("rate-float", InvalidReferenceAudio, "sample_rate", audio=np.zeros(100, np.float32), sample_rate=44100.0),
    case("rate-nan", InvalidReferenceAudio, "sample_rate", audio=np.zeros(100, np.float32), sample_rate=math.nan),
    case("rate-bool", InvalidReferenceAudio, "sample_rate", audio=np.zeros(100, np.float32), sample_rate=True),
    case("rate-string", InvalidReferenceAudio, "sample_rate", audio=np.zeros(100, np.float32),
         sample_rate="44100"),
]


@pytest.mark.parametrize("inputs, error, field", REGISTER)
def test_register_voice_names_the_field_and_rule(engine, inputs, error, field):
    before = [voice.id for voice in engine.voices.list()]
    args = {"voice_id": "bad_input_voice", "audio": WAV, "text": "What the voice says.", **inputs}
    with pytest.raises(error) as info:
        engine.register_voice(args.pop("voice_id"), args.pop("audio"), args.pop("text"), **args)
    assert_names(str(info.value), field)
    assert [voice.id for voice in engine.voices.list()] == before  # nothing half-registered


def test_a_voice_registers_and_speaks_after_bad_registrations(engine):
    engine.register_voice("bad_input_voice", WAV, "What the voice says.")
    try:
        assert engine.generate("With the voice.", reference_id="bad_input_voice", seed=3).success
    finally:
        engine.voices.delete("bad_input_voice")
    assert_serves(engine)


# ---------------------------------------------------------------- EngineConfig

CONFIG = [
    case("checkpoint-empty", EngineConfigError, "checkpoint_path", checkpoint_path=""),
    case("checkpoint-none", EngineConfigError, "checkpoint_path", checkpoint_path=None),
    case("checkpoint-int", EngineConfigError, "checkpoint_path", checkpoint_path=5),
    case("device-tpu", EngineConfigError, "device", device="tpu"),
    case("device-bad-index", EngineConfigError, "device", device="cuda:abc"),
    case("device-empty", EngineConfigError, "device", device=""),
    case("device-int", EngineConfigError, "device", device=0),
    case("precision-int8", EngineConfigError, "precision", precision="int8"),
    case("precision-short", EngineConfigError, "precision", precision="fp16"),
    case("compile-backend", EngineConfigError, "compile_backend", compile_backend="tensorrt"),
    case("compile-mode", EngineConfigError, "compile_mode", compile_mode="fast"),
    case("compile-mode-int", EngineConfigError, "compile_mode", compile_mode=5),
    case("compile-model-string", EngineConfigError, "compile_model", compile_model="yes"),
    case("compile-model-int", EngineConfigError, "compile_model", compile_model=1),
    case("warmup-string", EngineConfigError, "warmup", warmup="no"),
    case("clear-on-oom-string", EngineConfigError, "vram_clear_on_oom_only", vram_clear_on_oom_only="true"),
    case("clear-threshold-negative", EngineConfigError, "vram_clear_threshold_gb", vram_clear_threshold_gb=-1),
    case("clear-threshold-nan", EngineConfigError, "vram_clear_threshold_gb", vram_clear_threshold_gb=math.nan),
    case("timeout-zero", EngineConfigError, "request_timeout_seconds", request_timeout_seconds=0),
    case("timeout-negative", EngineConfigError, "request_timeout_seconds", request_timeout_seconds=-1),
    case("timeout-nan", EngineConfigError, "request_timeout_seconds", request_timeout_seconds=math.nan),
    case("timeout-inf", EngineConfigError, "request_timeout_seconds", request_timeout_seconds=math.inf),
    case("timeout-years", EngineConfigError, "request_timeout_seconds", request_timeout_seconds=1e9),
    case("timeout-string", EngineConfigError, "request_timeout_seconds", request_timeout_seconds="60"),
    case("timeout-bool", EngineConfigError, "request_timeout_seconds", request_timeout_seconds=True),
    case("text-length-zero", EngineConfigError, "max_text_length", max_text_length=0),
    case("text-length-float", EngineConfigError, "max_text_length", max_text_length=1.5),
    case("text-length-string", EngineConfigError, "max_text_length", max_text_length="100"),
    case("text-length-bool", EngineConfigError, "max_text_length", max_text_length=True),
    case("piece-chars-small", EngineConfigError, "text_piece_chars", text_piece_chars=15),
    case("max-new-tokens-one", EngineConfigError, "max_new_tokens", max_new_tokens=1),
    case("max-new-tokens-negative", EngineConfigError, "max_new_tokens", max_new_tokens=-1),
    case("max-new-tokens-float", EngineConfigError, "max_new_tokens", max_new_tokens=24.0),
    case("batch-zero", EngineConfigError, "max_batch_size", max_batch_size=0),
    case("batch-too-big", EngineConfigError, "max_batch_size", max_batch_size=1025),
    case("batch-float", EngineConfigError, "max_batch_size", max_batch_size=2.5),
    case("seq-len-negative", EngineConfigError, "max_seq_len", max_seq_len=-1),
    case("kv-negative", EngineConfigError, "kv_cache_gb", kv_cache_gb=-1),
    case("kv-nan", EngineConfigError, "kv_cache_gb", kv_cache_gb=math.nan),
    case("kv-inf", EngineConfigError, "kv_cache_gb", kv_cache_gb=math.inf),
    case("queue-negative", EngineConfigError, "max_queue_size", max_queue_size=-1),
    case("chunk-frames-zero", EngineConfigError, "stream_chunk_frames", stream_chunk_frames=0),
    case("chunk-frames-huge", EngineConfigError, "stream_chunk_frames", stream_chunk_frames=65),
    case("prefill-batch-zero", EngineConfigError, "prefill_batch_size", prefill_batch_size=0),
    case("prefill-batch-huge", EngineConfigError, "prefill_batch_size", prefill_batch_size=5000),
    case("temperature-zero", EngineConfigError, "default_temperature", default_temperature=0),
    case("temperature-nan", EngineConfigError, "default_temperature", default_temperature=math.nan),
    case("top-p-above-one", EngineConfigError, "default_top_p", default_top_p=1.1),
    case("top-p-inf", EngineConfigError, "default_top_p", default_top_p=math.inf),
    case("penalty-two", EngineConfigError, "default_repetition_penalty", default_repetition_penalty=2),
    case("voice-dir-int", EngineConfigError, "voice_registry_dir", voice_registry_dir=5),
    case("voice-dir-empty", EngineConfigError, "voice_registry_dir", voice_registry_dir=""),
    case("voice-registry-zero", EngineConfigError, "voice_registry_size", voice_registry_size=0),
    case("reference-cache-negative", EngineConfigError, "reference_cache_size", reference_cache_size=-1),
    case("reference-seconds-zero", EngineConfigError, "max_reference_seconds", max_reference_seconds=0),
    case("reference-seconds-negative", EngineConfigError, "max_reference_seconds", max_reference_seconds=-30),
    case("reference-seconds-nan", EngineConfigError, "max_reference_seconds", max_reference_seconds=math.nan),
    case("reference-seconds-inf", EngineConfigError, "max_reference_seconds", max_reference_seconds=math.inf),
    case("reference-seconds-string", EngineConfigError, "max_reference_seconds", max_reference_seconds="30"),
]


@pytest.mark.parametrize("inputs, error, field", CONFIG)
def test_engine_config_names_the_field_and_rule(inputs, error, field):
    with pytest.raises(error) as info:
        EngineConfig(**inputs)
    assert_names(str(info.value), field)


ENVIRONMENT = [
    case("env-int-not-a-number", EngineConfigError, "S1_MINI_MAX_BATCH_SIZE", S1_MINI_MAX_BATCH_SIZE="x"),
    case("env-int-float", EngineConfigError, "S1_MINI_MAX_NEW_TOKENS", S1_MINI_MAX_NEW_TOKENS="2.5"),
    case("env-float-word", EngineConfigError, "S1_MINI_KV_CACHE_GB", S1_MINI_KV_CACHE_GB="lots"),
    case("env-bool-maybe", EngineConfigError, "S1_MINI_COMPILE", S1_MINI_COMPILE="maybe"),
    case("env-bool-empty", EngineConfigError, "S1_MINI_WARMUP", S1_MINI_WARMUP=""),
    case("env-timeout-nan", EngineConfigError, "request_timeout_seconds", S1_MINI_REQUEST_TIMEOUT="nan"),
    case("env-timeout-inf", EngineConfigError, "request_timeout_seconds", S1_MINI_REQUEST_TIMEOUT="inf"),
    case("env-device", EngineConfigError, "device", S1_MINI_DEVICE="gpu"),
    case("env-precision", EngineConfigError, "precision", S1_MINI_PRECISION="half"),
    case("env-reference-seconds-word", EngineConfigError, "S1_MINI_MAX_REFERENCE_SECONDS",
         S1_MINI_MAX_REFERENCE_SECONDS="long"),
    case("env-reference-seconds-inf", EngineConfigError, "max_reference_seconds", S1_MINI_MAX_REFERENCE_SECONDS="inf"),
]


@pytest.mark.parametrize("inputs, error, field", ENVIRONMENT)
def test_config_from_the_environment_names_the_variable_or_field(inputs, error, field):
    with pytest.raises(error) as info:
        EngineConfig.from_env(inputs)
    assert_names(str(info.value), field)


def test_unknown_options_are_named():
    with pytest.raises(EngineConfigError) as info:
        EngineConfig.from_env({}, max_batch=4)
    assert_names(str(info.value), "max_batch")
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_batch'"):
        EngineConfig(max_batch=4)


def test_a_kv_budget_that_holds_nothing_is_refused_at_start():
    config = EngineConfig(checkpoint_path=str(tiny_checkpoint()), device="cpu", precision="float32",
                          compile_model=False, warmup=False, kv_cache_gb=1e-12)
    with pytest.raises(ValueError) as info:
        ProductionTTSEngine(config).start()
    assert_names(str(info.value), "kv_cache_gb")


# ---------------------------------------------------------------- property-based fuzzing

FIELDS = ("text", "temperature", "top_p", "repetition_penalty", "max_new_tokens", "seed", "reference_id",
          "reference_audio", "reference_text", "references", "timeout", "voice_id", "prompt", "audio")
junk = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.binary(max_size=16),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
VALID = {
    "text": st.text(min_size=1, max_size=40).filter(str.strip),
    "temperature": st.none() | st.floats(0.01, 1.99),
    "top_p": st.none() | st.floats(0.01, 1),
    "repetition_penalty": st.none() | st.floats(0.5, 1.5),
    "max_new_tokens": st.sampled_from([None, 2, 3]),  # valid requests stay short
    "seed": st.none() | st.integers(-(2**63), 2**64 - 1),
    "timeout": st.none() | st.floats(1, 60),
}


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """A valid request with up to three fields replaced by arbitrary values."""
    request = {name: draw(strategy) for name, strategy in VALID.items()}
    voice = draw(st.sampled_from(["none", "inline", "several"]))
    if voice == "inline":
        request.update(reference_audio=WAV, reference_text=draw(VALID["text"]))
    elif voice == "several":
        request["references"] = [(WAV, draw(VALID["text"]))] * draw(st.integers(1, 2))
    names = sorted(VALID) + ["reference_id", "reference_audio", "reference_text", "references"]
    for name in draw(st.sets(st.sampled_from(names), max_size=3)):
        request[name] = draw(junk | st.text(max_size=70))
    return request


def test_fuzzed_requests_give_a_response_or_a_named_error(engine):
    outcomes: dict[str, int] = {}

    @settings(max_examples=250, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(request=requests())
    def run(request):
        kwargs = dict(request)
        response = engine.generate(kwargs.pop("text"), **kwargs)
        outcomes[response.error_code or "success"] = outcomes.get(response.error_code or "success", 0) + 1
        if response.success:
            return
        assert response.error_code in (INVALID, NOT_FOUND), response.error
        field = response.error.split(":")[0].split("[")[0].split(".")[0]
        assert field in FIELDS, response.error

    run()
    assert outcomes.get("success", 0) >= 25 and outcomes.get(INVALID, 0) >= 100, outcomes
    assert_serves(engine)


CONFIG_VALUES = st.fixed_dictionaries({}, optional={
    name: junk | st.floats(-1e3, 1e3) | st.integers(-5, 2000) | st.sampled_from(["cpu", "cuda:0", "float32", "auto"])
    for name in ("device", "precision", "compile_model", "compile_backend", "compile_mode", "request_timeout_seconds",
                 "max_text_length", "text_piece_chars", "max_new_tokens", "max_batch_size", "max_seq_len",
                 "kv_cache_gb", "max_queue_size", "stream_chunk_frames", "prefill_batch_size", "warmup", "default_temperature",
                 "default_top_p", "default_repetition_penalty", "voice_registry_dir", "voice_registry_size",
                 "reference_cache_size", "max_reference_seconds", "vram_clear_threshold_gb",
                 "vram_clear_on_oom_only")})


@settings(max_examples=400, deadline=None, database=None, derandomize=True)
@given(values=CONFIG_VALUES)
def test_fuzzed_engine_configs_are_valid_or_name_a_field(values):
    try:
        config = EngineConfig(**values)
    except EngineConfigError as exc:
        assert str(exc).split(":")[0] in values, exc
        return
    for name, value in values.items():  # what was accepted holds its rule
        assert getattr(config, name) == value
    assert 0 < config.request_timeout_seconds < math.inf and isinstance(config.max_batch_size, int)
