"""CPU smoke runs of the codec benchmarks (bench/codec_bench.py and its reference twin).

They check that the scripts run end to end and write the JSON the GPU session will read:
every key, every number finite and positive. Timings on a shared 2-core CPU mean
nothing, so none is asserted.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from s1_mini.testing.make_checkpoint import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REF_PYTHON = ROOT / ".refenv" / "bin" / "python"
OFFLINE_KEYS = {"batch", "ms_p50", "ms_min", "audio_s_per_s", "peak_gib"}
STREAM_KEYS = {"batch", "chunk_frames", "chunks_per_stream", "audio_s_per_s", "first_chunk_ms_p50",
               "chunk_ms_p50", "chunk_ms_p99", "peak_gib"}
TOP_KEYS = {"impl", "device", "torch", "precision", "checkpoint", "parameters", "sample_rate", "frame_length",
            "frames_per_second", "frames", "audio_seconds", "warmup", "repeats", "load_s", "load_peak_gib",
            "decode", "stream", "encode", "peak_gib"}
# Quick settings: one warm-up and one timed run are enough to exercise every path.
QUICK = ["--device", "cpu", "--precision", "float32", "--batches", "1,2", "--warmup", "1", "--repeats", "1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("bench_codec") / "ck", "tiny", seed=0)


def numbers_ok(value: Any, where: str = "") -> None:
    """Every number in the JSON is finite and positive; peak memory is null on the CPU."""
    if isinstance(value, dict):
        for key, item in value.items():
            if "peak_gib" in key:
                assert item is None, f"{where}.{key}: CPU runs have no CUDA peak"
            else:
                numbers_ok(item, f"{where}.{key}")
    elif isinstance(value, bool) or value is None or isinstance(value, str):
        return
    else:
        assert isinstance(value, (int, float)), f"{where}: {value!r}"
        assert math.isfinite(value) and value > 0, f"{where}: {value!r}"


def run(python: str, script: str, args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    out = subprocess.run([python, str(ROOT / script), *args], capture_output=True, text=True, timeout=300,
                         env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(Path(args[args.index("--json") + 1]).read_text())


@pytest.fixture(scope="module")
def ours(checkpoint, tmp_path_factory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("bench_codec_out") / "ours.json"
    return run(sys.executable, "bench/codec_bench.py",
               ["--checkpoint", str(checkpoint), *QUICK, "--seconds", "1", "--stream-passes", "1", "--json", str(path)])


@pytest.mark.slow
def test_ours_json(ours):
    assert set(ours) == TOP_KEYS | {"compiled", "dilation", "cudnn_benchmark"}
    assert ours["impl"] == "ours" and ours["device"] == "cpu" and ours["precision"] == "float32"
    # 1 s of the tiny codec's 64-sample frames at 44.1 kHz
    assert ours["frame_length"] == 64 and ours["frames"] == 689
    assert set(ours["decode"]) == {"b1", "b2"}
    assert set(ours["stream"]) == {"c1_b1", "c1_b2", "c4_b1", "c4_b2"}
    assert set(ours["encode"]) == {"b1"}
    for part, keys in (("decode", OFFLINE_KEYS), ("encode", OFFLINE_KEYS), ("stream", STREAM_KEYS)):
        for name, entry in ours[part].items():
            assert set(entry) == keys, (part, name)
    assert ours["decode"]["b2"]["batch"] == 2
    assert ours["stream"]["c4_b2"]["chunk_frames"] == 4
    # 1 first frame, then 688 frames in chunks of 4
    assert ours["stream"]["c4_b1"]["chunks_per_stream"] == 1 + 172
    numbers_ok(ours)


@pytest.mark.parity
@pytest.mark.skipif(not REF_PYTHON.exists(), reason="reference env .refenv missing: run bash tests/parity/build_reference_env.sh")
def test_reference_json(checkpoint, tmp_path, ours):
    path = tmp_path / "ref.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / ".refenv" / "ref")}
    # 0.5 s: the tiny config's transformer block_size (512 frames) is as far as the reference can decode.
    ref = run(str(REF_PYTHON), "bench/reference/ref_codec_bench.py",
              ["--checkpoint", str(checkpoint), *QUICK, "--seconds", "0.5", "--json", str(path)], env)
    assert set(ref) == TOP_KEYS | {"stream_note", "encode_precision"}
    assert ref["stream"] is None and "no incremental decoder" in ref["stream_note"]
    assert ref["frame_length"] == ours["frame_length"] and ref["frames"] == 345
    # the same keys as ours where they correspond
    assert set(ref["decode"]) == set(ours["decode"]) and set(ref["encode"]) == set(ours["encode"])
    for part in ("decode", "encode"):
        for name, entry in ref[part].items():
            assert set(entry) == set(ours[part][name]), (part, name)
    numbers_ok(ref)
