"""The voice registry: named reference voices (transcript + codec codes), kept in memory
and, when given a directory, on disk as one ``<id>.npz`` file per voice.

Also caches the codes of inline references (audio sent with a request rather than
registered), so that repeated requests with the same audio are encoded once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from s1_mini.codec.audio import audio_seconds
from s1_mini.prompt import Reference

logger = logging.getLogger(__name__)

# (audio, sample_rate) -> codes [N, T]; e.g. ``lambda a, sr: encode_reference_audio(codec, a, sr)``
Encoder = Callable[[bytes | np.ndarray, int | None], np.ndarray]

_ID_CHARS = re.compile(r"[A-Za-z0-9_-]+")
# OSError numbers that mean "no room" (a full disk, a quota, a file size limit) rather
# than "cannot write here at all" (read-only, permissions, a path that is not a directory).
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class VoiceError(ValueError):
    """A voice request that breaks a rule; the message names the field and the rule."""


class InvalidVoiceId(VoiceError):
    """A voice id that is not a safe, well-formed name."""


class VoiceNotFound(VoiceError):
    """No voice is registered under the id."""


class InvalidReferenceAudio(VoiceError):
    """Reference audio that cannot be read or encoded."""


# The option a too-long reference is refused by; its name in a message marks the refusal
# as "too large" for the servers (HTTP 413, see s1_mini.server.errors.from_engine).
REFERENCE_LIMIT = "max_reference_seconds"


class VoiceStorageError(VoiceError):
    """The registry's directory could not take a change; nothing was changed (the
    previous voices stay, on disk and in memory). ``full`` is True for a full disk,
    quota or file size limit (HTTP 507 Insufficient Storage), False for a directory
    that cannot be written at all (read-only, permissions)."""

    def __init__(self, directory: Path, exc: OSError) -> None:
        self.full = exc.errno in _FULL
        room = " (no space left: the disk, a quota or a file size limit is full)" if self.full else ""
        super().__init__(f"voice registry directory {directory} is not writable: {exc}{room}")


@dataclass(frozen=True)
class Voice:
    """A registered voice. ``codes`` is ``[N, T]`` int64 and read-only, so that callers
    cannot change the registry's copy. ``content_hash`` is the sha256 of the audio
    alone (see :func:`content_hash`); the text is not part of it."""

    id: str
    text: str
    codes: np.ndarray
    content_hash: str
    created_at: float

    def reference(self) -> Reference:
        return Reference(text=self.text, codes=self.codes)

    def info(self) -> dict[str, Any]:
        """A JSON-safe summary (no codes)."""
        return {
            "id": self.id,
            "text": self.text,
            "frames": int(self.codes.shape[1]),
            "content_hash": self.content_hash,
            "created_at": self.created_at,
        }


def content_hash(audio: bytes | np.ndarray) -> str:
    """sha256 hex of the audio content: the file bytes as sent, or for an array its
    dtype, shape and raw samples (so int16 and float32 arrays with equal numbers, which
    mean different sounds, differ). The sample rate is not included."""
    if isinstance(audio, bytes):
        return hashlib.sha256(audio).hexdigest()
    digest = hashlib.sha256(f"{audio.dtype.str}{audio.shape}".encode())
    digest.update(np.ascontiguousarray(audio).tobytes())
    return digest.hexdigest()


class VoiceRegistry:
    """Named voices in memory, persisted to ``directory`` when one is given.

    Ids are 1..``max_id_length`` of ``[A-Za-z0-9_-]`` and name the file ``<id>.npz``;
    a new id may not differ from a registered one only in letter case. Registering an
    existing id replaces that voice. All voices on disk are loaded at construction;
    entries that cannot be read are logged, listed in ``skipped`` as
    ``(filename, reason)`` and left alone. Thread-safe: encoding runs outside the lock,
    changes to the index and the directory under it.
    """

    def __init__(self, directory: str | Path | None, encode: Encoder, max_cached: int = 256,
                 max_voices: int = 10_000, max_id_length: int = 64, max_text_length: int = 2000,
                 max_reference_seconds: float | None = None):
        for name, value, least in [("max_cached", max_cached, 0), ("max_voices", max_voices, 1),
                                   ("max_id_length", max_id_length, 1),
                                   ("max_text_length", max_text_length, 1)]:
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name}: must be an integer >= {least}, got {value!r}")
        if max_reference_seconds is not None and (isinstance(max_reference_seconds, bool)
                                                  or not isinstance(max_reference_seconds, (int, float))
                                                  or not 0 < max_reference_seconds < math.inf):
            raise ValueError(f"max_reference_seconds: must be null or a finite number > 0, "
                             f"got {max_reference_seconds!r}")
        self._encode = encode
        # None: no limit (an encoder that is not the codec may take anything); the engine
        # always sets EngineConfig.max_reference_seconds
        self.max_reference_seconds = max_reference_seconds
        self.max_cached = max_cached
        self.max_voices = max_voices
        self.max_id_length = max_id_length
        self.max_text_length = max_text_length
        self._lock = threading.Lock()
        self._voices: dict[str, Voice] = {}
        # inline-reference codes by (content hash, sample rate), least recently used first
        self._inline: OrderedDict[tuple[str, int | None], np.ndarray] = OrderedDict()
        self.skipped: list[tuple[str, str]] = []
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise VoiceError(f"voice registry directory {self.directory} cannot be created: {exc}") from exc
            self._load_all()

    def __len__(self) -> int:
        with self._lock:
            return len(self._voices)

    def register(self, voice_id: str, audio: bytes | np.ndarray, text: str,
                 sample_rate: int | None = None) -> Voice:
        """Encode ``audio`` and store it as ``voice_id`` (replacing any voice of that id)."""
        self._check_id(voice_id)
        self._check_text(text)
        audio, sample_rate = self._check_audio(audio, sample_rate)
        with self._lock:
            self._check_room(voice_id)  # fail before the costly encode
        codes = self._encode_codes(audio, sample_rate)
        voice = Voice(voice_id, text, codes, content_hash(audio), time.time())
        with self._lock:
            self._check_room(voice_id)  # again: another thread may have filled it meanwhile
            if self.directory is not None:
                self._write(voice)
            self._voices[voice_id] = voice
        return voice

    def get(self, voice_id: str) -> Voice:
        self._check_id(voice_id)
        with self._lock:
            voice = self._voices.get(voice_id)
        if voice is None:
            raise VoiceNotFound(f"voice_id: no voice {voice_id!r} is registered")
        return voice

    def list(self) -> list[Voice]:
        """All voices, sorted by id."""
        with self._lock:
            return [self._voices[k] for k in sorted(self._voices)]

    def delete(self, voice_id: str) -> None:
        self._check_id(voice_id)
        with self._lock:
            if voice_id not in self._voices:
                raise VoiceNotFound(f"voice_id: no voice {voice_id!r} is registered")
            if self.directory is not None:
                try:
                    (self.directory / f"{voice_id}.npz").unlink(missing_ok=True)
                except OSError as exc:
                    raise VoiceStorageError(self.directory, exc) from exc
            del self._voices[voice_id]

    def encode_inline(self, audio: bytes | np.ndarray, text: str, sample_rate: int | None = None) -> Reference:
        """The reference for audio sent with a request, encoded once per distinct audio.

        Codes are cached by (content hash, sample rate), at most ``max_cached`` entries,
        least recently used evicted first. Only codes are cached: the returned reference
        always carries this call's ``text``. This deliberately differs from fish-speech,
        which reuses the text cached with the first request for the same audio. Two
        concurrent first requests for the same audio may both encode it.
        """
        self._check_text(text)
        audio, sample_rate = self._check_audio(audio, sample_rate)
        key = (content_hash(audio), sample_rate)
        with self._lock:
            codes = self._inline.get(key)
            if codes is not None:
                self._inline.move_to_end(key)
        if codes is None:
            codes = self._encode_codes(audio, sample_rate)
            with self._lock:
                self._inline[key] = codes
                while len(self._inline) > self.max_cached:
                    self._inline.popitem(last=False)
        return Reference(text=text, codes=codes)

    # ------------------------------------------------------------------ rules

    def _check_id(self, voice_id: object) -> None:
        # The id becomes a file name, so anything beyond plain ASCII letters, digits,
        # '_' and '-' (dots, separators, NUL, spaces, look-alike unicode) is refused.
        if not isinstance(voice_id, str):
            raise InvalidVoiceId(f"voice_id: must be a string, got {type(voice_id).__name__}")
        if not (0 < len(voice_id) <= self.max_id_length and _ID_CHARS.fullmatch(voice_id)):
            raise InvalidVoiceId(f"voice_id: must match [A-Za-z0-9_-]{{1,{self.max_id_length}}}, "
                                 f"got {_shorten(voice_id)}")

    def _check_text(self, text: object) -> None:
        if not isinstance(text, str):
            raise VoiceError(f"text: must be a string, got {type(text).__name__}")
        if not text.strip():
            raise VoiceError("text: must not be empty or only whitespace")
        if len(text) > self.max_text_length:
            raise VoiceError(f"text: must be at most {self.max_text_length} characters, got {len(text)}")

    def _check_audio(self, audio: object, sample_rate: object) -> tuple[bytes | np.ndarray, int | None]:
        audio, sample_rate = _check_audio(audio, sample_rate)
        limit = self.max_reference_seconds
        if limit is None:
            return audio, sample_rate
        # From the header (or the array's length), before anything is decoded: the codec
        # encoder's memory grows with the square of the length, and a file of a few KB
        # can declare hours of audio.
        try:
            seconds = audio_seconds(audio, sample_rate)
        except ValueError as exc:  # AudioError: a file libsndfile cannot open
            raise InvalidReferenceAudio(f"audio: cannot be used as a reference: {exc}") from exc
        if seconds > limit:
            got = "a file that does not state its length" if seconds == math.inf else f"{_seconds(seconds)} s"
            raise InvalidReferenceAudio(f"audio: must be at most {limit:g} s ({REFERENCE_LIMIT}), got {got}")
        return audio, sample_rate

    def _check_room(self, voice_id: str) -> None:
        if voice_id in self._voices:
            return
        if len(self._voices) >= self.max_voices:
            raise VoiceError(f"voice_id: the registry is full (max_voices {self.max_voices}); "
                             "delete a voice or replace an existing id")
        # On a case-insensitive file system (macOS, Windows) 'Alice.npz' and 'alice.npz'
        # are one file, so two such voices would silently become one after a restart.
        folded = voice_id.casefold()
        for other in self._voices:
            if other.casefold() == folded:
                raise InvalidVoiceId(f"voice_id: {voice_id!r} differs only in letter case from the "
                                     f"registered voice {other!r}; ids must differ in more than case")

    def _encode_codes(self, audio: bytes | np.ndarray, sample_rate: int | None) -> np.ndarray:
        try:
            codes = np.asarray(self._encode(audio, sample_rate))
        except ValueError as exc:  # AudioError and the encoder's other input errors
            raise InvalidReferenceAudio(f"audio: cannot be used as a reference: {exc}") from exc
        if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
            raise TypeError(f"the encoder must return integer codes [N, T], got {codes.dtype} {list(codes.shape)}")
        if codes.shape[1] == 0:
            raise InvalidReferenceAudio("audio: too short, it encodes to no frames")
        return _frozen(codes)

    # ------------------------------------------------------------------ disk

    def _write(self, voice: Voice) -> None:
        """Write ``<id>.npz`` atomically: a temporary file in the same directory, fsync,
        then rename over the old file, so a crash leaves the old voice or the new one."""
        assert self.directory is not None
        meta = json.dumps({"text": voice.text, "content_hash": voice.content_hash,
                           "created_at": voice.created_at})
        tmp_name = None
        try:
            fd, tmp_name = tempfile.mkstemp(dir=self.directory, prefix=f".{voice.id}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.savez(f, codes=voice.codes, meta=np.array(meta))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, self.directory / f"{voice.id}.npz")
        except BaseException as exc:
            if tmp_name is not None:
                with contextlib.suppress(OSError):  # best effort: the first error is the one to report
                    os.unlink(tmp_name)
            if isinstance(exc, OSError):
                raise VoiceStorageError(self.directory, exc) from exc
            raise

    def _load_all(self) -> None:
        assert self.directory is not None
        for path in sorted(self.directory.glob("*.npz")):
            try:
                voice = self._read(path)
            # a bad file must never stop start-up, whatever numpy, zipfile or json raise
            except Exception as exc:
                self._skip(path.name, f"{type(exc).__name__}: {exc}")
                continue
            if len(self._voices) >= self.max_voices:
                self._skip(path.name, f"max_voices ({self.max_voices}) reached")
                continue
            self._voices[voice.id] = voice

    def _read(self, path: Path) -> Voice:
        voice_id = path.stem
        self._check_id(voice_id)
        with np.load(path, allow_pickle=False) as data:
            codes = data["codes"]
            meta = json.loads(str(data["meta"]))
        if not isinstance(meta, dict):
            raise ValueError("meta: must be a JSON object")
        if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer) or 0 in codes.shape:
            raise ValueError(f"codes: must be non-empty integers [N, T], got {codes.dtype} {list(codes.shape)}")
        text, digest, created_at = meta.get("text"), meta.get("content_hash"), meta.get("created_at")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("meta.text: must be a non-empty string")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError("meta.content_hash: must be 64 hex digits")
        if not isinstance(created_at, (int, float)) or not math.isfinite(created_at):
            raise ValueError("meta.created_at: must be a finite number")
        return Voice(voice_id, text, _frozen(codes), digest, float(created_at))

    def _skip(self, name: str, reason: str) -> None:
        logger.warning("voice registry: skipping %s: %s", name, reason)
        self.skipped.append((name, reason))


def _check_audio(audio: object, sample_rate: object) -> tuple[bytes | np.ndarray, int | None]:
    if isinstance(audio, bytes):
        if not audio:
            raise InvalidReferenceAudio("audio: must not be empty")
        if sample_rate is not None:
            raise InvalidReferenceAudio("sample_rate: only for arrays of samples; an audio file carries its own rate")
        return audio, None
    if not isinstance(audio, np.ndarray):
        raise InvalidReferenceAudio(f"audio: must be the bytes of an audio file or an array of samples, "
                                    f"got {type(audio).__name__}")
    if audio.size == 0:
        raise InvalidReferenceAudio("audio: must not be empty")
    if audio.dtype.hasobject:
        raise InvalidReferenceAudio(f"audio: must be numeric samples, got {audio.dtype}")
    if audio.ndim not in (1, 2):
        raise InvalidReferenceAudio(f"audio: must be samples [L] or [L, channels], got shape {list(audio.shape)}")
    if sample_rate is None:
        return audio, None
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise InvalidReferenceAudio(f"sample_rate: must be a positive integer, got {sample_rate!r}")
    return audio, int(sample_rate)


def _frozen(codes: np.ndarray) -> np.ndarray:
    array = np.array(codes, dtype=np.int64)  # always a copy the registry owns
    array.flags.writeable = False
    return array


def _seconds(value: float) -> str:
    """A measured duration for a message: at most two decimals, no trailing zeros (1, 61.25)."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _shorten(value: str, limit: int = 80) -> str:
    # ids arrive from requests; keep a huge one from flooding the error message
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}… ({len(value)} characters)"
