"""Audio input: any file soundfile reads (WAV, FLAC, OGG, MP3, …), bytes or an array → mono 44.1 kHz."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile
import soxr
import torch

if TYPE_CHECKING:
    from .model import Codec

SAMPLE_RATE = 44100
# libsndfile's frame count for a stream that does not state its length (a FLAC whose
# header leaves the total at 0): reading it would try to allocate that many samples.
UNKNOWN_FRAMES = 2**63 - 1

AudioInput = str | Path | bytes | np.ndarray | torch.Tensor


class AudioError(ValueError):
    """Audio that cannot be read or used, with the reason."""


def load_audio(audio: AudioInput, sample_rate: int | None = None) -> np.ndarray:
    """Mono float32 samples at 44.1 kHz.

    ``audio`` is a file path, the bytes of a file, or an array of samples. Channels are
    averaged. Arrays are ``[samples]`` or ``[samples, channels]`` (soundfile's layout) at
    ``sample_rate`` (default 44100); integer arrays are scaled to [−1, 1]. Files carry
    their own rate, so ``sample_rate`` must not be given for them. Resampling uses soxr
    (the reference's callers use torchaudio or librosa, so codes of resampled audio can
    differ from theirs slightly; 44.1 kHz input is used as is).
    """
    if isinstance(audio, (str, Path, bytes)):
        if sample_rate is not None:
            raise AudioError("sample_rate is only for arrays; a file carries its own rate")
        try:
            samples, sample_rate = soundfile.read(_source(audio), dtype="float32", always_2d=True)
        except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError, ...
            raise _unreadable(audio, exc) from exc
    else:
        samples = _array(audio)
        sample_rate = SAMPLE_RATE if sample_rate is None else sample_rate
    if sample_rate <= 0:
        raise AudioError(f"invalid sample rate {sample_rate}")
    # NaN or inf would pass through resampling and the codec as meaningless codes
    bad = samples.size - int(np.isfinite(samples).sum())
    if bad:
        raise AudioError(f"samples must be finite numbers, got {bad} NaN or infinite of {samples.size}")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if sample_rate != SAMPLE_RATE and mono.size:
        mono = soxr.resample(mono, sample_rate, SAMPLE_RATE)
    return np.ascontiguousarray(mono, dtype=np.float32)


def audio_seconds(audio: AudioInput, sample_rate: int | None = None) -> float:
    """The duration of ``audio`` in seconds, without decoding it: a file's header
    (frames / rate), or the length of an array ``[L]`` or ``[L, channels]`` at
    ``sample_rate`` (default 44100), so that a length limit can refuse a long reference
    before it costs memory and time. A file that does not state its length counts as
    infinitely long."""
    if isinstance(audio, (str, Path, bytes)):
        try:
            info = soundfile.info(_source(audio))
        except Exception as exc:  # as in load_audio: whatever libsndfile or the file object raise
            raise _unreadable(audio, exc) from exc
        if info.frames >= UNKNOWN_FRAMES:
            return math.inf
        return info.frames / info.samplerate
    rate = SAMPLE_RATE if sample_rate is None else sample_rate
    if rate <= 0:
        raise AudioError(f"invalid sample rate {rate}")
    if audio.ndim not in (1, 2):
        raise AudioError(f"expected samples [L] or [L, channels], got shape {list(audio.shape)}")
    return audio.shape[0] / rate


def encode_reference_audio(codec: "Codec", audio: AudioInput, sample_rate: int | None = None) -> np.ndarray:
    """File, bytes or array → codes ``[N, T]`` int64 (the codec's own input convention)."""
    samples = load_audio(audio, sample_rate)
    if samples.size == 0:
        raise AudioError("the audio is empty")
    return codec.encode(torch.from_numpy(samples)[None])[0].cpu().numpy()


def _source(audio: str | Path | bytes) -> str | Path | io.BytesIO:
    return io.BytesIO(audio) if isinstance(audio, bytes) else audio


def _unreadable(audio: str | Path | bytes, exc: Exception) -> AudioError:
    # libsndfile's own message names its file object (``<_io.BytesIO object at 0x…>``,
    # a memory address for a client to see); its error string alone says what is wrong.
    reason = exc.error_string if isinstance(exc, soundfile.LibsndfileError) else str(exc)
    name = "audio bytes" if isinstance(audio, bytes) else str(audio)
    return AudioError(f"cannot read {name}: {reason}")


def _array(audio: np.ndarray | torch.Tensor) -> np.ndarray:
    array = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise AudioError(f"expected samples [L] or [L, channels], got shape {list(array.shape)}")
    if np.issubdtype(array.dtype, np.signedinteger):
        return array.astype(np.float32) / float(2 ** (8 * array.dtype.itemsize - 1))
    if not np.issubdtype(array.dtype, np.floating):
        raise AudioError(f"expected float or signed integer samples, got {array.dtype}")
    return array.astype(np.float32, copy=False)
