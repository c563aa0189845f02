"""The voice registry: id, text and audio rules, persistence, faults, inline cache, threads."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile

from s1_mini.codec import Codec, encode_reference_audio
from s1_mini.codec.audio import AudioError
from s1_mini.prompt import Reference
from s1_mini.testing.make_checkpoint import make_checkpoint
from s1_mini.voices import (InvalidReferenceAudio, InvalidVoiceId, Voice, VoiceError, VoiceNotFound,
                            VoiceRegistry, content_hash)


class FakeEncoder:
    """Deterministic codes [4, k] from a hash of the audio; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, audio: bytes | np.ndarray, sample_rate: int | None) -> np.ndarray:
        with self.lock:
            self.calls += 1
        if isinstance(audio, bytes) and audio.startswith(b"BAD"):
            raise AudioError("cannot read audio bytes: Format not recognised")
        digest = hashlib.sha256(content_hash(audio).encode() + str(sample_rate).encode()).digest()
        k = 1 + digest[0] % 7
        return np.frombuffer(digest[: 4 * k], dtype=np.uint8).reshape(4, k).astype(np.int64)


@pytest.fixture
def encoder() -> FakeEncoder:
    return FakeEncoder()


def wav_bytes(seconds: float = 0.25, freq: float = 220.0, rate: int = 44100) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    soundfile.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


# ---------------------------------------------------------------- rules


@pytest.mark.parametrize("bad", ["../x", "a/b", "a\\b", "", "x" * 65, "é", "voix-é", "a\0b", "a b", ".", "..",
                                 " a", "a\n", "a.b", "ａ"])
def test_invalid_ids_are_refused_everywhere(encoder, bad):
    reg = VoiceRegistry(None, encoder)
    with pytest.raises(InvalidVoiceId, match=r"voice_id: must match \[A-Za-z0-9_-\]\{1,64\}"):
        reg.register(bad, b"audio", "hello")
    with pytest.raises(InvalidVoiceId):
        reg.get(bad)
    with pytest.raises(InvalidVoiceId):
        reg.delete(bad)
    assert encoder.calls == 0 and len(reg) == 0


def test_id_message_and_limits(encoder):
    reg = VoiceRegistry(None, encoder, max_id_length=8)
    with pytest.raises(InvalidVoiceId) as info:
        reg.register("a/b", b"audio", "hi")
    assert str(info.value) == "voice_id: must match [A-Za-z0-9_-]{1,8}, got 'a/b'"
    with pytest.raises(InvalidVoiceId, match="must be a string, got int"):
        reg.register(5, b"audio", "hi")  # type: ignore[arg-type]
    with pytest.raises(InvalidVoiceId, match=r"\(1000 characters\)"):
        reg.register("x" * 1000, b"audio", "hi")
    assert reg.register("Ab_-9", b"audio", "hi").id == "Ab_-9"
    assert reg.register("x" * 8, b"audio", "hi").id == "x" * 8


def test_ids_differing_only_in_case_are_refused(encoder, tmp_path):
    reg = VoiceRegistry(tmp_path, encoder)
    reg.register("Alice", b"one", "hi")
    with pytest.raises(InvalidVoiceId, match="differs only in letter case from the registered voice 'Alice'"):
        reg.register("alice", b"two", "hi")
    reg.register("Alice", b"two", "hi")  # the same id is a replacement


def test_text_rules(encoder):
    reg = VoiceRegistry(None, encoder, max_text_length=10)
    for text, rule in [("", "must not be empty"), ("  \n\t", "must not be empty"),
                       ("x" * 11, "must be at most 10 characters, got 11"), (None, "must be a string")]:
        with pytest.raises(VoiceError, match=f"^text: {rule}"):
            reg.register("v", b"audio", text)  # type: ignore[arg-type]
        with pytest.raises(VoiceError, match=f"^text: {rule}"):
            reg.encode_inline(b"audio", text)  # type: ignore[arg-type]
    # kept verbatim: no stripping, the model uses it as it is
    assert reg.register("v", b"audio", " ten chars").text == " ten chars"


