"""Audio containers for responses: whole files through soundfile, and the two streamable
forms (WAV with an open-ended header, raw 16-bit PCM).

Which containers exist depends on the libsndfile that soundfile loads, so the supported
set is probed once at import time; a format it cannot write is refused by the request
schemas (422 naming the field) rather than failing after generation.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
import soundfile as sf


@dataclass(frozen=True)
class AudioFormat:
    name: str
    media_type: str
    sf_format: str | None  # soundfile container; None for raw PCM
    sf_subtype: str | None = None
    sample_rates: tuple[int, ...] = ()  # () = any rate; else the encoder's allowed rates
    streamable: bool = False  # can be sent incrementally as frames are decoded


# Every format a request may name. ``aac`` is in OpenAI's list; libsndfile cannot write it.
KNOWN: dict[str, AudioFormat] = {f.name: f for f in [
    AudioFormat("wav", "audio/wav", "WAV", "PCM_16", streamable=True),
    AudioFormat("pcm", "audio/pcm", None, streamable=True),
    AudioFormat("flac", "audio/flac", "FLAC", "PCM_16"),
    AudioFormat("mp3", "audio/mpeg", "MP3", "MPEG_LAYER_III"),
    AudioFormat("opus", "audio/ogg", "OGG", "OPUS", sample_rates=(48000, 24000, 16000, 12000, 8000)),
    AudioFormat("aac", "audio/aac", None),
]}


def _writable(fmt: AudioFormat) -> bool:
    if fmt.name == "pcm":
        return True
    if fmt.sf_format is None:
        return False
    try:
        if fmt.sf_format not in sf.available_formats():
            return False
        if fmt.sf_subtype and fmt.sf_subtype not in sf.available_subtypes(fmt.sf_format):
            return False
        rate = fmt.sample_rates[0] if fmt.sample_rates else 44100
        buffer = io.BytesIO()
        sf.write(buffer, np.zeros(rate // 50, dtype=np.float32), rate, format=fmt.sf_format, subtype=fmt.sf_subtype)
        return len(buffer.getvalue()) > 0
    except Exception:  # noqa: BLE001 -- any failure means "not available here"
        return False


SUPPORTED: tuple[str, ...] = tuple(name for name, fmt in KNOWN.items() if _writable(fmt))
STREAMABLE: tuple[str, ...] = tuple(name for name in SUPPORTED if KNOWN[name].streamable)
PCM_FORMAT = "s16le"  # what raw PCM bodies carry: signed 16-bit little-endian mono


class UnsupportedFormat(ValueError):
    pass


def check_format(name: str, field: str = "format", streaming: bool = False) -> AudioFormat:
    allowed = STREAMABLE if streaming else SUPPORTED
    if name not in allowed:
        what = "streaming responses" if streaming else "this server's audio library (libsndfile)"
        raise UnsupportedFormat(f"{field}: must be one of {', '.join(allowed)} for {what}, got {name!r}")
    return KNOWN[name]


def output_rate(fmt: AudioFormat, rate: int) -> int:
    """The rate ``fmt`` is written at: ``rate`` unless the encoder cannot take it
    (Opus: 48 kHz and its divisors only), then the encoder's first rate."""
    if not fmt.sample_rates or rate in fmt.sample_rates:
        return rate
    return fmt.sample_rates[0]


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target or audio.size == 0:
        return audio
    import soxr

    return soxr.resample(audio, rate, target).astype(np.float32, copy=False)


def to_int16(audio: np.ndarray) -> bytes:
    """Float samples to little-endian int16, clipped (fish-speech wraps +1.0 to -32768;
    this does not)."""
    clipped = np.clip(np.nan_to_num(audio, nan=0.0), -1.0, 32767 / 32768)
    return (clipped * 32768.0).astype("<i2").tobytes()


def encode(audio: np.ndarray, rate: int, fmt: AudioFormat) -> tuple[bytes, int]:
    """A whole response body in ``fmt``; returns (bytes, the rate it was written at)."""
    target = output_rate(fmt, rate)
    audio = resample(audio, rate, target)
    if fmt.sf_format is None:
        return to_int16(audio), target
    buffer = io.BytesIO()
    sf.write(buffer, audio, target, format=fmt.sf_format, subtype=fmt.sf_subtype)
    return buffer.getvalue(), target


def streaming_wav_header(rate: int, channels: int = 1, bits: int = 16) -> bytes:
    """A 44-byte PCM WAV header whose RIFF and data sizes are 0xFFFFFFFF ("until the end
    of the stream"), so players and soundfile read however much audio follows."""
    block = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, bits)
            + b"data" + struct.pack("<I", 0xFFFFFFFF))


class StreamEncoder:
    """Float chunks in, body bytes out, for the streamable formats (WAV or raw PCM),
    optionally resampled on the fly (stateful, so chunk borders leave no clicks)."""

    def __init__(self, fmt: AudioFormat, rate: int, target_rate: int | None = None) -> None:
        if not fmt.streamable:
            raise UnsupportedFormat(f"{fmt.name} cannot be streamed")
        self.fmt = fmt
        self.rate = rate
        self.target_rate = target_rate or rate
        self._resampler = None
        if self.target_rate != rate:
            import soxr

            self._resampler = soxr.ResampleStream(rate, self.target_rate, 1, dtype="float32")

    def header(self) -> bytes:
        return streaming_wav_header(self.target_rate) if self.fmt.name == "wav" else b""

    def chunk(self, audio: np.ndarray) -> bytes:
        if self._resampler is not None:
            audio = self._resampler.resample_chunk(np.asarray(audio, dtype=np.float32))
        return to_int16(audio)

    def flush(self) -> bytes:
        if self._resampler is None:
            return b""
        return to_int16(self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
