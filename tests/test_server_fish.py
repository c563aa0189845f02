"""A request built with fish-speech 0.1.0's own ``ServeTTSRequest`` (in the isolated
reference environment, .refenv) and serialized the way its ``tools/api_client.py``
sends it (``ormsgpack.packb(..., OPT_SERIALIZE_PYDANTIC)``, ``application/msgpack``),
served by our server."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest
import soundfile as sf

from server_utils import ROOT, shared_server, sine_wav

pytestmark = pytest.mark.parity

REFENV_PYTHON = ROOT / ".refenv" / "bin" / "python"
SCHEMA = ROOT / ".refenv" / "ref" / "fish_speech" / "utils" / "schema.py"

# Runs in the reference environment. fish_speech.utils/__init__ pulls heavy modules,
# so schema.py is loaded by file path (it needs pydantic, ormsgpack and torch).
BUILD = r"""
import importlib.util, json, sys
sys.path.insert(0, sys.argv[1])
spec = importlib.util.spec_from_file_location("fish_schema", sys.argv[2])
schema = importlib.util.module_from_spec(spec)
spec.loader.exec_module(schema)
import ormsgpack
for args in json.loads(sys.argv[3]):
  audio = open(args.pop("reference_audio"), "rb").read()
  data = {  # as tools/api_client.py builds it
      "text": args["text"],
      "references": [schema.ServeReferenceAudio(audio=audio, text=args["reference_text"])],
      "reference_id": None,
      "format": args["format"],
      "max_new_tokens": args["max_new_tokens"],
      "chunk_length": 300,
      "top_p": 0.8,
      "repetition_penalty": 1.1,
      "temperature": 0.8,
      "streaming": args["streaming"],
      "use_memory_cache": "off",
      "seed": args["seed"],
  }
  request = schema.ServeTTSRequest(**data)
  open(args["out"], "wb").write(ormsgpack.packb(request, option=ormsgpack.OPT_SERIALIZE_PYDANTIC))
"""


def _missing() -> str | None:
    if not REFENV_PYTHON.exists() or not SCHEMA.exists():
        return "the reference environment (.refenv with fish-speech 0.1.0) is not built"
    probe = subprocess.run([str(REFENV_PYTHON), "-c", "import pydantic, ormsgpack, torch"], capture_output=True)
    if probe.returncode != 0:
        return ("the reference environment lacks pydantic/ormsgpack "
                "(.refenv/bin/pip install pydantic ormsgpack)")
    return None


VARIANTS = {"wav": {}, "streaming": {"streaming": True}, "mp3": {"format": "mp3"}}


@pytest.fixture(scope="module")
def fish_requests(tmp_path_factory) -> dict[str, bytes]:
    """The msgpack bodies of VARIANTS, built in one reference-environment process."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("fish")
    (work / "ref.wav").write_bytes(sine_wav(0.05))
    base = {"text": "Hello from a fish-speech client.", "reference_audio": str(work / "ref.wav"),
            "reference_text": "A short reference.", "format": "wav", "max_new_tokens": 16, "seed": 7,
            "streaming": False}
    jobs = [{**base, **overrides, "out": str(work / f"{name}.msgpack")} for name, overrides in VARIANTS.items()]
    subprocess.run([str(REFENV_PYTHON), "-c", BUILD, str(ROOT / ".refenv" / "ref"), str(SCHEMA),
                    json.dumps(jobs)], check=True, capture_output=True, timeout=120)
    return {name: Path(job["out"]).read_bytes() for name, job in zip(VARIANTS, jobs)}


def _post(body: bytes):
    client = shared_server().client
    # the headers tools/api_client.py sends (its api key is ignored: this server has none)
    headers = {"authorization": "Bearer YOUR_API_KEY", "content-type": "application/msgpack"}
    return client.post("/v1/tts", content=body, headers=headers)


def test_fish_speech_msgpack_request_with_reference(fish_requests):
    body = fish_requests["wav"]
    response = _post(body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"
    assert response.headers["content-disposition"] == "attachment; filename=audio.wav"
    audio, rate = sf.read(io.BytesIO(response.content))
    assert rate == 44100 and len(audio) == int(response.headers["x-audio-frames"]) * 64 > 0
    assert _post(body).content == response.content  # seed 7: the same audio again


def test_fish_speech_msgpack_streaming(fish_requests):
    response = _post(fish_requests["streaming"])
    assert response.status_code == 200, response.text
    # what fish-speech's client expects: headerless 16-bit mono PCM at 44.1 kHz
    assert not response.content.startswith(b"RIFF") and len(response.content) % 128 == 0
    assert response.headers["x-sample-rate"] == "44100" and response.headers["x-audio-format"] == "s16le"


def test_fish_speech_mp3(fish_requests):
    response = _post(fish_requests["mp3"])
    assert response.status_code == 200 and response.headers["content-type"] == "audio/mpeg"
    assert sf.info(io.BytesIO(response.content)).format == "MP3"