def test_audio_rules(encoder):
    reg = VoiceRegistry(None, encoder)
    with pytest.raises(InvalidReferenceAudio, match="^audio: cannot be used as a reference: cannot read"):
        reg.register("v", b"BAD not audio", "hi")
    with pytest.raises(InvalidReferenceAudio, match="^audio: must not be empty"):
        reg.register("v", b"", "hi")
    with pytest.raises(InvalidReferenceAudio, match="^audio: must not be empty"):
        reg.register("v", np.zeros(0, np.float32), "hi")
    with pytest.raises(InvalidReferenceAudio, match="^audio: must be the bytes"):
        reg.register("v", "file.wav", "hi")  # type: ignore[arg-type]
    with pytest.raises(InvalidReferenceAudio, match="^audio: must be numeric"):
        reg.register("v", np.array([None, 1]), "hi")
    with pytest.raises(InvalidReferenceAudio, match="^sample_rate: only for arrays"):
        reg.register("v", b"audio", "hi", sample_rate=16000)
    with pytest.raises(InvalidReferenceAudio, match="^sample_rate: must be a positive integer"):
        reg.register("v", np.zeros(10, np.float32), "hi", sample_rate=0)
    with pytest.raises(InvalidReferenceAudio, match="^audio: too short"):
        VoiceRegistry(None, lambda a, sr: np.zeros((4, 0), np.int64)).register("v", b"audio", "hi")
    assert len(reg) == 0


def test_reference_duration_limit_is_checked_before_encoding(encoder):
    reg = VoiceRegistry(None, encoder, max_reference_seconds=0.5)
    long_wav = wav_bytes(1.0, rate=8000)
    for register in (lambda audio, **kw: reg.register("v", audio, "hi", **kw),
                     lambda audio, **kw: reg.encode_inline(audio, "hi", **kw)):
        with pytest.raises(InvalidReferenceAudio) as info:
            register(long_wav)
        assert str(info.value) == "audio: must be at most 0.5 s (max_reference_seconds), got 1 s"
        # an array: its length at its rate (44100 by default)
        with pytest.raises(InvalidReferenceAudio, match=r"at most 0\.5 s .*, got 0\.75 s"):
            register(np.zeros((33075, 2), np.float32))
        with pytest.raises(InvalidReferenceAudio, match=r"got 1\.5 s"):
            register(np.zeros(24000, np.int16), sample_rate=16000)
        # a header that declares two hours of 1 Hz audio in 14 KB
        with pytest.raises(InvalidReferenceAudio, match="got 7200 s"):
            register(wav_bytes(7200, rate=1))
        with pytest.raises(InvalidReferenceAudio, match="^audio: cannot be used as a reference: cannot read audio "
                           "bytes: Format not recognised"):
            register(b"not audio")
    assert encoder.calls == 0 and len(reg) == 0  # nothing was decoded or encoded
    assert reg.register("v", wav_bytes(0.5, rate=8000), "hi").id == "v"  # the limit itself is allowed
    assert reg.encode_inline(np.zeros(22050, np.float32), "hi").codes.size
    # no limit by default: an encoder that is not the codec may take what it likes
    assert VoiceRegistry(None, encoder).register("v", b"any bytes", "hi").id == "v"


def test_audio_arrays_must_be_one_or_two_dimensional(encoder):
    reg = VoiceRegistry(None, encoder)
    for shape in ((), (2, 3, 4)):
        with pytest.raises(InvalidReferenceAudio, match=r"^audio: must be samples \[L\] or \[L, channels\]"):
            reg.register("v", np.zeros(shape, np.float32), "hi")
    assert encoder.calls == 0


