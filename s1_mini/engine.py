"""ProductionTTSEngine: text in, audio out, for many callers at once.

The request path: ``generate`` (any thread or asyncio task) validates the request and
builds its prompts here, then the scheduler thread runs it (continuous batching over
the model runner, sampler and codec) and hands back codes and audio.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import numpy as np
import torch

from s1_mini.checkpoint import CheckpointError
from s1_mini.codec import Codec, CodecStreams, encode_reference_audio
from s1_mini.compilation import compile_or_eager, resolve_backend, without_cudagraphs
from s1_mini.config import MAX_TIMEOUT_S, EngineConfig, check_seed
from s1_mini.generation import GenerationError, resolve_max_new_tokens
from s1_mini.model import DualARTransformer, load_text2semantic
from s1_mini.prompt import PromptError, Reference, build_prompt, target_length
from s1_mini.runner import ModelRunner
from s1_mini.sampler import SamplingParams
from s1_mini.scheduler import ErrorCode, Request, Result, Scheduler, Timings, TTSError
from s1_mini.text import split_text
from s1_mini.tokenizer import Tokenizer
from s1_mini.utils import get_vram_info
from s1_mini.voices import InvalidReferenceAudio, Voice, VoiceError, VoiceNotFound, VoiceRegistry, content_hash

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# The warm-up request compiles the decode step (minutes with inductor): it is not held
# to request_timeout_seconds.
WARMUP_TIMEOUT_S = 1800.0
_END = object()  # end-of-stream marker in chunk queues


@dataclass
class TTSResponse:
    success: bool
    audio: tuple[int, np.ndarray] | None = None  # (sample_rate, float32 mono)
    error: str | None = None
    error_code: str | None = None
    codes: np.ndarray | None = None  # [num_codebooks, frames] int32
    timings: Timings = field(default_factory=Timings)


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available: running on the CPU", name)
        return torch.device("cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        log.warning("device mps requested but MPS is not available: running on the CPU")
        return torch.device("cpu")
    return device


class ModelManager:
    """Loads the text-to-semantic model, tokenizer and codec once and keeps them."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = DTYPES[config.precision]
        self.model: DualARTransformer | None = None
        self.tokenizer: Tokenizer | None = None
        self.codec: Codec | None = None
        self.compile_backend: str | None = None

    @property
    def loaded(self) -> bool:
        return self.model is not None and self.codec is not None

    def load(self) -> None:
        path = Path(self.config.checkpoint_path)
        self.model, self.tokenizer = load_text2semantic(path, self.device, self.dtype)
        self.codec = Codec.from_checkpoint(path, self.device).set_precision(self.dtype)
        n, semantic = self.codec.config.num_codebooks, self.codec.config.semantic_codebook_size
        c = self.model.config
        if c.num_codebooks != n or c.codebook_size < semantic:
            raise CheckpointError(
                f"{path}: the model (num_codebooks {c.num_codebooks}, codebook_size {c.codebook_size}) does not "
                f"fit the codec ({n} codebooks, semantic codebook of {semantic})")
        if self.config.compile_model:
            self.compile_backend = resolve_backend(self.config.compile_backend, self.device)

    def unload(self) -> None:
        self.model = self.tokenizer = self.codec = None
        self.clear_cache(force=True)

    def clear_cache(self, force: bool = False) -> None:
        """Return cached GPU memory to the driver. Without ``force`` only when the config
        allows it and free memory is below ``vram_clear_threshold_gb``; the engine calls
        it with ``force`` only after an out-of-memory error, never per request."""
        if not torch.cuda.is_available():
            return
        if not force:
            vram = get_vram_info(self.device)
            if self.config.vram_clear_on_oom_only or vram["total_gb"] - vram["used_gb"] > self.config.vram_clear_threshold_gb:
                return
        gc.collect()
        torch.cuda.empty_cache()


