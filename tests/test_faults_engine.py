"""Faults inside the engine (in-process, tiny checkpoint, CPU): a CUDA out-of-memory
error injected through the runner's ``fault_hook`` while several requests share one
batch. Every request fails with the documented error or finishes with valid audio; the
slots are freed and the engine keeps serving. (Timeouts and cancellation of one request:
tests/test_engine.py.)"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from s1_mini import EngineConfig, ProductionTTSEngine
from s1_mini.scheduler import ErrorCode, TTSError
from s1_mini.testing.make_checkpoint import make_checkpoint

REQUESTS = 5
TEXTS = [f"Batched request {i} meets a simulated out-of-memory error." for i in range(REQUESTS)]


@pytest.fixture(scope="module", params=["eager", "compiled-path"])
def engine(tmp_path_factory, request):
    """The eager runner, and the compiled runner's path (counter noise, a decode step in
    flight; wrapped by nothing, on the CPU)."""
    checkpoint: Path = make_checkpoint(tmp_path_factory.mktemp("faults-engine") / "ckpt", "tiny", seed=0)
    config = EngineConfig(checkpoint_path=str(checkpoint), device="cpu", precision="float32", max_new_tokens=48,
                          max_batch_size=8)
    with ProductionTTSEngine(config) as e:
        if request.param == "compiled-path":
            e._runner.compile(lambda fn, dynamic: fn)
        yield e


def _oom_when(stage: str, engine: ProductionTTSEngine, min_active: int, fired: list[dict]):
    """A fault hook raising one CUDA OOM at ``stage`` once ``min_active`` requests run
    and a few steps have been decoded (mid-generation)."""
    start = engine.health_check()["steps"]

    def hook(at: str) -> None:
        if at == stage and not fired:
            stats = engine.health_check()
            if stats["active"] >= min_active and stats["steps"] >= start + 3:
                fired.append(stats)
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    return hook


def _run_batch(engine: ProductionTTSEngine) -> tuple[list, list]:
    """REQUESTS whole-file requests (47 frames each), then, once they are a few steps in,
    a stream that joins their batch."""
    start = engine.health_check()["steps"]
    requests = [engine.submit(text, seed=i) for i, text in enumerate(TEXTS)]
    while engine.health_check()["steps"] < start + 3 and not all(r.future.done() for r in requests):
        time.sleep(0.001)
    stream_outcome: list = []

    def read_stream() -> None:
        try:
            stream_outcome.append(np.concatenate(list(engine.generate_stream("A stream in the same batch.", seed=99))))
        except TTSError as exc:
            stream_outcome.append(exc)

    reader = threading.Thread(target=read_stream)
    reader.start()
    responses = [engine.wait(r) for r in requests]
    reader.join(60)
    assert not reader.is_alive()
    return responses, stream_outcome


def _assert_idle(engine: ProductionTTSEngine) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = engine.health_check()
        if stats["active"] == 0 and stats["queue_depth"] == 0 and stats["kv_slots_used"] == 0:
            break
        time.sleep(0.01)
    assert stats["healthy"] and stats["active"] == 0 and stats["queue_depth"] == 0, stats
    assert stats["kv_slots_used"] == 0 and stats["kv_slots_total"] == 8, stats  # every KV slot free


def _assert_ok_or_oom(response) -> bool:
    """True for a clean out-of-memory failure, False for a success with valid audio."""
    if response.success:
        rate, audio = response.audio
        assert rate == 44100 and audio.size > 0 and np.isfinite(audio).all()
        return False
    assert response.error_code == ErrorCode.OUT_OF_MEMORY, (response.error_code, response.error)
    assert "out of memory" in response.error and "Traceback" not in response.error
    return True


@pytest.mark.parametrize("stage", ["decode", "prefill"])
def test_out_of_memory_mid_batch_fails_cleanly_and_frees_everything(engine, stage):
    fired: list[dict] = []
    # decode: a step of the whole running batch fails; prefill: the stream's admission
    # fails while the others are decoding
    engine._runner.fault_hook = _oom_when(stage, engine, REQUESTS, fired)
    try:
        responses, stream = _run_batch(engine)
    finally:
        engine._runner.fault_hook = None
    assert fired, "the fault was never injected"
    ooms = [_assert_ok_or_oom(r) for r in responses]
    streamed = stream[0]
    if isinstance(streamed, TTSError):
        assert streamed.code == ErrorCode.OUT_OF_MEMORY
        ooms.append(True)
    else:
        assert streamed.size > 0 and np.isfinite(streamed).all()
    if stage == "decode":
        assert sum(ooms) >= REQUESTS, ooms  # every request of the failing step
    else:
        assert ooms == [False] * REQUESTS + [True], ooms  # only the stream being admitted
    _assert_idle(engine)
    # the engine is not degraded: the same batch again, without the fault, all succeeds
    responses, stream = _run_batch(engine)
    assert not any(_assert_ok_or_oom(r) for r in responses)
    assert isinstance(stream[0], np.ndarray) and stream[0].size > 0
    _assert_idle(engine)