def test_constructor_rules(encoder, tmp_path):
    with pytest.raises(ValueError, match="max_voices: must be an integer >= 1"):
        VoiceRegistry(None, encoder, max_voices=0)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "30"):
        with pytest.raises(ValueError, match="max_reference_seconds: must be null or a finite number > 0"):
            VoiceRegistry(None, encoder, max_reference_seconds=bad)
    (tmp_path / "file").write_text("")
    with pytest.raises(VoiceError, match="cannot be created"):
        VoiceRegistry(tmp_path / "file", encoder)


# ---------------------------------------------------------------- registry behaviour


def test_register_get_list_delete(encoder):
    reg = VoiceRegistry(None, encoder)
    for vid in ["zed", "alpha", "Mid"]:
        reg.register(vid, vid.encode(), f"text of {vid}")
    assert [v.id for v in reg.list()] == ["Mid", "alpha", "zed"]
    voice = reg.get("alpha")
    assert isinstance(voice, Voice) and voice.codes.dtype == np.int64 and voice.codes.shape[0] == 4
    assert voice.content_hash == hashlib.sha256(b"alpha").hexdigest()
    ref = voice.reference()
    assert isinstance(ref, Reference) and ref.text == "text of alpha" and ref.codes is voice.codes
    info = voice.info()
    assert info == {"id": "alpha", "text": "text of alpha", "frames": voice.codes.shape[1],
                    "content_hash": voice.content_hash, "created_at": voice.created_at}
    json.dumps(info)
    with pytest.raises(ValueError):
        voice.codes[0, 0] = 1  # read-only: callers cannot change the registry's copy
    reg.delete("alpha")
    assert len(reg) == 2
    with pytest.raises(VoiceNotFound, match="^voice_id: no voice 'alpha' is registered"):
        reg.get("alpha")
    with pytest.raises(VoiceNotFound):
        reg.delete("alpha")


def test_reregistering_replaces(encoder, tmp_path):
    reg = VoiceRegistry(tmp_path, encoder)
    reg.register("v", b"first", "one")
    second = reg.register("v", b"second", "two")
    assert len(reg) == 1 and reg.get("v") is second
    again = VoiceRegistry(tmp_path, encoder).get("v")
    assert again.text == "two" and np.array_equal(again.codes, second.codes)


def test_max_voices(encoder, tmp_path):
    reg = VoiceRegistry(tmp_path, encoder, max_voices=2)
    reg.register("a", b"a", "a")
    reg.register("b", b"b", "b")
    calls = encoder.calls
    with pytest.raises(VoiceError, match=r"^voice_id: the registry is full \(max_voices 2\)"):
        reg.register("c", b"c", "c")
    assert encoder.calls == calls  # refused before encoding
    reg.register("a", b"a2", "a2")  # replacing is allowed when full
    # more files on disk than the limit: the rest are skipped and reported
    small = VoiceRegistry(tmp_path, encoder, max_voices=1)
    assert [v.id for v in small.list()] == ["a"]
    assert small.skipped == [("b.npz", "max_voices (1) reached")]


def test_array_audio_and_content_hash(encoder):
    reg = VoiceRegistry(None, encoder)
    samples = np.linspace(-1, 1, 100, dtype=np.float32)
    a = reg.register("a", samples, "x", sample_rate=16000)
    assert a.content_hash == content_hash(samples)
    # the same numbers as int16 are a different sound
    assert content_hash(samples.astype(np.int16)) != content_hash(samples)
    assert content_hash(samples.reshape(50, 2)) != content_hash(samples)


# ---------------------------------------------------------------- persistence


def test_persistence_across_reconstruction(encoder, tmp_path):
    directory = tmp_path / "voices" / "nested"
    reg = VoiceRegistry(directory, encoder)  # created if missing
    made = {vid: reg.register(vid, vid.encode() * 3, f"text {vid}") for vid in ["b", "a", "c-1"]}
    reg.delete("c-1")
    assert sorted(p.name for p in directory.iterdir()) == ["a.npz", "b.npz"]
    again = VoiceRegistry(directory, encoder)
    assert again.skipped == [] and [v.id for v in again.list()] == ["a", "b"]
    for vid in ["a", "b"]:
        loaded, original = again.get(vid), made[vid]
        assert np.array_equal(loaded.codes, original.codes) and loaded.codes.dtype == np.int64
        assert (loaded.text, loaded.content_hash, loaded.created_at) == \
            (original.text, original.content_hash, original.created_at)
        assert not loaded.codes.flags.writeable


