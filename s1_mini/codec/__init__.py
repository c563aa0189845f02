"""The S1 audio codec (Fish-Speech ``modded_dac_vq``): 44.1 kHz mono audio ⇄ codes ``[N, T]``.

Written from ``spec/codec.md``; the reference (fish-speech 0.1.0) is only a test oracle.
"""

from .audio import AudioError, encode_reference_audio, load_audio
from .config import CodecConfig, CodecConfigError
from .model import Codec
from .streams import CodecStreams

__all__ = [
    "AudioError",
    "Codec",
    "CodecConfig",
    "CodecConfigError",
    "CodecStreams",
    "encode_reference_audio",
    "load_audio",
]
