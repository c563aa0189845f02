"""ProductionTTSEngine on the tiny random checkpoint, on the CPU."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from server_utils import sine_wav

from s1_mini import EngineConfig, ProductionTTSEngine
from s1_mini.config import EngineConfigError
from s1_mini.scheduler import ErrorCode
from s1_mini.testing.make_checkpoint import make_checkpoint

TEXTS = [f"Request number {i}: the quick brown fox {i}." for i in range(16)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("engine") / "ckpt", "tiny", seed=0)


def _config(checkpoint: Path, **kw) -> EngineConfig:
    base = dict(checkpoint_path=str(checkpoint), device="cpu", precision="float32", max_new_tokens=24,
                max_batch_size=8)
    return EngineConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def engine(checkpoint):
    with ProductionTTSEngine(_config(checkpoint)) as e:
        yield e


def _sine_wav(seconds: float = 0.05) -> bytes:
    # short: the tiny model's context holds 256 positions and the codec makes 689 frames/s
    return sine_wav(seconds)


def _assert_audio(response, engine):
    assert response.success, response.error
    rate, audio = response.audio
    assert rate == 44100 and audio.dtype == np.float32
    frame = engine.model_manager.codec.config.frame_length
    assert audio.shape == (response.codes.shape[1] * frame,)
    assert np.isfinite(audio).all() and np.abs(audio).max() < 1
    assert response.timings.frames == response.codes.shape[1] > 0


# ---------------------------------------------------------------- the seed README


def test_readme_examples_run_as_written(checkpoint, tmp_path):
    # "Python API" (only the checkpoint path adapted; there is no GPU here, so the
    # engine falls back to the CPU and to eager execution)
    config = EngineConfig(
        checkpoint_path=str(checkpoint),
        device="cuda",
        precision="float16",
        compile_model=True,  # Uses Triton on Linux, eager on Windows
    )
    engine = ProductionTTSEngine(config)
    engine.start()
    response = engine.generate(
        text="Hello, this is a test of the text to speech system.",
        temperature=0.7,
        top_p=0.8,
    )
    if response.success:
        sample_rate, audio = response.audio
        sf.write(tmp_path / "output.wav", audio, sample_rate)
    engine.stop()
    assert response.success, response.error
    assert sf.info(tmp_path / "output.wav").samplerate == 44100

    # "Context Manager"
    config = EngineConfig(checkpoint_path=str(checkpoint))
    with ProductionTTSEngine(config) as engine:
        response = engine.generate("Hello world!")
        assert response.success, response.error
        health = engine.health_check()
    assert health["healthy"] and health["models_loaded"] and health["device"] == "cpu"
    assert set(health["vram"]) == {"used_gb", "total_gb"}


# ---------------------------------------------------------------- concurrency


def test_concurrent_threads_and_asyncio_equal_sequential(engine):
    sequential = [engine.generate(t, seed=i) for i, t in enumerate(TEXTS)]
    for r in sequential:
        _assert_audio(r, engine)

    results: list = [None] * len(TEXTS)

    def call(i: int) -> None:
        results[i] = engine.generate(TEXTS[i], seed=i)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(TEXTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    async def many():
        return await asyncio.gather(*(engine.agenerate(t, seed=i) for i, t in enumerate(TEXTS)))

    async_results = asyncio.run(many())
    for seq, thr, asy in zip(sequential, results, async_results):
        _assert_audio(thr, engine)
        _assert_audio(asy, engine)
        np.testing.assert_array_equal(seq.codes, thr.codes)
        np.testing.assert_array_equal(seq.codes, asy.codes)
    assert engine.health_check()["steps"] > 0


def test_compiled_runner_same_seed_alone_and_batched(checkpoint):
    """The compiled runner's path (every occupied slot each step, counter noise; here
    wrapped by nothing, on the CPU): a seeded request gives the same codes alone and
    sharing steps with others, and valid audio."""
    with ProductionTTSEngine(_config(checkpoint, max_batch_size=4)) as compiled:
        compiled._runner.compile(lambda fn, dynamic: fn)
        alone = [compiled.generate(TEXTS[i], seed=i) for i in range(6)]
        results: list = [None] * 6

        def call(i: int) -> None:
            results[i] = compiled.generate(TEXTS[i], seed=i)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert compiled.health_check()["peak_batch"] > 1
        for a, r in zip(alone, results):
            _assert_audio(r, compiled)
            np.testing.assert_array_equal(r.codes, a.codes)


def test_requests_finishing_out_of_order(engine):
    """A short request that finishes while a longer one is still running (found by the
    load harness: requests once compared their tensors when removed from the batch)."""
    long = engine.submit("A long request that keeps decoding for a while.", max_new_tokens=40, seed=1)
    time.sleep(0.05)
    short = engine.generate("Short.", max_new_tokens=3, seed=2)
    _assert_audio(short, engine)
    assert long.future.result(timeout=60).codes.shape[1] > 0


def test_streaming_chunks_equal_offline_audio(engine):
    whole = engine.generate(TEXTS[3], seed=3)
    chunks = list(engine.generate_stream(TEXTS[3], seed=3))
    assert len(chunks) >= 2
    frame = engine.model_manager.codec.config.frame_length
    assert all(len(c) % frame == 0 and len(c) > 0 for c in chunks)
    np.testing.assert_allclose(np.concatenate(chunks), whole.audio[1], atol=1e-5)

    async def collect():
        return [c async for c in engine.agenerate_stream(TEXTS[3], seed=3)]

    np.testing.assert_allclose(np.concatenate(asyncio.run(collect())), whole.audio[1], atol=1e-5)


def test_compiled_path_streams_keep_a_step_in_flight_and_equal_offline_audio(checkpoint):
    """The compiled runner's scheduler reads each decode step's frames one step late
    (``decode(lag=1)``): concurrent streams of different lengths, one of them in two text
    pieces, give the audio of their offline requests (no frame past a piece's end
    leaks into the audio, none is lost) and the steps did run one ahead."""
    texts = [TEXTS[1], "Short.", "A first sentence of this one. And then a second sentence follows it."]
    with ProductionTTSEngine(_config(checkpoint, max_batch_size=4, text_piece_chars=40)) as e:
        e._runner.compile(lambda fn, dynamic: fn)  # the compiled path (counter noise), not compiled
        lags = []
        decode = e._runner.decode
        e._runner.decode = lambda seqs, lag=0: (lags.append(lag), decode(seqs, lag))[1]
        offline = [e.generate(t, seed=i, max_new_tokens=8 + 6 * i) for i, t in enumerate(texts)]
        outputs: dict[int, list[np.ndarray]] = {}

        def run(i: int) -> None:
            outputs[i] = list(e.generate_stream(texts[i], seed=i, max_new_tokens=8 + 6 * i))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i, whole in enumerate(offline):
            _assert_audio(whole, e)
            np.testing.assert_allclose(np.concatenate(outputs[i]), whole.audio[1], atol=1e-5)
    assert set(lags) == {1}


def test_concurrent_streams_share_codec_steps(engine):
    """Streams joining at different times: each one's chunks still equal its offline
    audio, no chunk exceeds stream_chunk_frames, and one codec step serves several
    streams (fewer steps than chunks)."""
    streams = engine._scheduler.streams
    launches = []
    launch = streams.launch
    streams.launch = lambda chunks: (launches.append(len(chunks)), launch(chunks))[1]
    try:
        outputs: dict[int, list[np.ndarray]] = {}

        def run(i: int) -> None:
            time.sleep(0.02 * i)
            outputs[i] = list(engine.generate_stream(TEXTS[8 + i], seed=i))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        streams.launch = launch
    frame = engine.model_manager.codec.config.frame_length
    chunks = [c for out in outputs.values() for c in out]
    assert all(0 < len(c) <= engine.config.stream_chunk_frames * frame for c in chunks)
    assert max(launches) > 1 and len(launches) < len(chunks)
    for i, out in outputs.items():
        np.testing.assert_allclose(np.concatenate(out), engine.generate(TEXTS[8 + i], seed=i).audio[1], atol=1e-5)


def test_long_text_is_generated_in_pieces(checkpoint):
    with ProductionTTSEngine(_config(checkpoint, text_piece_chars=40, max_new_tokens=8)) as engine:
        text = "First sentence is here. Second one follows! 第三句话在这里。 And the last?"
        whole = engine.generate(text, seed=5)
        _assert_audio(whole, engine)
        streamed = np.concatenate(list(engine.generate_stream(text, seed=5)))
        np.testing.assert_allclose(streamed, whole.audio[1], atol=1e-5)
        # several pieces: more frames than one piece can hold
        assert whole.codes.shape[1] > 7


# ---------------------------------------------------------------- bad input and faults


@pytest.mark.parametrize("kwargs, code, message", [
    (dict(temperature=-0.5), ErrorCode.INVALID, "temperature: must satisfy 0 < temperature < 2"),
    (dict(top_p=1.5), ErrorCode.INVALID, "top_p: must satisfy 0 < top_p <= 1"),
    (dict(top_p=0), ErrorCode.INVALID, "top_p: must satisfy 0 < top_p <= 1"),
    (dict(text=""), ErrorCode.INVALID, "text: must be a non-empty string"),
    (dict(text="   "), ErrorCode.INVALID, "text: must be a non-empty string"),
    (dict(text=None), ErrorCode.INVALID, "text: must be a non-empty string"),
    (dict(max_new_tokens=1), ErrorCode.INVALID, "max_new_tokens"),
    (dict(seed="x"), ErrorCode.INVALID, "seed: must be an integer"),
    (dict(reference_id="nobody"), ErrorCode.NOT_FOUND, "nobody"),
    (dict(reference_id="../etc/passwd"), ErrorCode.INVALID, "voice_id"),
    (dict(reference_id="a/b"), ErrorCode.INVALID, "voice_id"),
    (dict(reference_audio=b"this is not audio at all", reference_text="hi"), ErrorCode.INVALID, "audio"),
    (dict(reference_audio=_sine_wav()), ErrorCode.INVALID, "reference_text: required"),
    (dict(references=[(_sine_wav(), "")]), ErrorCode.INVALID, "references[0].text: required"),
    # the request's own field, and libsndfile's reason without its file object's memory address
    (dict(references=[(b"junk", "hi")]), ErrorCode.INVALID,
     "references[0].audio: cannot be used as a reference: cannot read audio bytes: Format not recognised."),
    (dict(references=[(np.full(100, np.nan, np.float32), "hi")]), ErrorCode.INVALID,
     "references[0].audio: cannot be used as a reference: samples must be finite numbers, got 100 NaN or "
     "infinite of 100"),
    (dict(references=["x"]), ErrorCode.INVALID, "references[0]: must be an (audio, text) pair"),
    (dict(reference_id="narrator", references=[(_sine_wav(), "hi")]), ErrorCode.INVALID, "give only one of"),
])
def test_bad_input_is_a_clear_error_and_the_next_request_works(engine, kwargs, code, message):
    args = {"text": "Hello there.", **kwargs}
    response = engine.generate(args.pop("text"), **args)
    assert not response.success and response.audio is None
    assert response.error_code == code, response.error
    assert message in response.error
    _assert_audio(engine.generate("The next request.", seed=1), engine)


def test_timeout_frees_the_slot(engine):
    response = engine.generate("This one will not make it in time.", timeout=1e-4, max_new_tokens=200)
    assert response.error_code == ErrorCode.TIMEOUT
    assert "timed out" in response.error
    deadline = time.time() + 5
    while engine.health_check()["active"] and time.time() < deadline:
        time.sleep(0.01)
    assert engine.health_check()["active"] == 0
    _assert_audio(engine.generate("After the timeout.", seed=2), engine)


def test_cancellation_by_the_caller(engine):
    async def cancel_one():
        task = asyncio.create_task(engine.agenerate("Cancel me please, I am long.", max_new_tokens=200, seed=1))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_one())
    stream = engine.generate_stream("A stream the client leaves early.", max_new_tokens=200, seed=1)
    next(stream)
    stream.close()
    deadline = time.time() + 5
    while engine.health_check()["active"] and time.time() < deadline:
        time.sleep(0.01)
    assert engine.health_check()["active"] == 0
    _assert_audio(engine.generate("After the cancellations.", seed=3), engine)


def test_simulated_out_of_memory_is_recovered(engine):
    runner = engine._runner
    fired = []

    def oom_once(stage: str) -> None:
        if stage == "decode" and not fired:
            fired.append(stage)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    runner.fault_hook = oom_once
    try:
        response = engine.generate("This request hits the out-of-memory error.", seed=4)
    finally:
        runner.fault_hook = None
    assert fired and response.error_code == ErrorCode.OUT_OF_MEMORY
    _assert_audio(engine.generate("And this one works.", seed=4), engine)


def test_overload_is_refused_at_once(checkpoint):
    with ProductionTTSEngine(_config(checkpoint, max_batch_size=1, max_queue_size=0, max_new_tokens=200)) as engine:
        first = engine.submit("A long request that holds the only slot.", seed=1)
        time.sleep(0.05)
        refused = engine.generate("Refused.", seed=2)
        assert refused.error_code == ErrorCode.OVERLOADED and "max_queue_size" in refused.error
        first.future.result(timeout=60)


def test_generate_after_stop_is_an_error(checkpoint):
    engine = ProductionTTSEngine(_config(checkpoint, warmup=False))
    engine.start()
    engine.stop()
    response = engine.generate("Hello")
    assert response.error_code == ErrorCode.STOPPED
    assert not engine.health_check()["healthy"]


# ---------------------------------------------------------------- voices


def test_voice_survives_a_restart_and_gives_the_same_codes(checkpoint, tmp_path):
    config = _config(checkpoint, voice_registry_dir=str(tmp_path / "voices"))
    with ProductionTTSEngine(config) as engine:
        voice = engine.register_voice("narrator_1", _sine_wav(), "A short reference.")
        first = engine.generate("Speak with the voice.", reference_id="narrator_1", seed=9)
        _assert_audio(first, engine)
        inline = engine.generate("Speak with the voice.", reference_audio=_sine_wav(),
                                 reference_text="A short reference.", seed=9)
        np.testing.assert_array_equal(inline.codes, first.codes)
        two = engine.generate("Two references.", references=[(_sine_wav(), "First."), (_sine_wav(0.03), "Second.")],
                              seed=9)
        _assert_audio(two, engine)
    with ProductionTTSEngine(config) as engine:
        assert engine.voices.get("narrator_1").codes.shape == voice.codes.shape
        again = engine.generate("Speak with the voice.", reference_id="narrator_1", seed=9)
        np.testing.assert_array_equal(again.codes, first.codes)


# ---------------------------------------------------------------- config


def test_config_from_env_and_rules(checkpoint):
    env = {"S1_MINI_CHECKPOINT_PATH": str(checkpoint), "S1_MINI_DEVICE": "cpu", "S1_MINI_PRECISION": "float32",
           "S1_MINI_COMPILE": "false", "S1_MINI_REQUEST_TIMEOUT": "12.5", "S1_MINI_MAX_BATCH_SIZE": "3",
           "S1_MINI_VOICE_REGISTRY_DIR": "none"}
    c = EngineConfig.from_env(env)
    assert (c.device, c.compile_model, c.request_timeout_seconds, c.max_batch_size, c.voice_registry_dir) == (
        "cpu", False, 12.5, 3, None)
    assert EngineConfig.from_env(env, max_batch_size=5).max_batch_size == 5
    with pytest.raises(EngineConfigError, match="S1_MINI_MAX_BATCH_SIZE: must be a int"):
        EngineConfig.from_env({"S1_MINI_MAX_BATCH_SIZE": "many"})
    with pytest.raises(EngineConfigError, match="precision: must be one of float16, bfloat16, float32"):
        EngineConfig(precision="int8")
    with pytest.raises(EngineConfigError, match="default_top_p: must satisfy 0 < x <= 1"):
        EngineConfig(default_top_p=1.5)
    with pytest.raises(EngineConfigError, match="compile_backend: must be one of auto, inductor, eager, disabled"):
        EngineConfig(compile_backend="tvm")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    from s1_mini.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        ProductionTTSEngine(EngineConfig(checkpoint_path=str(tmp_path / "nope"), device="cpu")).start()


# ---------------------------------------------------------------- synthesize CLI


def _synthesize(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "s1_mini.synthesize", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_synthesize_cli_writes_a_wav_and_says_random_weights(checkpoint, tmp_path):
    ref = tmp_path / "voice.wav"
    ref.write_bytes(_sine_wav())
    out = tmp_path / "speech.wav"
    proc = _synthesize("--checkpoint", checkpoint, "--text", "Hello there.", "--out", out, "--device", "cpu",
                       "--precision", "float32", "--max-new-tokens", 16, "--seed", 1,
                       "--reference-audio", ref, "--reference-text", "A reference.")
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM weights" in proc.stderr
    audio, rate = sf.read(out)
    assert rate == 44100 and len(audio) > 0 and len(audio) % 64 == 0


@pytest.mark.parametrize("args, message", [
    (["--temperature", "5"], "temperature: must satisfy"),
    (["--reference-audio", "/nonexistent.wav", "--reference-text", "x"], "--reference-audio: cannot read"),
    (["--precision", "float32", "--max-new-tokens", "1"], "max_new_tokens: must be 0 or >= 2"),
])
def test_synthesize_cli_bad_input(checkpoint, tmp_path, args, message):
    proc = _synthesize("--checkpoint", checkpoint, "--text", "Hi", "--out", tmp_path / "x.wav", "--device", "cpu", *args)
    assert proc.returncode in (1, 2) and message in proc.stderr and "Traceback" not in proc.stderr


# The thread's death is the point of the test: pytest's report of it is expected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_scheduler_thread_fails_its_requests(checkpoint):
    """A BaseException (not caught per step) kills the scheduler thread: the requests it
    held get an error at once instead of waiting for their timeout, and new ones are refused."""
    class Killed(BaseException):
        pass

    with ProductionTTSEngine(_config(checkpoint)) as e:
        running = e.submit("A request on a thread about to die.", max_new_tokens=40, seed=1)

        def kill(stage: str) -> None:
            if stage == "decode":
                raise Killed()

        e._runner.fault_hook = kill
        response = e.wait(running)
        assert not response.success and response.error_code == ErrorCode.STOPPED
        refused = e.generate("Too late.", seed=2)
        assert not refused.success and refused.error_code == ErrorCode.STOPPED
        assert not e.health_check()["healthy"]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-path"])
def test_voice_prefix_cache_gives_the_same_codes(checkpoint, compiled):
    """The second request with a registered voice copies the voice's prompt part from the
    prefix cache and prefills only its own text: same codes as the first, which
    prefilled everything; long texts (several pieces) too; a voice registered again
    under the same id with other audio does not reuse the old entry."""
    with ProductionTTSEngine(_config(checkpoint, text_piece_chars=100)) as e:
        if compiled:
            e._runner.compile(lambda fn, dynamic: fn)  # padded prefill from an offset
        e.register_voice("cached", _sine_wav(), "The cached voice speaking.")
        texts = ["First request with the voice.", "A longer text. " * 8 + "It has several pieces."]
        caches = e._runner.model.slow_caches

        def prompt_kv() -> list[torch.Tensor]:  # slot 0, the voice's part and the first target columns
            P = next(iter(e._runner.prefix_cache.entries.values()))[0][0].shape[1]
            return [t[0, :, :P + 5].clone() for c in caches for t in (c.k, c.v)]

        for i, text in enumerate(texts):
            first = e.generate(text, reference_id="cached", seed=3)
            kv_first = prompt_kv()
            # Another prompt through the same slot, so that the cache positions the
            # voice's part needs hold something else unless the prefix cache restores them.
            assert e.generate("Something else entirely to overwrite the slot with a prompt longer than the voice part",
                              seed=4).success
            again = e.generate(text, reference_id="cached", seed=3)
            _assert_audio(again, e)
            np.testing.assert_array_equal(first.codes, again.codes)
            if i == 0:  # one piece: slot 0 holds this prompt in both runs
                for a, b in zip(kv_first, prompt_kv()):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        stats = e.health_check()
        assert stats["prefix_cache_misses"] == 1 and stats["prefix_cache_hits"] >= 3
        e.register_voice("cached", _sine_wav(0.07), "The cached voice speaking.")
        e.generate(texts[0], reference_id="cached", seed=3)
        assert e.health_check()["prefix_cache_misses"] == 2


def test_inline_references_share_the_prefix_cache(checkpoint):
    """The prefix cache is keyed by the voice's prompt part: the same audio and transcript
    sent inline again hits it, and so does a registered voice with that content (same
    codes as the inline requests); other audio misses."""
    with ProductionTTSEngine(_config(checkpoint)) as e:
        inline = dict(reference_audio=_sine_wav(), reference_text="The inline voice speaking.")
        first = e.generate("First request.", seed=3, **inline)
        again = e.generate("First request.", seed=3, **inline)
        assert first.success and again.success
        np.testing.assert_array_equal(first.codes, again.codes)
        assert (e.health_check()["prefix_cache_misses"], e.health_check()["prefix_cache_hits"]) == (1, 1)
        e.register_voice("same", _sine_wav(), "The inline voice speaking.")
        registered = e.generate("First request.", seed=3, reference_id="same")
        np.testing.assert_array_equal(first.codes, registered.codes)
        assert e.generate("First request.", seed=3, reference_audio=_sine_wav(0.07),
                          reference_text="The inline voice speaking.").success
        assert (e.health_check()["prefix_cache_misses"], e.health_check()["prefix_cache_hits"]) == (2, 2)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-path"])
def test_requests_admitted_together_are_prefilled_in_batches(checkpoint, compiled):
    """prefill_batch_size 4: five requests admitted in one iteration (two of them with a
    voice whose prompt part comes from the prefix cache, so their prefill starts at an
    offset) are prefilled as a batch of 4 and one of 1, and give the codes they give
    one at a time."""
    requests = [dict(text="Plain text number one.", seed=1), dict(text="With the voice.", reference_id="v", seed=2),
                dict(text="Plain text again, a longer one than the others.", seed=3),
                dict(text="The voice again, other words.", reference_id="v", seed=4), dict(text="Last.", seed=5)]

    def run(batch: int) -> tuple[list[np.ndarray], list[int]]:
        with ProductionTTSEngine(_config(checkpoint, prefill_batch_size=batch, max_new_tokens=12)) as e:
            if compiled:
                e._runner.compile(lambda fn, dynamic: fn)  # padded prefill and counter noise, not compiled
            e.register_voice("v", _sine_wav(), "The voice speaking.")
            assert e.generate("Fill the prefix cache.", reference_id="v", seed=9).success
            sizes, hold, held = [], threading.Event(), threading.Event()
            prefill_batch = e._runner.prefill_batch
            e._runner.prefill_batch = lambda seqs: (sizes.append(len(seqs)), prefill_batch(seqs))[1]

            def pause(where: str) -> None:  # hold the scheduler in a decode step while the five queue up
                if where == "decode" and not held.is_set():
                    held.set()
                    hold.wait(30)

            e._runner.fault_hook = pause
            blocker = e.submit("Keeps the scheduler busy.", seed=8)
            assert held.wait(30)
            submitted = [e.submit(**r) for r in requests]
            hold.set()
            responses = [e.wait(r) for r in submitted]
            assert e.wait(blocker).success
            assert all(r.success for r in responses), [r.error for r in responses]
            return [r.codes for r in responses], sizes

    one_by_one, _ = run(1)
    together, sizes = run(4)
    assert sorted(sizes[-2:]) == [1, 4]
    for a, b in zip(one_by_one, together):
        np.testing.assert_array_equal(a, b)


def test_model_fn_uses_a_shipped_compile_cache(checkpoint, tmp_path, monkeypatch):
    """A compile-cache/ directory in model.tar.gz's checkpoint is copied somewhere writable
    and becomes the engine's compile_cache_dir (inductor's TORCHINDUCTOR_CACHE_DIR)."""
    import shutil

    from s1_mini.sagemaker.handlers import COMPILE_CACHE, model_fn

    model_dir = tmp_path / "model"
    shutil.copytree(checkpoint, model_dir)
    (model_dir / COMPILE_CACHE / "fxgraph").mkdir(parents=True)
    (model_dir / COMPILE_CACHE / "fxgraph" / "entry").write_text("kernels")
    for name, value in dict(S1_MINI_DEVICE="cpu", S1_MINI_PRECISION="float32", S1_MINI_WARMUP="false").items():
        monkeypatch.setenv(name, value)
    engine = model_fn(str(model_dir))
    try:
        copied = Path(engine.config.compile_cache_dir)
        assert copied != model_dir / COMPILE_CACHE and (copied / "fxgraph" / "entry").read_text() == "kernels"
    finally:
        engine.stop()