def test_memory_only_writes_nothing(encoder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    VoiceRegistry(None, encoder).register("v", b"a", "hi")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_entries_are_skipped_and_reported(encoder, tmp_path, caplog):
    reg = VoiceRegistry(tmp_path, encoder)
    good = reg.register("good", b"good", "fine")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    (tmp_path / "empty.npz").write_bytes(b"")
    np.savez(tmp_path / "nometa.npz", codes=np.zeros((4, 3), np.int64))
    np.savez(tmp_path / "badcodes.npz", codes=np.zeros((4, 0), np.int64), meta=np.array("{}"))
    np.savez(tmp_path / "badmeta.npz", codes=np.zeros((4, 3), np.int64), meta=np.array("[1]"))
    np.savez(tmp_path / "pickled.npz", codes=np.array([{"x": 1}], dtype=object), meta=np.array("{}"))
    meta = json.dumps({"text": "t", "content_hash": "0" * 64, "created_at": 1.0})
    np.savez(tmp_path / "bad id.npz", codes=np.zeros((4, 3), np.int64), meta=np.array(meta))
    (tmp_path / "dir.npz").mkdir()
    (tmp_path / "README.txt").write_text("stray file")  # not an .npz: ignored, not reported
    (tmp_path / ".good.abc.tmp").write_bytes(b"leftover")  # a crashed write's temp file: ignored
    with caplog.at_level(logging.WARNING, logger="s1_mini.voices"):
        again = VoiceRegistry(tmp_path, encoder)
    assert [v.id for v in again.list()] == ["good"]
    assert np.array_equal(again.get("good").codes, good.codes)
    skipped = dict(again.skipped)
    assert sorted(skipped) == sorted(["garbage.npz", "empty.npz", "nometa.npz", "badcodes.npz", "badmeta.npz",
                                      "pickled.npz", "bad id.npz", "dir.npz"])
    assert "voice_id: must match" in skipped["bad id.npz"]
    assert "meta: must be a JSON object" in skipped["badmeta.npz"]
    assert "codes: must be non-empty integers" in skipped["badcodes.npz"]
    assert len([r for r in caplog.records if "skipping" in r.getMessage()]) == len(skipped)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("fault", ["replace", "fsync"])
def test_full_disk_leaves_nothing_half_written(encoder, tmp_path, monkeypatch, fault):
    reg = VoiceRegistry(tmp_path, encoder)
    old = reg.register("v", b"old", "old text")
    before = (tmp_path / "v.npz").read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, fault, no_space)
    with pytest.raises(VoiceError, match=r"^voice registry directory .* is not writable: .*No space left"):
        reg.register("v", b"new", "new text")
    with pytest.raises(VoiceError, match="is not writable"):
        reg.register("w", b"new", "new text")
    monkeypatch.undo()
    assert _leftovers(tmp_path) == []
    assert reg.get("v") is old and len(reg) == 1  # memory unchanged
    assert (tmp_path / "v.npz").read_bytes() == before and not (tmp_path / "w.npz").exists()


def test_missing_directory_at_write_time(encoder, tmp_path):
    directory = tmp_path / "voices"
    reg = VoiceRegistry(directory, encoder)
    directory.rmdir()
    directory.write_text("now a file")  # the directory path is no longer a directory
    with pytest.raises(VoiceError, match="is not writable"):
        reg.register("v", b"a", "hi")
    assert len(reg) == 0


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(encoder, tmp_path):
    reg = VoiceRegistry(tmp_path, encoder)
    reg.register("v", b"a", "hi")
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(VoiceError, match="is not writable"):
            reg.register("w", b"b", "hi")
        with pytest.raises(VoiceError, match="is not writable"):
            reg.delete("v")
    finally:
        tmp_path.chmod(0o700)
    assert [v.id for v in reg.list()] == ["v"] and _leftovers(tmp_path) == []


