"""Smoke test of bench/serve_sweep.py: the real HTTP server and the real SageMaker front
on the tiny random checkpoint (CPU, float32, no compile), a sweep of c = 1, 2 through
each, run as the command line the device script runs. Timings on a shared 2-core CPU
are noise: only the report's shape, zero errors and finite figures are asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from server_utils import ROOT, ServerProcess, tiny_checkpoint
from test_sagemaker_front import TINY_FRAME, Container, extract, model_tar  # noqa: F401 - model_tar is a fixture

SCRIPT = ROOT / "bench" / "serve_sweep.py"
LEVELS = [1, 2]
ROUND_KEYS = {"concurrency", "voice", "voice_mode", "streams", "ok", "wall_s", "audio_s", "audio_s_per_s",
              "ttfa_p50_ms", "ttfa_p99_ms", "rtf_p50", "rtf_p99", "streams_real_time", "errors",
              "errors_by_status", "error_examples", "warmup_streams", "warmup_errors"}
FIGURES = ("wall_s", "audio_s", "audio_s_per_s", "ttfa_p50_ms", "ttfa_p99_ms", "rtf_p50", "rtf_p99")


def _load_sweep() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_serve_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve_sweep"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


serve_sweep = _load_sweep()


def run_sweep(url: str, kind: str, out: Path, pid: int) -> dict[str, Any]:
    command = [sys.executable, str(SCRIPT), "--url", url, "--kind", kind, "--concurrency", ",".join(map(str, LEVELS)),
               "--frames", "8", "--voice-seconds", "0.05", "--frame-samples", str(TINY_FRAME),
               "--request-timeout", "60", "--wait-ready", "60", "--pid", str(pid), "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def check_report(report: dict[str, Any], kind: str, voice_mode: str) -> None:
    assert report["kind"] == kind and report["concurrency"] == LEVELS and report["frames"] == 8
    assert report["voice_mode"] == voice_mode and report["voice_note"]
    assert report["errors_total"] == 0
    assert [(r["concurrency"], r["voice"]) for r in report["rounds"]] == [(c, v) for c in LEVELS for v in (False, True)]
    for row in report["rounds"]:
        assert set(row) == ROUND_KEYS, row
        assert row["errors"] == 0 and row["errors_by_status"] == {} and row["warmup_errors"] == 0, row
        assert row["streams"] == row["ok"] == row["concurrency"]
        assert row["warmup_streams"] == min(row["concurrency"], 4)
        assert row["voice_mode"] == (voice_mode if row["voice"] else "none")
        for name in FIGURES:
            assert isinstance(row[name], float) and math.isfinite(row[name]) and row[name] > 0, (name, row)
        assert row["ttfa_p50_ms"] <= row["ttfa_p99_ms"] and row["rtf_p50"] <= row["rtf_p99"]
        # every stream spoke a whole number of frames (bytes after the header, 16-bit mono 44.1 kHz)
        samples = row["audio_s"] * 44100
        assert abs(samples - round(samples)) < 1e-6 and round(samples) % TINY_FRAME == 0
        assert 0 <= row["streams_real_time"] <= row["streams"]


def test_sweep_server_and_sagemaker_front(model_tar, tmp_path):  # noqa: F811 - pytest fixture
    # Both started before either is waited for: their loads overlap.
    front = Container(extract(model_tar, tmp_path / "ml"), tmp_path)
    server = None
    try:
        server = ServerProcess(tiny_checkpoint(), "--max-new-tokens", "8", log_dir=tmp_path)
        report = run_sweep(server.url, "server", tmp_path / "server.json", server.process.pid)
        check_report(report, "server", "registered")
        assert report["route"] == "/v1/tts/stream" and report["health_before"]["healthy"]

        assert front.pings()[-1] == 200
        report = run_sweep(front.url, "sagemaker", tmp_path / "sagemaker.json", front.process.pid)
        check_report(report, "sagemaker", "inline")
        assert report["route"] == "/invocations" and "inline" in report["voice_note"]
    except (AssertionError, RuntimeError):
        print("server log:", server.log()[-3000:] if server else "-", "\nfront log:", front.log()[-3000:])
        raise
    finally:
        if server is not None:
            server.stop()
        assert front.stop() == 0, front.log()[-3000:]


@pytest.mark.parametrize("url", ["http://10.0.0.1:8080", "http://example.com", "ftp://127.0.0.1:21"])
def test_refuses_non_loopback(url, tmp_path):
    out = tmp_path / "out.json"
    assert serve_sweep.main(["--url", url, "--kind", "server", "--concurrency", "1", "--json", str(out)]) == 2
    assert not out.exists()


@pytest.mark.parametrize("args", [["--concurrency", "0"], ["--concurrency", "1,x"], ["--frames", "1"],
                                  ["--voice-seconds", "0"]])
def test_refuses_bad_arguments(args, tmp_path):
    argv = ["--url", "http://127.0.0.1:9", "--kind", "server", "--json", str(tmp_path / "o.json"), *args]
    assert serve_sweep.main(argv) == 2


def test_audio_seconds_from_the_header():
    header = serve_sweep.load.sine_wav(0.0)[:36] + b"data" + b"\xff\xff\xff\xff"  # 22050 Hz 16-bit mono
    assert serve_sweep.audio_seconds(header + b"\0\0" * 22050) == pytest.approx(1.0)


def test_pyspy_summary_counts_samples_per_thread(tmp_path):
    """bench/pyspy_summary.py on a recording in py-spy's raw format (collapsed stacks with
    ``--threads``): shares per thread, and per thread this project's innermost function."""
    recording = tmp_path / "pyspy.txt"
    recording.write_text(
        "thread (0x7f01): MainThread;run (asyncio/base_events.py:640);body (s1_mini/server/synthesis.py:257) 3\n"
        "thread (0x7f01): MainThread 1\n"
        "thread (0x7f02): s1-mini-scheduler;_loop (s1_mini/scheduler.py:176);decode (s1_mini/runner.py:480) 6\n")
    spec = importlib.util.spec_from_file_location("bench_pyspy_summary", ROOT / "bench" / "pyspy_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = module.summarize(str(recording), top=5).splitlines()
    assert lines[0] == "10 samples holding the GIL"
    assert lines[1].split() == ["6", "60.0%", "s1-mini-scheduler"]
    assert lines[2].split() == ["60.0%", "decode", "(s1_mini/runner.py:480)"]
    assert lines[3].split() == ["4", "40.0%", "MainThread"]
    assert lines[4].split() == ["30.0%", "body", "(s1_mini/server/synthesis.py:257)"]
    assert lines[5].split() == ["10.0%", "(no", "Python", "frame)"]
