"""Bad arguments to every command-line tool: ``python -m s1_mini.deploy <step>``,
``s1_mini.synthesize``, ``s1_mini.generate``, ``s1_mini.codec``,
``s1_mini.testing.make_checkpoint``, ``s1_mini.server`` and ``s1_mini.sagemaker.serve``.

Each table row is one command line: its id, the arguments (``{ckpt}`` is the tiny
checkpoint, ``{tmp}`` a folder of bad files), the expected exit status (2 for arguments,
argparse's and ours; the codec tool documents 1; synthesize answers 1 when the engine
refuses the request) and the name the message must contain. Rows run the tool's
``main(argv)`` in this process (importing torch once); a handful run as real processes
to prove the exit status and that no traceback reaches stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from s1_mini import generate, synthesize
from s1_mini.codec import __main__ as codec_cli
from s1_mini.deploy import cli as deploy_cli_main
from s1_mini.sagemaker import serve
from s1_mini.server import __main__ as server_cli
from s1_mini.testing import make_checkpoint
from server_utils import FAKE_AWS_CREDENTIALS, ROOT, deploy_cli, sine_wav, tiny_checkpoint

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
ROLE = "arn:aws:iam::123456789012:role/s1-mini"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/s1-mini:1"


def row(id: str, code: int, name: str, *argv: str, env: dict[str, str] | None = None, marks: tuple = ()) -> object:
    return pytest.param(list(argv), env or {}, code, name, id=id, marks=marks)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The placeholders of the tables: the tiny checkpoint and a folder of bad files."""
    tmp = tmp_path_factory.mktemp("bad-cli")
    (tmp / "dir").mkdir()
    (tmp / "not-audio.wav").write_bytes(b"hello, not audio")
    (tmp / "empty.wav").write_bytes(sine_wav(0.05)[:44])
    (tmp / "voice.wav").write_bytes(sine_wav(0.05))
    (tmp / "pickle.npy").write_bytes(b"not an npy file")
    for name, codes in {"floats": np.zeros((4, 3), np.float32), "negative": -np.ones((4, 3), np.int64),
                        "too-big": np.full((4, 3), 10**6, np.int64), "3d": np.zeros((4, 3, 2), np.int64),
                        "three-books": np.zeros((3, 5), np.int64), "no-frames": np.zeros((4, 0), np.int64),
                        "good": np.ones((4, 3), np.int64)}.items():
        np.save(tmp / f"{name}.npy", codes)
    for name, text in {"cfg-list": "[1]", "cfg-broken": "{", "cfg-unknown": '{"foo": 1}',
                       "cfg-type": '{"n_layer": "x"}', "cfg-negative": '{"n_layer": -1}', "cfg-zero": '{"dim": 0}',
                       "cfg-codebooks": '{"num_codebooks": 3}', "req-broken": "{bad", "req-list": "[1]",
                       "bench": "not json"}.items():
        (tmp / f"{name}.json").write_text(text)
    (tmp / "cfg-latin1.json").write_bytes(b'{"dim": "\xe9"}')
    (tmp / "empty.jsonl").write_text("")
    (tmp / "blank-line.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    (tmp / "requests.jsonl").write_text('{"text": "a"}\n')
    (tmp / "model.tar.gz").write_bytes(b"not really an archive")
    return {"ckpt": str(tiny_checkpoint()), "tmp": str(tmp)}


def run_main(main: Callable[[list[str]], int], argv: list[str], files: dict[str, str],
             capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``main(argv)`` in-process: (exit status, stderr). argparse exits; our code returns."""
    argv = [arg.format(**files) for arg in argv]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def check(code: int, err: str, expected: int, name: str) -> None:
    assert code == expected, err
    assert name in err and "error" in err, err
    assert "Traceback" not in err


# ---------------------------------------------------------------- python -m s1_mini.synthesize

OUT_WAV = ("--out", "{tmp}/out.wav")
SYNTH = ("--checkpoint", "{ckpt}", "--text", "Hello.")
SYNTHESIZE = [
    row("nothing", 2, "--checkpoint"),
    row("no-out", 2, "--out", "--checkpoint", "{ckpt}", "--text", "Hello."),
    row("no-text", 2, "--text", "--checkpoint", "{ckpt}", *OUT_WAV),
    row("seed-word", 2, "--seed", *SYNTH, *OUT_WAV, "--seed", "x"),
    row("max-new-tokens-float", 2, "--max-new-tokens", *SYNTH, *OUT_WAV, "--max-new-tokens", "1.5"),
    row("temperature-word", 2, "--temperature", *SYNTH, *OUT_WAV, "--temperature", "hot"),
    row("precision", 2, "--precision", *SYNTH, *OUT_WAV, "--precision", "int8"),
    row("unknown-flag", 2, "--bogus", *SYNTH, *OUT_WAV, "--bogus"),
    row("out-folder", 2, "--out", *SYNTH, "--out", "{tmp}/dir"),
    row("out-extension", 2, "--out", *SYNTH, "--out", "{tmp}/out.txt"),
    row("out-no-extension", 2, "--out", *SYNTH, "--out", "{tmp}/out"),
    row("device", 2, "device", *SYNTH, *OUT_WAV, "--device", "tpu"),
    row("device-index", 2, "device", *SYNTH, *OUT_WAV, "--device", "cuda:abc"),
    row("max-new-tokens-one", 2, "max_new_tokens", *SYNTH, *OUT_WAV, "--max-new-tokens", "1"),
    row("checkpoint-missing", 2, "checkpoint", "--checkpoint", "{tmp}/missing", "--text", "Hello.", *OUT_WAV),
    row("reference-audio-missing", 2, "--reference-audio", *SYNTH, *OUT_WAV, "--reference-audio",
        "{tmp}/missing.wav", "--reference-text", "t"),
    row("reference-audio-folder", 2, "--reference-audio", *SYNTH, *OUT_WAV, "--reference-audio", "{tmp}/dir",
        "--reference-text", "t"),
    row("env-batch-size", 2, "S1_MINI_MAX_BATCH_SIZE", *SYNTH, *OUT_WAV, env={"S1_MINI_MAX_BATCH_SIZE": "x"}),
    row("env-timeout", 2, "request_timeout_seconds", *SYNTH, *OUT_WAV, env={"S1_MINI_REQUEST_TIMEOUT": "inf"}),
    # refused by the engine once started: exit 1 with the engine's "<field>: <rule>"
    row("text-empty", 1, "text", "--checkpoint", "{ckpt}", "--text", "", *OUT_WAV),
    row("temperature-nan", 1, "temperature", *SYNTH, *OUT_WAV, "--temperature", "nan"),
    row("seed-huge", 1, "seed", *SYNTH, *OUT_WAV, "--seed", str(2**70)),
    row("reference-text-alone", 1, "reference_text", *SYNTH, *OUT_WAV, "--reference-text", "t"),
    row("reference-audio-not-audio", 1, "reference_audio", *SYNTH, *OUT_WAV, "--reference-audio",
        "{tmp}/not-audio.wav", "--reference-text", "t"),
]


@pytest.mark.parametrize("argv, env, code, name", SYNTHESIZE)
def test_synthesize(argv, env, code, name, files, capsys, monkeypatch):
    monkeypatch.setenv("S1_MINI_WARMUP", "false")  # the rows that start the engine start it quickly
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    check(*run_main(synthesize.main, ["--device", "cpu", "--no-compile", *argv] if argv else [], files, capsys),
          code, name)
    assert not Path(files["tmp"], "out.wav").exists()


# ---------------------------------------------------------------- python -m s1_mini.generate

GEN = ("--checkpoint", "{ckpt}", "--text", "Hello.", "--out", "{tmp}/codes.npy", "--max-new-tokens", "4")
CODES = ("--reference-text", "what it says", "--reference-codes")
GENERATE = [
    row("nothing", 2, "--checkpoint"),
    row("seed-word", 2, "--seed", *GEN, "--seed", "x"),
    row("seed-huge", 2, "--seed", *GEN, "--seed", str(2**70)),
    row("seed-too-small", 2, "--seed", *GEN, "--seed", str(-(2**63) - 1)),
    row("device", 2, "--device", *GEN, "--device", "tpu"),
    row("device-cuda", 2, "--device", *GEN, "--device", "cuda", marks=(NO_CUDA,)),
    row("precision", 2, "--precision", *GEN, "--precision", "fp8"),
    row("top-p-nan", 2, "top_p", *GEN, "--top-p", "nan"),
    row("temperature-zero", 2, "temperature", *GEN, "--temperature", "0"),
    row("penalty-two", 2, "repetition_penalty", *GEN, "--repetition-penalty", "2"),
    row("max-new-tokens-negative", 2, "max_new_tokens", *GEN, "--max-new-tokens", "-1"),
    row("max-new-tokens-one", 2, "max_new_tokens", *GEN, "--max-new-tokens", "1"),
    row("reference-count", 2, "--reference-text", *GEN, "--reference-text", "a"),
    row("reference-codes-missing", 2, "--reference-codes", *GEN, *CODES, "{tmp}/missing.npy"),
    row("reference-codes-not-npy", 2, "--reference-codes", *GEN, *CODES, "{tmp}/pickle.npy"),
    row("reference-codes-floats", 2, "references[0].codes", *GEN, *CODES, "{tmp}/floats.npy"),
    row("reference-codes-negative", 2, "references[0].codes", *GEN, *CODES, "{tmp}/negative.npy"),
    row("reference-codes-too-big", 2, "references[0].codes", *GEN, *CODES, "{tmp}/too-big.npy"),
    row("reference-codes-3d", 2, "references[0].codes", *GEN, *CODES, "{tmp}/3d.npy"),
    row("reference-codes-books", 2, "references[0].codes", *GEN, *CODES, "{tmp}/three-books.npy"),
    row("reference-codes-no-frames", 2, "references[0].codes", *GEN, *CODES, "{tmp}/no-frames.npy"),
    row("checkpoint-missing", 2, "checkpoint", "--checkpoint", "{tmp}/missing", "--text", "Hello.", "--out",
        "{tmp}/codes.npy"),
    row("out-unwritable", 2, "--out", "--checkpoint", "{ckpt}", "--text", "Hello.", "--max-new-tokens", "4",
        "--out", "{tmp}/not-audio.wav/codes.npy"),
]


@pytest.mark.parametrize("argv, env, code, name", GENERATE)
def test_generate(argv, env, code, name, files, capsys):
    check(*run_main(generate.main, argv, files, capsys), code, name)


# ---------------------------------------------------------------- python -m s1_mini.codec (exit 1)

CODEC_OPTS = ("--checkpoint", "{ckpt}", "--out")
CODEC = [
    row("nothing", 2, "command"),
    row("unknown-command", 2, "command", "compress"),
    row("no-checkpoint", 2, "--checkpoint", "encode", "{tmp}/voice.wav", "--out", "{tmp}/c.npy"),
    row("precision", 2, "--precision", "encode", "{tmp}/voice.wav", *CODEC_OPTS, "{tmp}/c.npy", "--precision", "fp8"),
    row("encode-missing", 1, "input", "encode", "{tmp}/missing.wav", *CODEC_OPTS, "{tmp}/c.npy"),
    row("encode-folder", 1, "input", "encode", "{tmp}/dir", *CODEC_OPTS, "{tmp}/c.npy"),
    row("encode-not-audio", 1, "input", "encode", "{tmp}/not-audio.wav", *CODEC_OPTS, "{tmp}/c.npy"),
    row("encode-no-samples", 1, "input", "encode", "{tmp}/empty.wav", *CODEC_OPTS, "{tmp}/c.npy"),
    row("encode-out-folder", 1, "--out", "encode", "{tmp}/voice.wav", *CODEC_OPTS, "{tmp}/dir"),
    row("encode-out-unwritable", 1, "--out", "encode", "{tmp}/voice.wav", *CODEC_OPTS, "{tmp}/not-audio.wav/c.npy"),
    row("decode-not-npy", 1, "input", "decode", "{tmp}/pickle.npy", *CODEC_OPTS, "{tmp}/c.wav"),
    row("decode-floats", 1, "input", "decode", "{tmp}/floats.npy", *CODEC_OPTS, "{tmp}/c.wav"),
    row("decode-negative", 1, "input", "decode", "{tmp}/negative.npy", *CODEC_OPTS, "{tmp}/c.wav"),
    row("decode-3d", 1, "input", "decode", "{tmp}/3d.npy", *CODEC_OPTS, "{tmp}/c.wav"),
    row("decode-books", 1, "input", "decode", "{tmp}/three-books.npy", *CODEC_OPTS, "{tmp}/c.wav"),
    row("decode-out-extension", 1, "--out", "decode", "{tmp}/good.npy", *CODEC_OPTS, "{tmp}/c.txt"),
    row("decode-out-folder", 1, "--out", "decode", "{tmp}/good.npy", *CODEC_OPTS, "{tmp}/dir"),
    row("device", 1, "--device", "decode", "{tmp}/good.npy", *CODEC_OPTS, "{tmp}/c.wav", "--device", "tpu:x"),
    row("device-cuda", 1, "--device", "decode", "{tmp}/good.npy", *CODEC_OPTS, "{tmp}/c.wav", "--device", "cuda",
        marks=(NO_CUDA,)),
    row("checkpoint-empty", 1, "--checkpoint", "decode", "{tmp}/good.npy", "--checkpoint", "{tmp}/dir", "--out",
        "{tmp}/c.wav"),
]


@pytest.mark.parametrize("argv, env, code, name", CODEC)
def test_codec(argv, env, code, name, files, capsys):
    check(*run_main(codec_cli.main, argv, files, capsys), code, name)


# ---------------------------------------------------------------- python -m s1_mini.testing.make_checkpoint

MAKE = ("--preset", "tiny", "--out", "{tmp}/made")
MAKE_CHECKPOINT = [
    row("nothing", 2, "--preset"),
    row("preset", 2, "--preset", "--preset", "huge", "--out", "{tmp}/made"),
    row("seed-word", 2, "--seed", *MAKE, "--seed", "x"),
    row("seed-huge", 2, "--seed", *MAKE, "--seed", str(2**70)),
    row("config-missing", 2, "--config-json", *MAKE, "--config-json", "{tmp}/missing.json"),
    row("config-broken", 2, "--config-json", *MAKE, "--config-json", "{tmp}/cfg-broken.json"),
    row("config-latin1", 2, "--config-json", *MAKE, "--config-json", "{tmp}/cfg-latin1.json"),
    row("config-list", 2, "--config-json", *MAKE, "--config-json", "{tmp}/cfg-list.json"),
    row("config-folder", 2, "--config-json", *MAKE, "--config-json", "{tmp}/dir"),
    row("config-unknown-key", 2, "foo", *MAKE, "--config-json", "{tmp}/cfg-unknown.json"),
    row("config-type", 2, "n_layer", *MAKE, "--config-json", "{tmp}/cfg-type.json"),
    row("config-negative", 2, "n_layer", *MAKE, "--config-json", "{tmp}/cfg-negative.json"),
    row("config-zero", 2, "dim", *MAKE, "--config-json", "{tmp}/cfg-zero.json"),
    row("config-codebooks", 2, "num_codebooks", *MAKE, "--config-json", "{tmp}/cfg-codebooks.json"),
    row("out-is-a-file", 2, "--out", "--preset", "tiny", "--out", "{tmp}/not-audio.wav"),
]


@pytest.mark.parametrize("argv, env, code, name", MAKE_CHECKPOINT)
def test_make_checkpoint(argv, env, code, name, files, capsys):
    check(*run_main(make_checkpoint.main, argv, files, capsys), code, name)
    assert not Path(files["tmp"], "made").exists()


# ---------------------------------------------------------------- python -m s1_mini.server (before it listens)

SERVER = [
    row("port-word", 2, "--port", "--port", "x"),
    row("port-too-big", 2, "port", "--port", "70000"),
    row("port-negative", 2, "port", "--port", "-1"),
    row("body-zero", 2, "max_body_mb", "--max-body-mb", "0"),
    row("body-negative", 2, "max_body_mb", "--max-body-mb", "-1"),
    row("body-nan", 2, "max_body_mb", "--max-body-mb", "nan"),
    row("body-inf", 2, "max_body_mb", "--max-body-mb", "inf"),
    row("streams-negative", 2, "max_concurrent_streams", "--max-concurrent-streams", "-1"),
    row("api-key-empty", 2, "api_key", "--api-key", ""),
    row("api-key-spaces", 2, "api_key", "--api-key", "   "),
    row("device", 2, "device", "--device", "tpu"),
    row("precision", 2, "--precision", "--precision", "half"),
    row("compile-backend", 2, "--compile-backend", "--compile-backend", "tensorrt"),
    row("batch-zero", 2, "max_batch_size", "--max-batch-size", "0"),
    row("batch-word", 2, "--max-batch-size", "--max-batch-size", "many"),
    row("seq-len-negative", 2, "max_seq_len", "--max-seq-len", "-3"),
    row("prefix-cache-negative", 2, "prefix_cache_size", "--prefix-cache-size", "-1"),
    row("compile-cache-empty", 2, "compile_cache_dir", "--compile-cache-dir", ""),
    row("max-new-tokens-one", 2, "max_new_tokens", "--max-new-tokens", "1"),
    row("text-length-zero", 2, "max_text_length", "--max-text-length", "0"),
    row("queue-negative", 2, "max_queue_size", "--max-queue-size", "-1"),
    row("timeout-zero", 2, "request_timeout_seconds", "--request-timeout", "0"),
    row("timeout-nan", 2, "request_timeout_seconds", "--request-timeout", "nan"),
    row("timeout-inf", 2, "request_timeout_seconds", "--request-timeout", "inf"),
    row("log-level", 2, "--log-level", "--log-level", "loud"),
    row("unknown-flag", 2, "--bogus", "--bogus"),
    row("env-port", 2, "S1_MINI_PORT", env={"S1_MINI_PORT": "abc"}),
    row("env-body", 2, "S1_MINI_MAX_BODY_MB", env={"S1_MINI_MAX_BODY_MB": "big"}),
    row("env-log-level", 2, "log_level", env={"S1_MINI_LOG_LEVEL": "loud"}),
    row("env-retry-after", 2, "retry_after_s", env={"S1_MINI_RETRY_AFTER_S": "-1"}),
    row("env-batch-float", 2, "S1_MINI_MAX_BATCH_SIZE", env={"S1_MINI_MAX_BATCH_SIZE": "2.5"}),
    row("env-compile", 2, "S1_MINI_COMPILE", env={"S1_MINI_COMPILE": "sometimes"}),
]


@pytest.mark.parametrize("argv, env, code, name", SERVER)
def test_server(argv, env, code, name, files, capsys, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    check(*run_main(server_cli.main, argv, files, capsys), code, name)


# ---------------------------------------------------------------- python -m s1_mini.sagemaker.serve (before it listens)

SERVE = [
    row("command", 2, "command", "train"),
    row("server", 2, "--server", "--server", "tf"),
    row("port-word", 2, "--port", "--port", "x"),
    row("env-server", 2, "--server", env={"S1_MINI_SAGEMAKER_SERVER": "tf"}),
    row("unknown-flag", 2, "--bogus", "--bogus"),
]


@pytest.mark.parametrize("argv, env, code, name", SERVE)
def test_serve(argv, env, code, name, files, capsys, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    check(*run_main(serve.main, argv, files, capsys), code, name)


@pytest.mark.parametrize("argv, env", [(["--port", "70000"], {}), ([], {"SAGEMAKER_BIND_TO_PORT": "abc"})],
                         ids=["port-too-big", "env-port-word"])
def test_serve_port_is_checked_before_start(argv, env, files):
    # a real process: were the port accepted, the server would start (here with no model)
    result = subprocess.run([sys.executable, "-m", "s1_mini.sagemaker.serve", *argv], capture_output=True, text=True,
                            env={**os.environ, **env, "SAGEMAKER_BASE_DIR": files["tmp"]}, cwd=ROOT, timeout=120)
    check(result.returncode, result.stderr, 2, "port")


# ---------------------------------------------------------------- python -m s1_mini.deploy <step> (--dry-run)

CHECKPOINT = ("--checkpoint", "{ckpt}")
UP = ("--file", "{tmp}/model.tar.gz", "--dry-run")
REG = ("--group", "s1-mini", "--image-uri", IMAGE, "--model-data-url", "s3://models/m.tar.gz", "--dry-run")
DEP = ("--endpoint-name", "s1-mini", "--role-arn", ROLE, "--model-package-arn", "arn:aws:sagemaker:x", "--dry-run")
ASYNC = ("--endpoint", "s1-mini", "--text", "Hello.", "--upload-prefix", "s3://models/in", "--dry-run")
BATCH = ("--input", "{tmp}/requests.jsonl", "--s3-prefix", "s3://models/batch", "--model", "m", "--dry-run")
DEPLOY = [
    row("no-step", 2, "SUBCOMMAND"),
    row("unknown-step", 2, "SUBCOMMAND", "launch"),
    row("endpoint-url", 2, "endpoint-url", "upload", "--s3-uri", "s3://models/m", *UP, "--endpoint-url", "not a url"),
    row("runtime-endpoint-url", 2, "runtime-endpoint-url", "invoke", "--endpoint", "e", "--text", "hi", "--dry-run",
        "--runtime-endpoint-url", "ftp://x"),
    # the region is checked when the first client is made: not in a dry run (no call leaves: it is refused first)
    row("region", 2, "region", "upload", "--s3-uri", "s3://models/m", "--file", "{tmp}/model.tar.gz", "--region",
        "not/a/region"),
    row("profile", 2, "profile", "upload", "--s3-uri", "s3://models/m", *UP, "--profile", "no-such-profile"),
    # package
    row("package-no-checkpoint", 2, "--checkpoint", "package"),
    row("package-checkpoint-missing", 2, "checkpoint", "package", "--checkpoint", "{tmp}/missing"),
    row("package-checkpoint-file", 2, "checkpoint", "package", "--checkpoint", "{tmp}/voice.wav"),
    row("package-compresslevel", 2, "compresslevel", "package", *CHECKPOINT, "--compresslevel", "11"),
    row("package-compresslevel-word", 2, "--compresslevel", "package", *CHECKPOINT, "--compresslevel", "max"),
    row("package-output-folder", 2, "output", "package", *CHECKPOINT, "--output", "{tmp}/dir", "--no-verify"),
    row("package-output-nowhere", 2, "output", "package", *CHECKPOINT, "--output", "{tmp}/missing/m.tar.gz"),
    row("package-code-dir", 2, "code_dir", "package", *CHECKPOINT, "--code-dir", "{tmp}/dir", "--output",
        "{tmp}/m.tar.gz", "--no-verify"),
    row("package-requirements", 2, "requirements", "package", *CHECKPOINT, "--requirements", "{tmp}/missing.txt",
        "--output", "{tmp}/m.tar.gz", "--no-verify"),
    # upload
    row("upload-no-uri", 2, "--s3-uri", "upload", *UP),
    row("upload-http-uri", 2, "s3 uri", "upload", "--s3-uri", "http://models/m", *UP),
    row("upload-empty-uri", 2, "s3 uri", "upload", "--s3-uri", "s3://", *UP),
    row("upload-bucket-name", 2, "s3 uri", "upload", "--s3-uri", "s3://Bad_Bucket/m", *UP),
    row("upload-file-missing", 2, "file", "upload", "--s3-uri", "s3://models/m", "--file", "{tmp}/missing", "--dry-run"),
    row("upload-file-folder", 2, "file", "upload", "--s3-uri", "s3://models/m", "--file", "{tmp}/dir", "--dry-run"),
    row("upload-chunk", 2, "chunk_mb", "upload", "--s3-uri", "s3://models/m", *UP, "--chunk-mb", "1"),
    row("upload-concurrency", 2, "max_concurrency", "upload", "--s3-uri", "s3://models/m", *UP,
        "--max-concurrency", "0"),
    # register
    row("register-group", 2, "group", "register", *REG[2:], "--group", "bad group!"),
    row("register-data-url", 2, "model_data_url", "register", *REG[:4], "--model-data-url", "http://x", "--dry-run"),
    row("register-approval", 2, "--approval", "register", *REG, "--approval", "Yes"),
    row("register-env", 2, "env", "register", *REG, "--env", "NOEQUALS"),
    row("register-env-value", 2, "S1_MINI_MAX_BATCH_SIZE", "register", *REG, "--env", "S1_MINI_MAX_BATCH_SIZE=x"),
    row("register-env-unknown", 2, "S1_MINI_FOO", "register", *REG, "--env", "S1_MINI_FOO=1"),
    row("register-metadata", 2, "metadata", "register", *REG, "--metadata", "=x"),
    row("register-benchmark-json", 2, "benchmark_json", "register", *REG, "--benchmark-json", "{tmp}/bench.json"),
    row("register-benchmark-missing", 2, "benchmark_json", "register", *REG, "--benchmark-json",
        "{tmp}/missing.json"),
    row("register-instance-type", 2, "instance_type", "register", *REG, "--realtime-instance-type", "ml.t2.medium"),
    # deploy
    row("deploy-no-role", 2, "role_arn", "deploy", "--endpoint-name", "e", "--dry-run"),
    row("deploy-endpoint-name", 2, "endpoint_name", "deploy", *DEP, "--endpoint-name", "bad name!"),
    row("deploy-role", 2, "role_arn", "deploy", *DEP, "--role-arn", "not-an-arn"),
    row("deploy-no-model", 2, "model", "deploy", "--endpoint-name", "e", "--role-arn", ROLE, "--dry-run"),
    row("deploy-two-models", 2, "model", "deploy", *DEP, "--image-uri", IMAGE),
    row("deploy-instance-type", 2, "instance_type", "deploy", *DEP, "--instance-type", "ml.m5.large"),
    row("deploy-instance-count", 2, "instance_count", "deploy", *DEP, "--instance-count", "0"),
    row("deploy-serverless", 2, "serverless", "deploy", *DEP, "--serverless"),
    row("deploy-precision", 2, "precision", "deploy", *DEP, "--precision", "int8"),
    row("deploy-max-new-tokens", 2, "max_new_tokens", "deploy", *DEP, "--max-new-tokens", "1"),
    row("deploy-kv-nan", 2, "kv_cache_gb", "deploy", *DEP, "--kv-cache-gb", "nan"),
    row("deploy-request-timeout", 2, "request_timeout_seconds", "deploy", *DEP, "--request-timeout", "-1"),
    row("deploy-async-path", 2, "async_output_path", "deploy", *DEP, "--async-output-path", "http://x"),
    row("deploy-async-concurrency", 2, "async_max_concurrent", "deploy", *DEP, "--async-output-path",
        "s3://models/out", "--async-max-concurrent", "0"),
    row("deploy-canary-step", 2, "blue_green", "deploy", *DEP, "--traffic-routing", "canary"),
    row("deploy-linear-step", 2, "blue_green", "deploy", *DEP, "--traffic-routing", "linear",
        "--traffic-step-percent", "150"),
    row("deploy-traffic-wait", 2, "traffic_wait_seconds", "deploy", *DEP, "--traffic-routing", "all-at-once",
        "--traffic-wait-seconds", "-5"),
    row("deploy-routing", 2, "--traffic-routing", "deploy", *DEP, "--traffic-routing", "sideways"),
    row("deploy-tag", 2, "tag", "deploy", *DEP, "--tag", "novalue"),
    row("deploy-timeout", 2, "timeout", "deploy", *DEP, "--timeout", "0"),
    row("deploy-poll-nan", 2, "poll", "deploy", *DEP, "--poll", "nan"),
    # autoscale
    row("autoscale-min-max", 2, "instances", "autoscale", "--endpoint-name", "e", "--min-instances", "3",
        "--max-instances", "2", "--dry-run"),
    row("autoscale-target-zero", 2, "target", "autoscale", "--endpoint-name", "e", "--target", "0", "--dry-run"),
    row("autoscale-target-nan", 2, "target", "autoscale", "--endpoint-name", "e", "--target", "nan", "--dry-run"),
    row("autoscale-target-inf", 2, "target", "autoscale", "--endpoint-name", "e", "--target", "inf", "--dry-run"),
    row("autoscale-cooldown", 2, "cooldown", "autoscale", "--endpoint-name", "e", "--scale-in-cooldown", "-1",
        "--dry-run"),
    row("autoscale-metric", 2, "--metric", "autoscale", "--endpoint-name", "e", "--metric", "cpu", "--dry-run"),
    # invoke
    row("invoke-no-text", 2, "request", "invoke", "--endpoint", "e", "--dry-run"),
    row("invoke-text-and-request", 2, "request", "invoke", "--endpoint", "e", "--text", "hi", "--request",
        "{tmp}/req-list.json", "--dry-run"),
    row("invoke-request-broken", 2, "request", "invoke", "--endpoint", "e", "--request", "{tmp}/req-broken.json",
        "--dry-run"),
    row("invoke-request-list", 2, "request", "invoke", "--endpoint", "e", "--request", "{tmp}/req-list.json",
        "--dry-run"),
    row("invoke-request-missing", 2, "request", "invoke", "--endpoint", "e", "--request", "{tmp}/missing.json",
        "--dry-run"),
    row("invoke-text-empty", 2, "text", "invoke", "--endpoint", "e", "--text", "", "--dry-run"),
    row("invoke-format", 2, "--format", "invoke", "--endpoint", "e", "--text", "hi", "--format", "aac", "--dry-run"),
    row("invoke-out-folder", 2, "out", "invoke", "--endpoint", "e", "--text", "hi", "--out", "{tmp}/dir",
        "--dry-run"),
    row("invoke-out-nowhere", 2, "out", "invoke", "--endpoint", "e", "--text", "hi", "--out", "{tmp}/missing/a.wav",
        "--dry-run"),
    # invoke-async
    row("async-no-prefix", 2, "upload-prefix", "invoke-async", "--endpoint", "e", "--text", "hi", "--dry-run"),
    row("async-input-location", 2, "input-location", "invoke-async", "--endpoint", "e", "--input-location",
        "http://x", "--dry-run"),
    row("async-both-inputs", 2, "input-location", "invoke-async", *ASYNC, "--input-location", "s3://models/r.json"),
    row("async-invocation-timeout", 2, "invocation-timeout", "invoke-async", *ASYNC, "--invocation-timeout", "0"),
    row("async-invocation-timeout-big", 2, "invocation-timeout", "invoke-async", *ASYNC, "--invocation-timeout",
        "99999"),
    row("async-poll", 2, "poll", "invoke-async", *ASYNC, "--wait", "--poll", "0"),
    row("async-timeout-nan", 2, "timeout", "invoke-async", *ASYNC, "--wait", "--timeout", "nan"),
    # batch
    row("batch-input-missing", 2, "input", "batch", *BATCH[2:], "--input", "{tmp}/missing.jsonl"),
    row("batch-input-folder", 2, "input", "batch", *BATCH[2:], "--input", "{tmp}/dir"),
    row("batch-input-empty", 2, "input", "batch", *BATCH[2:], "--input", "{tmp}/empty.jsonl"),
    row("batch-input-blank-line", 2, "input", "batch", *BATCH[2:], "--input", "{tmp}/blank-line.jsonl"),
    row("batch-prefix", 2, "s3-prefix", "batch", *BATCH[:2], "--s3-prefix", "http://x", "--model", "m", "--dry-run"),
    row("batch-no-model", 2, "model", "batch", *BATCH[:4], "--dry-run"),
    row("batch-payload", 2, "max-payload-mb", "batch", *BATCH, "--max-payload-mb", "0"),
    row("batch-concurrency", 2, "max-concurrent-transforms", "batch", *BATCH, "--max-concurrent-transforms", "0"),
    row("batch-instance-count", 2, "instance-count", "batch", *BATCH, "--instance-count", "0"),
    row("batch-job-name", 2, "job-name", "batch", *BATCH, "--job-name", "bad name!"),
    row("batch-container-url", 2, "local-container-url", "batch", *BATCH[:4], "--local-container-url", "ftp://x",
        "--dry-run"),
    row("batch-invocation-timeout", 2, "invocation-timeout", "batch", *BATCH, "--invocation-timeout", "0"),
    row("batch-poll", 2, "poll", "batch", *BATCH, "--poll", "-1"),
    row("batch-env", 2, "env", "batch", *BATCH, "--env", "X"),
    # teardown
    row("teardown-endpoint-name", 2, "endpoint_name", "teardown", "--endpoint-name", "", "--yes", "--dry-run"),
    row("teardown-timeout", 2, "timeout", "teardown", "--endpoint-name", "e", "--yes", "--timeout", "-1",
        "--dry-run"),
    row("teardown-no-endpoint", 2, "--endpoint-name", "teardown", "--yes", "--dry-run"),
]


@pytest.mark.parametrize("argv, env, code, name", DEPLOY)
def test_deploy(argv, env, code, name, files, capsys, monkeypatch):
    for key, value in FAKE_AWS_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    check(*run_main(deploy_cli_main.main, argv, files, capsys), code, name)


# ---------------------------------------------------------------- real processes: exit status, no traceback

PROCESSES = [  # (module, argv, expected exit status, name in stderr)
    ("s1_mini.synthesize", ["--checkpoint", "{ckpt}", "--text", "hi", "--out", "{tmp}/dir"], 2, "--out"),
    ("s1_mini.generate", ["--checkpoint", "{ckpt}", "--text", "hi", "--out", "{tmp}/c.npy", "--device", "tpu"], 2,
     "--device"),
    ("s1_mini.codec", ["decode", "{tmp}/floats.npy", "--checkpoint", "{ckpt}", "--out", "{tmp}/c.wav"], 1, "input"),
    ("s1_mini.testing.make_checkpoint", ["--preset", "tiny", "--out", "{tmp}/made", "--seed", str(2**70)], 2,
     "--seed"),
    ("s1_mini.server", ["--max-body-mb", "inf"], 2, "max_body_mb"),
    ("s1_mini.sagemaker.serve", ["--server", "tf"], 2, "--server"),
]


def test_real_processes_exit_with_the_status_and_no_traceback(files):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

    def run(entry: tuple[str, list[str], int, str]) -> tuple[subprocess.CompletedProcess, int, str]:
        module, argv, code, name = entry
        argv = [arg.format(**files) for arg in argv]
        result = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, env=env,
                                cwd=ROOT, timeout=120)
        return result, code, name

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, PROCESSES))
    deploy = deploy_cli("upload", "--s3-uri", "s3://models/m", "--file", f"{files['tmp']}/model.tar.gz",
                        "--endpoint-url", "not a url", "--dry-run", timeout=120)
    for result, code, name in [*results, (deploy, 2, "endpoint-url")]:
        check(result.returncode, result.stderr, code, name)
        assert len(result.stderr.strip().splitlines()) <= 3, result.stderr  # a message, not a dump


def test_request_files_in_the_deploy_cli_are_json_objects(files, capsys, monkeypatch):
    # the invoke step reads --request as the /v1/tts body: a valid one passes the checks above
    for key, value in FAKE_AWS_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    request = Path(files["tmp"], "good-request.json")
    request.write_text(json.dumps({"text": "Hello."}))
    code, err = run_main(deploy_cli_main.main, ["invoke", "--endpoint", "e", "--request", str(request), "--out",
                                                f"{files['tmp']}/a.wav", "--dry-run"], files, capsys)
    assert code == 0 and not err