def test_delete_failure_keeps_voice(encoder, tmp_path, monkeypatch):
    reg = VoiceRegistry(tmp_path, encoder)
    reg.register("v", b"a", "hi")

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(VoiceError, match="is not writable: .*Read-only"):
        reg.delete("v")
    monkeypatch.undo()
    assert reg.get("v").id == "v"


# ---------------------------------------------------------------- inline references


def test_inline_cache_reuses_codes_with_the_new_text(encoder):
    reg = VoiceRegistry(None, encoder)
    first = reg.encode_inline(b"clip", "first text")
    second = reg.encode_inline(b"clip", "second text")
    assert encoder.calls == 1
    assert second.text == "second text" and second.codes is first.codes
    # arrays: the sample rate is part of the key
    samples = np.ones(50, np.float32)
    reg.encode_inline(samples, "t", sample_rate=16000)
    reg.encode_inline(samples, "t", sample_rate=22050)
    reg.encode_inline(samples.copy(), "t", sample_rate=16000)
    assert encoder.calls == 3
    with pytest.raises(InvalidReferenceAudio):
        reg.encode_inline(b"BAD", "t")
    assert len(reg) == 0  # inline references are not registered voices


def test_inline_cache_is_lru_bounded(encoder):
    reg = VoiceRegistry(None, encoder, max_cached=2)
    reg.encode_inline(b"a", "t")
    reg.encode_inline(b"b", "t")
    reg.encode_inline(b"a", "t")  # a is now the most recent
    reg.encode_inline(b"c", "t")  # evicts b
    assert encoder.calls == 3
    reg.encode_inline(b"a", "t")
    assert encoder.calls == 3
    reg.encode_inline(b"b", "t")
    assert encoder.calls == 4
    uncached = VoiceRegistry(None, encoder, max_cached=0)
    uncached.encode_inline(b"a", "t")
    uncached.encode_inline(b"a", "t")
    assert encoder.calls == 6


# ---------------------------------------------------------------- threads


def test_threads_register_and_get(encoder, tmp_path):
    reg = VoiceRegistry(tmp_path, encoder, max_cached=4)
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def work(n: int) -> None:
        try:
            start.wait()
            for i in range(20):
                vid = f"v{(n * 20 + i) % 40}"
                reg.register(vid, f"{vid}".encode(), f"text {vid}")
                assert reg.get(vid).text == f"text {vid}"
                reg.encode_inline(f"clip{i % 6}".encode(), f"t{n}")
                reg.list()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(reg) == 40 and len(reg._inline) <= 4
    again = VoiceRegistry(tmp_path, encoder)
    assert again.skipped == [] and len(again) == 40 and _leftovers(tmp_path) == []


# ---------------------------------------------------------------- the real codec


def test_real_codec_registers_wav(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ck", "tiny", seed=0)
    codec = Codec.from_checkpoint(checkpoint)
    reg = VoiceRegistry(tmp_path / "voices", lambda audio, sr: encode_reference_audio(codec, audio, sr))
    voice = reg.register("sine", wav_bytes(), "a sine tone")
    assert voice.codes.shape[0] == 4 and voice.codes.shape[1] > 0 and voice.codes.dtype == np.int64
    with pytest.raises(InvalidReferenceAudio, match="^audio: cannot be used as a reference: cannot read audio bytes"):
        reg.register("noise", b"definitely not audio", "text")
    again = VoiceRegistry(tmp_path / "voices", lambda audio, sr: pytest.fail("must not re-encode"))
    assert np.array_equal(again.get("sine").codes, voice.codes)
    ref = reg.encode_inline(wav_bytes(), "inline")
    assert np.array_equal(ref.codes, voice.codes)
