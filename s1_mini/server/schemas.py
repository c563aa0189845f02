"""Request and response models.

``TTSRequest`` is a superset of fish-speech 0.1.0's ``ServeTTSRequest`` (same field
names and defaults where they matter), so its clients' bodies validate unchanged.
It is stricter where fish-speech declared a rule but did not enforce it; those
messages say so. ``SpeechRequest`` is OpenAI's ``/v1/audio/speech`` body.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from s1_mini.server.audio_formats import SUPPORTED, check_format

VOICE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
VoiceId = Annotated[str, Field(pattern=VOICE_ID_PATTERN, description="[A-Za-z0-9_-]{1,64}")]

Temperature = Annotated[float, Field(strict=True, gt=0, lt=2, allow_inf_nan=False,
                                     description="0 < x < 2 (fish-speech declares 0.1..1.0)")]
TopP = Annotated[float, Field(strict=True, gt=0, le=1, allow_inf_nan=False, description="0 < x <= 1")]
RepetitionPenalty = Annotated[float, Field(strict=True, gt=0, lt=2, allow_inf_nan=False,
                                           description="0 < x < 2")]
MaxNewTokens = Annotated[int, Field(strict=True, ge=0, le=1_000_000,
                                    description="frames per text piece; 0 = up to the context limit; 1 is refused")]
Seed = Annotated[int, Field(strict=True, ge=-(2**63) + 1, le=2**63 - 1,
                            description="negative seeds use their absolute value, as fish-speech does")]


def _decode_audio(value: Any) -> Any:
    """bytes stay bytes (msgpack); a str must be base64 (JSON)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("data:") and "," in text:  # a data URL
            text = text.split(",", 1)[1]
        try:
            decoded = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("must be base64-encoded audio file bytes (fish-speech silently keeps an undecodable "
                             "string as raw text bytes; this server refuses it)") from None
        if not decoded:
            raise ValueError("must not be empty")
        return decoded
    return value


class ReferenceAudio(BaseModel):
    """One reference: audio file bytes (msgpack) or base64 (JSON) and its transcript."""

    model_config = ConfigDict(extra="forbid")
    audio: Annotated[bytes, Field(description="audio file bytes; base64 text over JSON")]
    text: Annotated[str, Field(min_length=1, description="transcript of the audio")]

    @field_validator("audio", mode="before")
    @classmethod
    def _audio(cls, value: Any) -> Any:
        value = _decode_audio(value)
        if isinstance(value, (bytes, bytearray)) and not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be only whitespace")
        return value


class TTSRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "Hello world!"}]})

    text: Annotated[str, Field(min_length=1, description="the text to speak (at most max_text_length characters)")]
    format: Annotated[str, Field(json_schema_extra={"enum": list(SUPPORTED)},
                                 description="audio container")] = "wav"
    temperature: Temperature | None = None
    top_p: TopP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    max_new_tokens: MaxNewTokens | None = None
    seed: Seed | None = None
    reference_id: VoiceId | None = None
    references: Annotated[list[ReferenceAudio], Field(max_length=16)] = []
    streaming: bool = False
    # fish-speech fields that do not change generation here
    chunk_length: Annotated[int, Field(strict=True, ge=100, le=300, description=(
        "accepted for fish-speech compatibility, not used; fish-speech declares 100..300 but does not "
        "enforce it, this server does"))] = 200
    normalize: Annotated[bool, Field(description="accepted for compatibility; ignored (as fish-speech does)")] = True
    use_memory_cache: Annotated[Literal["on", "off"], Field(description=(
        "accepted for compatibility; reference codes are always cached by audio content"))] = "off"

    @field_validator("format", mode="before")
    @classmethod
    def _format(cls, value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, one of {', '.join(SUPPORTED)}")
        check_format(value.lower(), field="format")  # raises ValueError naming the formats
        return value.lower()

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty or only whitespace")
        return value

    @field_validator("chunk_length", mode="wrap")
    @classmethod
    def _chunk_length(cls, value: Any, handler: Any) -> int:
        try:
            return handler(value)
        except Exception:
            raise ValueError(f"must be an integer from 100 to 300, got {value!r} (fish-speech declares this "
                             "range without enforcing it; this server enforces it; the value does not "
                             "change generation)") from None

    @field_validator("repetition_penalty", mode="wrap")
    @classmethod
    def _repetition_penalty(cls, value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except Exception:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 2:
                raise ValueError("must satisfy 0 < x < 2, got 2.0 (fish-speech's schema allows 2.0 but its "
                                 "generator then fails)") from None
            raise

    @field_validator("temperature", "top_p", mode="wrap")
    @classmethod
    def _sampling(cls, value: Any, handler: Any, info: Any) -> Any:
        try:
            return handler(value)
        except Exception:
            if isinstance(value, str):
                raise ValueError(f"must be a number, not a string (got {value!r})") from None
            raise

    @field_validator("max_new_tokens")
    @classmethod
    def _max_new_tokens(cls, value: int | None) -> int | None:
        if value == 1:
            raise ValueError("must be 0 (up to the context limit) or >= 2, got 1")
        return value

    @model_validator(mode="after")
    def _streaming(self) -> "TTSRequest":
        if self.streaming and self.format not in ("wav", "pcm"):
            raise ValueError(f"streaming: only the wav and pcm formats can stream, got format {self.format!r}")
        return self


class SpeechRequest(BaseModel):
    """OpenAI ``POST /v1/audio/speech``; the last five fields are extensions."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "s1-mini", "input": "Hello world!", "voice": "default", "response_format": "wav"}]})
    model: Annotated[str, Field(min_length=1, max_length=256, description="any name (one model is served)")]
    input: Annotated[str, Field(min_length=1, description="the text to speak")]
    voice: Annotated[str | dict[str, Any], Field(examples=["default"], description=(
        "a registered voice id, or 'default' (also any OpenAI built-in voice name) for no reference"))]
    response_format: Annotated[str, Field(json_schema_extra={"enum": list(SUPPORTED)})] = "mp3"
    speed: Annotated[float, Field(strict=True, ge=0.25, le=4.0, allow_inf_nan=False,
                                  description="only 1.0 is supported")] = 1.0
    stream_format: Literal["audio", "sse"] | None = None
    instructions: Annotated[str | None, Field(max_length=4096, description="accepted and ignored")] = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    max_new_tokens: MaxNewTokens | None = None
    seed: Seed | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty or only whitespace")
        return value

    @field_validator("voice")
    @classmethod
    def _voice(cls, value: Any) -> str:
        if isinstance(value, dict):  # OpenAI's {"id": "voice_..."} form for custom voices
            if set(value) != {"id"} or not isinstance(value["id"], str):
                raise ValueError("must be a voice name or an object {\"id\": <voice id>}")
            value = value["id"]
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("response_format", mode="before")
    @classmethod
    def _format(cls, value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, one of {', '.join(SUPPORTED)}")
        check_format(value.lower(), field="response_format")
        return value.lower()

    @field_validator("speed")
    @classmethod
    def _speed(cls, value: float) -> float:
        if value != 1.0:
            raise ValueError(f"only 1.0 is supported, got {value} (the model has no speed control)")
        return value


class AddReferenceRequest(BaseModel):
    """fish-speech's ``/v1/references/add`` body (JSON, msgpack or multipart)."""

    model_config = ConfigDict(extra="forbid")
    id: Annotated[str, Field(min_length=1)]
    audio: bytes
    text: Annotated[str, Field(min_length=1)]

    @field_validator("audio", mode="before")
    @classmethod
    def _audio(cls, value: Any) -> Any:
        return _decode_audio(value)


class DeleteReferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference_id: Annotated[str, Field(min_length=1)]


# ----------------------------------------------------------------- responses


class ErrorDetail(BaseModel):
    code: str
    field: str | None
    message: str
    type: str
    param: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class VoiceInfo(BaseModel):
    id: str
    text: str
    frames: int
    content_hash: str
    created_at: float


class VoiceList(BaseModel):
    voices: list[VoiceInfo]


class Deleted(BaseModel):
    id: str
    deleted: bool


class FishAddResponse(BaseModel):
    success: bool
    message: str
    reference_id: str


class FishListResponse(BaseModel):
    success: bool
    reference_ids: list[str]
    message: str = "Success"


class FishDeleteResponse(BaseModel):
    success: bool
    message: str
    reference_id: str