class ProductionTTSEngine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig.from_env()
        self.model_manager = ModelManager(self.config)
        self.voices: VoiceRegistry | None = None
        self._scheduler: Scheduler | None = None
        self._runner: ModelRunner | None = None
        self.ready = False
        self.started_at: float | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> "ProductionTTSEngine":
        if self._scheduler is not None:
            return self
        mm = self.model_manager
        mm.load()
        c = self.config
        max_seq_len = min(c.max_seq_len or mm.model.config.max_seq_len, mm.model.config.max_seq_len)
        self._runner = ModelRunner(mm.model, mm.tokenizer.im_end_id, self._batch_slots(max_seq_len), max_seq_len,
                                   prefix_cache_size=c.prefix_cache_size, prefill_batch_size=c.prefill_batch_size)
        # Up to one codec stream per sequence slot: every active request holds one.
        streams = CodecStreams(mm.codec, self._runner.max_batch_size, c.stream_chunk_frames)
        if mm.compile_backend not in (None, "eager"):
            if c.compile_cache_dir:  # inductor reads its cache location from the environment
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = c.compile_cache_dir
            mode = without_cudagraphs(c.compile_mode)
            self._runner.compile(lambda fn, dynamic: compile_or_eager(
                fn, mm.compile_backend, mode, fullgraph=True, dynamic=dynamic))
            streams.compile(lambda fn: compile_or_eager(fn, mm.compile_backend, mode, fullgraph=True, dynamic=True))
        self.voices = VoiceRegistry(c.voice_registry_dir, self._encode_reference,
                                    max_cached=c.reference_cache_size, max_voices=c.voice_registry_size,
                                    max_reference_seconds=c.max_reference_seconds)
        self._scheduler = Scheduler(self._runner, mm.codec, streams, c.max_queue_size,
                                    on_oom=lambda: mm.clear_cache(force=True),
                                    prefill_batch_size=c.prefill_batch_size)
        self._scheduler.start()
        if c.warmup:
            self._warm_up()
        self.ready = True
        self.started_at = time.time()
        return self

    def _warm_up(self) -> None:
        """One whole-file request and one stream, so that compilation and the codec's
        offline and incremental paths are done before the engine reports ready."""
        response = self.generate("Hello world.", max_new_tokens=8, seed=0, timeout=WARMUP_TIMEOUT_S)
        try:
            if not response.success and response.error_code != ErrorCode.NO_AUDIO:
                raise TTSError(response.error_code or ErrorCode.INTERNAL, response.error or "failed")
            for _ in self.generate_stream("Hello world.", max_new_tokens=8, seed=0, timeout=WARMUP_TIMEOUT_S):
                pass
        except TTSError as exc:
            if exc.code != ErrorCode.NO_AUDIO:
                self.stop()
                raise RuntimeError(f"warm-up failed: {exc.message}") from None

    def stop(self) -> None:
        """Cancel waiting and running requests (they get an error), free the models."""
        self.ready = False
        if self._scheduler is not None:
            self._scheduler.stop()
        self._scheduler = self._runner = None
        self.model_manager.unload()

    def __enter__(self) -> "ProductionTTSEngine":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _batch_slots(self, max_seq_len: int) -> int:
        """max_batch_size, lowered to fit the KV-cache budget if one is set."""
        c = self.config
        if not c.kv_cache_gb:
            return c.max_batch_size
        m = self.model_manager.model
        itemsize = torch.finfo(self.model_manager.dtype).bits // 8
        s, f = m.slow_shape, m.fast_shape
        per_slot = 2 * itemsize * (m.config.n_layer * s.n_kv_head * s.head_dim * max_seq_len
                                   + m.config.n_fast_layer * f.n_kv_head * f.head_dim * m.config.num_codebooks)
        slots = int(c.kv_cache_gb * 1024**3 // per_slot)
        if slots < 1:
            raise ValueError(f"kv_cache_gb: {c.kv_cache_gb} GB holds no sequence of {max_seq_len} positions")
        return min(c.max_batch_size, slots)

    @property
    def sample_rate(self) -> int:
        return self._codec().config.sample_rate

    def _codec(self) -> Codec:
        if self.model_manager.codec is None:
            raise TTSError(ErrorCode.STOPPED, "the engine is not started")
        return self.model_manager.codec

    def _encode_reference(self, audio: bytes | np.ndarray, sample_rate: int | None) -> np.ndarray:
        return encode_reference_audio(self._codec(), audio, sample_rate)

    # -- requests ----------------------------------------------------------------

    def _prepare(self, text: Any, temperature: float | None, top_p: float | None,
                 repetition_penalty: float | None, max_new_tokens: int | None, seed: int | None,
                 reference_id: str | None, reference_audio: Any, reference_text: str | None,
                 timeout: float | None, references: Any = None, on_chunk: Any = None) -> Request:
        """Validate a request and build its prompts (caller's thread); raise TTSError."""
        c, mm = self.config, self.model_manager
        if self._scheduler is None or mm.model is None:
            raise TTSError(ErrorCode.STOPPED, "the engine is not started")
        if not isinstance(text, str) or not text.strip():
            raise TTSError(ErrorCode.INVALID, "text: must be a non-empty string")
        if len(text) > c.max_text_length:
            raise TTSError(ErrorCode.INVALID, f"text: must be at most {c.max_text_length} characters, got {len(text)}")
        params = SamplingParams(
            c.default_temperature if temperature is None else temperature,
            c.default_top_p if top_p is None else top_p,
            c.default_repetition_penalty if repetition_penalty is None else repetition_penalty)
        n = c.max_new_tokens if max_new_tokens is None else max_new_tokens
        # NaN passes "timeout <= 0" and inf overflows the waiting thread's timeout: both refused
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 < timeout <= MAX_TIMEOUT_S):
            raise TTSError(ErrorCode.INVALID, f"timeout: must be a number of seconds with "
                                              f"0 < timeout <= {MAX_TIMEOUT_S:g}, got {timeout!r}")
        try:
            if seed is not None:
                check_seed(seed)
            params.validate()
            if isinstance(n, bool) or not isinstance(n, int):
                raise ValueError(f"max_new_tokens: must be an integer, got {n!r}")
            references = self._references(reference_id, reference_audio, reference_text, references)
            model = mm.model
            pieces = split_text(text, c.text_piece_chars)
            prompts = [build_prompt(mm.tokenizer, piece, references, model.config.num_codebooks,
                                    model.config.codebook_size) for piece in pieces]
            prefix = None
            if references:  # the voice's prompt part (the same in every piece) can come from the prefix cache
                columns = prompts[0].shape[1] - target_length(mm.tokenizer, pieces[0])
                # keyed by its content, so a registered voice and the same voice sent inline share
                # an entry, and a voice registered again with other audio never meets its old one
                prefix = (content_hash(prompts[0][:, :columns].numpy()), columns)
            limit = self._runner.max_seq_len
            n = min(resolve_max_new_tokens(p.shape[1], n, limit) for p in prompts)
        except VoiceNotFound as exc:
            raise TTSError(ErrorCode.NOT_FOUND, str(exc)) from None
        except (VoiceError, PromptError, GenerationError, ValueError) as exc:
            raise TTSError(ErrorCode.INVALID, str(exc)) from None
        generator = torch.Generator(mm.device).manual_seed(secrets.randbits(63) if seed is None else seed)
        deadline = time.monotonic() + (c.request_timeout_seconds if timeout is None else timeout)
        return Request(prompts, n, params, generator, deadline, on_chunk, prefix=prefix)

    def _references(self, reference_id: str | None, reference_audio: Any, reference_text: str | None,
                    references: Any = None) -> list[Reference]:
        """A registered voice, or inline references: one (``reference_audio`` +
        ``reference_text``) or several (``references``: (audio, text) pairs, each one
        turn of the prompt, in order)."""
        given = [name for name, value in (("reference_id", reference_id), ("reference_audio", reference_audio),
                                          ("references", references)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"{given[0]}: give only one of reference_id, reference_audio, references")
        if references is not None and not isinstance(references, (list, tuple)):
            # a str or dict would otherwise be taken apart character by character or key by key
            raise ValueError(f"references: must be a list of (audio, text) pairs, got {type(references).__name__}")
        if reference_id is not None:
            return [self.voices.get(reference_id).reference()]
        if reference_audio is not None:
            references = [(reference_audio, reference_text)]
        elif reference_text is not None:
            raise ValueError("reference_text: only meaningful with reference_audio")
        out = []
        for i, item in enumerate(references or []):
            field = "reference_audio" if reference_audio is not None else f"references[{i}]"
            # the registry names its own parameters (audio, text, sample_rate): the
            # request's names for them
            names = ({"audio": "reference_audio", "sample_rate": "reference_audio", "text": "reference_text"}
                     if reference_audio is not None else
                     {"audio": f"{field}.audio", "sample_rate": f"{field}.audio", "text": f"{field}.text"})
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"{field}: must be an (audio, text) pair")
            audio, text = item
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{names['text']}: required (the transcript of the reference audio)")
            try:
                out.append(self.voices.encode_inline(audio, text))
            except (TypeError, ValueError) as exc:  # VoiceError and the encoder's own input errors
                name, sep, rule = str(exc).partition(": ")
                message = f"{names[name]}: {rule}" if sep and name in names else f"{names['audio']}: {exc}"
                raise InvalidReferenceAudio(message) from None
        return out

    def _response(self, outcome: Result | BaseException, request: Request | None) -> TTSResponse:
        timings = request.timings if request is not None else Timings()
        if isinstance(outcome, Result):
            audio = None if outcome.audio is None else (self.sample_rate, outcome.audio)
            return TTSResponse(True, audio, codes=outcome.codes, timings=outcome.timings)
        if isinstance(outcome, TTSError):
            return TTSResponse(False, error=outcome.message, error_code=outcome.code, timings=timings)
        log.error("request failed", exc_info=outcome)
        return TTSResponse(False, error=f"internal error: {outcome}", error_code=ErrorCode.INTERNAL, timings=timings)

    def submit(self, text: str, **kwargs: Any) -> Request:
        """Queue a request and return it (``request.future`` resolves to a Result)."""
        request = self._prepare(text, **_request_kwargs(kwargs))
        self._scheduler.submit(request)
        return request

    def generate(self, text: str, *, temperature: float | None = None, top_p: float | None = None,
                 repetition_penalty: float | None = None, max_new_tokens: int | None = None,
                 seed: int | None = None, reference_id: str | None = None, reference_audio: Any = None,
                 reference_text: str | None = None, references: Any = None,
                 timeout: float | None = None) -> TTSResponse:
        """Synthesize ``text``; never raises for bad input (see ``response.error``)."""
        try:
            request = self.submit(text, temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
                                  max_new_tokens=max_new_tokens, seed=seed, reference_id=reference_id,
                                  reference_audio=reference_audio, reference_text=reference_text,
                                  references=references, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 -- every failure becomes a response
            return self._response(exc, None)
        return self.wait(request)

    def wait(self, request: Request) -> TTSResponse:
        """Block until a submitted request ends; its outcome as a response."""
        try:
            # The scheduler enforces the deadline; the margin only guards against a stuck thread.
            outcome = request.future.result(timeout=request.deadline - time.monotonic() + 30)
        except BaseException as exc:  # noqa: BLE001 -- every failure becomes a response
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            if not request.future.done():
                request.cancel()
                exc = TTSError(ErrorCode.TIMEOUT, "the request did not finish in time")
            return self._response(exc, request)
        return self._response(outcome, request)

    async def agenerate(self, text: str, **kwargs: Any) -> TTSResponse:
        """asyncio variant of :meth:`generate`; cancelling the task cancels the request."""
        request = None
        try:
            # Preparing tokenizes and may encode reference audio: keep it off the event loop.
            request = await asyncio.to_thread(self.submit, text, **kwargs)
            outcome = await asyncio.wrap_future(request.future)
        except asyncio.CancelledError:
            if request is not None:
                request.cancel()
            raise
        except Exception as exc:  # noqa: BLE001
            return self._response(exc, request)
        return self._response(outcome, request)

    def generate_stream(self, text: str, **kwargs: Any) -> Iterator[np.ndarray]:
        """Yield float32 audio chunks as frames are generated; raises TTSError on
        failure. Closing the iterator early cancels the request and frees its slot."""
        chunks: SimpleQueue = SimpleQueue()
        request = self._prepare(text, **_request_kwargs(kwargs), on_chunk=chunks.put)
        request.future.add_done_callback(lambda _: chunks.put(_END))
        self._scheduler.submit(request)
        try:
            while (chunk := chunks.get()) is not _END:
                yield chunk
            request.future.result()  # raises the request's error, if any
        finally:
            request.cancel()

    async def agenerate_stream(self, text: str, **kwargs: Any) -> AsyncIterator[np.ndarray]:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(chunks.put_nowait, item)

        request = await asyncio.to_thread(self._prepare, text, **_request_kwargs(kwargs), on_chunk=put)
        request.future.add_done_callback(lambda _: put(_END))
        self._scheduler.submit(request)
        try:
            while (chunk := await chunks.get()) is not _END:
                yield chunk
            request.future.result()
        finally:
            request.cancel()

    # -- voices ------------------------------------------------------------------

    def register_voice(self, voice_id: str, audio: bytes | np.ndarray, text: str,
                       sample_rate: int | None = None) -> Voice:
        return self.voices.register(voice_id, audio, text, sample_rate)

    # -- health ------------------------------------------------------------------

    def health_check(self) -> dict[str, Any]:
        mm = self.model_manager
        vram = get_vram_info(mm.device) if mm.device.type == "cuda" else get_vram_info(None)
        scheduler = self._scheduler
        return {
            "healthy": bool(self.ready and scheduler is not None and scheduler.alive),
            "models_loaded": mm.loaded,
            "device": str(mm.device),
            "precision": self.config.precision,
            "compile_backend": mm.compile_backend or "disabled",
            "vram": {"used_gb": vram["used_gb"], "total_gb": vram["total_gb"]},
            **(scheduler.stats() if scheduler is not None else {}),
        }


def _request_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    names = ("temperature", "top_p", "repetition_penalty", "max_new_tokens", "seed", "reference_id",
             "reference_audio", "reference_text", "references", "timeout")
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise TTSError(ErrorCode.INVALID, f"{unknown[0]}: unknown request field (allowed: {', '.join(names)})")
    return {name: kwargs.get(name) for name in names}
