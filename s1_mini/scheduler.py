"""The scheduler: one thread that owns the model runner and the codec.

Requests wait in a bounded queue. Between decode steps the scheduler admits waiting
requests into free KV-cache slots (prefill), so new requests join the running batch at
the next step (continuous batching), and retires finished, timed-out or cancelled ones.
Audio is produced here too: for streams, a batched incremental codec step queued on the
device before each decode step and collected after it (one host round trip for both),
and for the others one batched decode when they finish. A compiled runner keeps one
decode step in flight: the frames read in an iteration are the previous step's, so the
device runs a step while the host does the rest of the iteration.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from s1_mini.codec import Codec, CodecStreams
from s1_mini.runner import ModelRunner, SequenceState
from s1_mini.sampler import SamplingParams

log = logging.getLogger(__name__)


class ErrorCode:
    INVALID = "invalid_request"  # 400/422
    NOT_FOUND = "not_found"  # 404
    OVERLOADED = "overloaded"  # 503
    TIMEOUT = "timeout"  # 504
    CANCELLED = "cancelled"
    OUT_OF_MEMORY = "out_of_memory"  # 503
    NO_AUDIO = "no_audio"  # 500
    STOPPED = "engine_stopped"  # 503
    INTERNAL = "internal_error"  # 500


class TTSError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Timings:
    queued_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    codec_s: float = 0.0
    total_s: float = 0.0
    first_audio_s: float | None = None  # streams: submit -> first chunk
    frames: int = 0
    audio_seconds: float = 0.0

    @property
    def real_time_factor(self) -> float:
        """Processing time per second of audio (below 1 is faster than real time)."""
        return self.total_s / self.audio_seconds if self.audio_seconds else 0.0

    def as_dict(self) -> dict[str, float | int | None]:
        return {**self.__dict__, "real_time_factor": self.real_time_factor}


@dataclass(eq=False)  # identity: requests live in lists (remove, in) and hold tensors
class Request:
    """A prepared request: one prompt per text piece, all generated into one audio."""

    prompts: list[Tensor]
    max_new_tokens: int
    params: SamplingParams
    generator: torch.Generator
    deadline: float  # time.monotonic()
    on_chunk: Callable[[np.ndarray], None] | None = None  # streaming: called from the scheduler thread
    prefix: tuple[Hashable, int] | None = None  # a voice's prompt part: (key, columns), every piece
    future: Future = field(default_factory=Future)
    submitted_at: float = field(default_factory=time.monotonic)
    timings: Timings = field(default_factory=Timings)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # progress, owned by the scheduler thread
    piece: int = 0
    seq: SequenceState | None = None
    codes: list[Tensor] = field(default_factory=list)  # finished pieces' codes [N, n]
    emitted: int = 0  # frames of the current piece already streamed
    codec_slot: int | None = None  # streams: the slot of its codec stream

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def streaming(self) -> bool:
        return self.on_chunk is not None


@dataclass
class Result:
    codes: np.ndarray  # [N, frames] int32
    audio: np.ndarray | None  # float32 mono; None for streams (the chunks carried it)
    timings: Timings


class Scheduler:
    def __init__(self, runner: ModelRunner, codec: Codec, streams: CodecStreams, max_queue_size: int,
                 on_oom: Callable[[], None], prefill_batch_size: int = 1) -> None:
        self.runner = runner
        self.codec = codec
        self.streams = streams
        self.max_queue_size = max_queue_size
        self.prefill_batch_size = prefill_batch_size
        self.on_oom = on_oom
        self.frame_seconds = codec.config.frame_length / codec.config.sample_rate
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []
        self._pending = 0  # submitted, not yet admitted (inbox + waiting)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.peak_batch = 0  # most sequences decoded together in one step since start

    # -- public, any thread -------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="s1-mini-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel every waiting and running request and join the thread."""
        self._stopping = True
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, request: Request) -> None:
        with self._lock:
            if self._stopping or not self.alive:
                raise TTSError(ErrorCode.STOPPED, "the engine is not running")
            busy = len(self._active) >= self.runner.max_batch_size
            if busy and self._pending >= self.max_queue_size:
                raise TTSError(ErrorCode.OVERLOADED,
                               f"overloaded: {self._pending} requests already waiting (max_queue_size)")
            self._pending += 1
            self._inbox.put(request)  # under the lock: the loop's last drain cannot miss it
        self._wake.set()

    def stats(self) -> dict[str, int]:
        return {"queue_depth": self._pending, "active": len(self._active),
                "streams": sum(r.streaming for r in self._active), "steps": self.steps,
                "peak_batch": self.peak_batch, "kv_slots_used": self.runner.max_batch_size - len(self.runner.free_slots),
                "kv_slots_total": self.runner.max_batch_size,
                "prefix_cache_hits": self.runner.prefix_cache.hits, "prefix_cache_misses": self.runner.prefix_cache.misses}

    # -- the scheduler thread -----------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopping:
                try:
                    self._iteration()
                except Exception:  # never let one bad step kill the thread
                    log.exception("scheduler iteration failed")
                    self._fail_all(ErrorCode.INTERNAL, "internal error during generation")
        finally:  # stopped, or killed by a BaseException: no request is left waiting forever
            with self._lock:
                self._stopping = True
            self._fail_all(ErrorCode.STOPPED, "the engine stopped before this request finished")
            while True:
                try:
                    self._finish(self._inbox.get_nowait(), TTSError(ErrorCode.STOPPED, "the engine stopped"))
                except queue.Empty:
                    break

    def _iteration(self) -> None:
        while True:
            try:
                self._waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        self._retire_expired()
        self._admit()
        if not self._active:
            self._wake.wait(0.05)
            self._wake.clear()
            return
        # Queued before the decode step, so that one host round trip serves both.
        chunks = self._launch_codec()
        running = [r for r in self._active if r.seq is not None and not r.seq.finished]
        if running:
            self._decode(running)
        if chunks:
            self._collect_codec(chunks)
        self._advance()

    def _decode(self, running: list[Request]) -> None:
        # A compiled runner (counter noise, no generator) keeps one step in flight: the
        # frames read here are the previous step's, while the device runs this one.
        lag = 1 if self.runner.compiled else 0
        elapsed = self._model_step(running, "generation",
                                   lambda: self.runner.decode([r.seq for r in running], lag=lag))
        if elapsed is None:
            return
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(running))
        for r in running:
            r.timings.decode_s += elapsed

    def _model_step(self, requests: list[Request], what: str, step: Callable[[], None]) -> float | None:
        """Run a prefill or decode step of ``requests``; its seconds, or None when it failed
        and the requests were ended (out of memory, or an internal error)."""
        start = time.perf_counter()
        try:
            step()
        except torch.cuda.OutOfMemoryError:
            self._out_of_memory(requests)
            return None
        except Exception as exc:
            log.exception("%s step failed", what)
            for r in requests:
                self._drop(r, TTSError(ErrorCode.INTERNAL, f"{what} failed: {exc}"))
            return None
        return time.perf_counter() - start

    def _retire_expired(self) -> None:
        now = time.monotonic()
        for r in list(self._waiting) + self._active:
            if r.cancelled.is_set():
                self._drop(r, TTSError(ErrorCode.CANCELLED, "the request was cancelled"))
            elif now > r.deadline:
                self._drop(r, TTSError(ErrorCode.TIMEOUT, "the request timed out (request_timeout_seconds)"))

    def _admit(self) -> None:
        admitted = []
        while self._waiting and self.runner.free_slots:
            r = self._waiting.popleft()
            with self._lock:
                self._pending -= 1
            r.timings.queued_s = time.monotonic() - r.submitted_at
            self._active.append(r)
            admitted.append(r)
            self.runner.acquire(self._next_piece(r))
        for i in range(0, len(admitted), self.prefill_batch_size):
            self._prefill(admitted[i : i + self.prefill_batch_size])

    def _next_piece(self, r: Request) -> SequenceState:
        """The sequence of the request's current text piece."""
        # The generator carries the request's seed; each piece gets its own counter-noise
        # seed (a compiled runner), while an eager runner draws every piece from it in turn.
        seed = (r.generator.initial_seed() + r.piece * 0x9E3779B97F4A7C15) % 2**63
        r.seq = SequenceState(r.prompts[r.piece], r.max_new_tokens, r.params, seed, r.generator, r.prefix)
        r.emitted = 0
        return r.seq

    def _prefill(self, requests: list[Request]) -> None:
        """Prefill the requests' current pieces (each holds a slot) together."""
        elapsed = self._model_step(requests, "prefill", lambda: self.runner.prefill_batch([r.seq for r in requests]))
        if elapsed is not None:
            for r in requests:
                r.timings.prefill_s += elapsed

    def _launch_codec(self) -> list[tuple[Request, int, float]]:
        """Launch a codec step when some stream is due: its first audio, a full chunk
        (``chunk_frames``), or the rest of a finished piece. The step then takes every
        stream's new frames (up to a chunk each): one step serves them all, and runs
        again only when the next one is due. Returns ``(request, frames, launch time)``."""
        k = self.streams.chunk_frames
        ready = [(r, min(r.seq.committed - r.emitted, k)) for r in self._active
                 if r.streaming and r.seq is not None and r.seq.committed > r.emitted]
        if not any(n == k or r.timings.first_audio_s is None or r.seq.finished for r, n in ready):
            return []
        for r, _ in ready:
            if r.codec_slot is None:
                r.codec_slot = self.streams.open()
        start = time.perf_counter()
        try:
            self.streams.launch([(r.codec_slot, r.seq.codes(r.emitted, r.emitted + n)) for r, n in ready])
        except torch.cuda.OutOfMemoryError:
            self._out_of_memory([r for r, _ in ready])
            return []
        return [(r, n, start) for r, n in ready]

    def _collect_codec(self, chunks: list[tuple[Request, int, float]]) -> None:
        try:
            audio = self.streams.collect()
        except torch.cuda.OutOfMemoryError:
            self._out_of_memory([r for r, _, _ in chunks if r in self._active])
            return
        now = time.perf_counter()
        for (r, n, start), samples in zip(chunks, audio):
            if r not in self._active:  # dropped meanwhile (the decode step failed)
                continue
            r.emitted += n
            r.timings.codec_s += now - start
            if r.timings.first_audio_s is None:
                r.timings.first_audio_s = time.monotonic() - r.submitted_at
            try:
                r.on_chunk(samples)
            except Exception as exc:  # a consumer that went away
                self._drop(r, TTSError(ErrorCode.CANCELLED, f"the stream consumer failed: {exc}"))

    def _advance(self) -> None:
        """Move finished pieces on (streams once their audio is out), finish completed requests."""
        done = []
        for r in [r for r in self._active if r.seq is not None and r.seq.finished
                  and not (r.streaming and r.emitted < r.seq.committed)]:
            r.codes.append(r.seq.codes().cpu())
            self.runner.release(r.seq)
            r.seq = None
            r.piece += 1
            if r.piece < len(r.prompts):  # the same slot is free again: continue without queueing
                self.runner.acquire(self._next_piece(r))
                self._prefill([r])
            else:
                done.append(r)
        if done:
            self._complete(done)

    def _complete(self, requests: list[Request]) -> None:
        codes = [torch.cat(r.codes, dim=1) for r in requests]
        audio: list[Tensor | None] = [None] * len(requests)
        offline = [i for i, r in enumerate(requests) if not r.streaming and codes[i].shape[1] > 0]
        if offline:
            start = time.perf_counter()
            try:
                decoded = self.codec.decode_batch([codes[i].to(self.codec.device) for i in offline])
            except torch.cuda.OutOfMemoryError:
                self._out_of_memory(requests)
                return
            elapsed = time.perf_counter() - start
            for i, a in zip(offline, decoded):
                audio[i] = a
                requests[i].timings.codec_s += elapsed
        for r, c, a in zip(requests, codes, audio):
            if c.shape[1] == 0:
                self._drop(r, TTSError(ErrorCode.NO_AUDIO, "the model produced no audio frames for this text"))
                continue
            r.timings.frames = c.shape[1]
            r.timings.audio_seconds = c.shape[1] * self.frame_seconds
            self._active.remove(r)
            self._finish(r, Result(c.numpy(), None if a is None else a.float().cpu().numpy(), r.timings))

    def _drop(self, r: Request, error: TTSError) -> None:
        """End a request with an error wherever it is (waiting or running)."""
        if r.seq is not None:
            self.runner.release(r.seq)
            r.seq = None
        if r in self._active:
            self._active.remove(r)
        elif r in self._waiting:
            self._waiting.remove(r)
            with self._lock:
                self._pending -= 1
        self._finish(r, error)

    def _finish(self, r: Request, outcome: Result | TTSError) -> None:
        r.timings.total_s = time.monotonic() - r.submitted_at
        if r.codec_slot is not None:
            self.streams.close(r.codec_slot)
            r.codec_slot = None
        if r.future.done():
            return
        if isinstance(outcome, TTSError):
            r.future.set_exception(outcome)
        else:
            r.future.set_result(outcome)

    def _out_of_memory(self, affected: list[Request]) -> None:
        """Fail the requests of the step that ran out of memory and free memory.

        The other requests go on: a failed step appended no frame, so the next step
        rewrites the same cache positions."""
        log.warning("CUDA out of memory: failing %d request(s) and freeing memory", len(affected))
        for r in list(affected):
            self._drop(r, TTSError(ErrorCode.OUT_OF_MEMORY, "the GPU ran out of memory; retry the request"))
        gc.collect()
        self.on_oom()

    def _fail_all(self, code: str, message: str) -> None:
        for r in list(self._active) + list(self._waiting):
            self._drop(r, TTSError(code, message))
