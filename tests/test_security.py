"""Security checks that need no running server (RELIABILITY.md, "Security"):

1. weights are read only with ``weights_only=True``: a checkpoint holding a malicious
   pickle is refused, naming the file, through every loader, and nothing runs; an AST
   scan of ``s1_mini/`` and ``code/`` keeps every ``torch.load`` at ``weights_only=True``
   and every other pickle door closed;
2. voice ids never escape the registry directory (property test of ``VoiceRegistry``);
3. the Python API's limits (text length; the reference-audio duration limit is missing);
4. the API key comparison goes through ``hmac.compare_digest`` (AST);
5. the container runs as a non-root user that owns the ``/opt/ml`` it needs.

The live HTTP server, SageMaker front and deploy CLI are in ``test_security_http.py``.
"""

from __future__ import annotations

import ast
import io
import os
import pickle
import re
import shutil
import shlex
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s1_mini.checkpoint import CheckpointError, read_state_dict
from s1_mini.codec import Codec
from s1_mini.config import EngineConfig
from s1_mini.deploy.aws import DeployError
from s1_mini.deploy.package import package_model
from s1_mini.engine import ProductionTTSEngine
from s1_mini.model import load_text2semantic
from s1_mini.testing.make_checkpoint import make_checkpoint
from s1_mini.voices import InvalidVoiceId, VoiceRegistry
from server_utils import ROOT, free_port, sine_wav

PRODUCT_DIRS = (ROOT / "s1_mini", ROOT / "code")
DOCKERFILE = ROOT / "container" / "Dockerfile"
VOICE_ID_RULE = re.compile(r"[A-Za-z0-9_-]{1,64}")


# ============================================================== 1. weights_only


class RunsShell:
    """Pickles as a call to ``os.system``: plain ``pickle.load`` would run the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class OpensFile:
    """Pickles as ``open(path, "w")``: plain ``pickle.load`` would create the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _payload(marker: Path) -> dict:
    # A weight-looking mapping whose unpickling runs both payloads (each makes the marker).
    return {"state_dict": {"w": torch.zeros(2)}, "shell": RunsShell(f"touch {shlex.quote(str(marker))}"),
            "open": OpensFile(str(marker))}


def write_malicious(path: Path, marker: Path, form: str) -> None:
    """A weight file in one of the forms torch.load meets: the zip container of
    torch.save, the legacy (pre-1.6) torch.save stream, or a bare pickle."""
    if form == "zip":
        torch.save(_payload(marker), path)
    elif form == "legacy":
        torch.save(_payload(marker), path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(_payload(marker)))


FORMS = ("zip", "legacy", "raw-pickle")


@pytest.fixture(scope="module")
def clean_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("clean") / "ckpt", "tiny", seed=0)


@pytest.fixture
def poisoned(clean_checkpoint, tmp_path, request):
    """(checkpoint dir whose ``request.param[0]`` is malicious in form ``[1]``, marker path)."""
    name, form = request.param
    checkpoint = Path(shutil.copytree(clean_checkpoint, tmp_path / "ckpt"))
    marker = tmp_path / "PWNED"
    write_malicious(checkpoint / name, marker, form)
    return checkpoint, checkpoint / name, marker


CASES = [(name, form) for name in ("model.pth", "codec.pth") for form in FORMS]


def test_the_payloads_run_under_plain_pickle(tmp_path):
    """Control: the files the refusal tests use really execute code when loaded unsafely."""
    for form in ("zip", "raw-pickle"):
        marker = tmp_path / f"ran-{form}"
        path = tmp_path / f"{form}.pth"
        write_malicious(path, marker, form)
        if form == "zip":
            torch.load(path, weights_only=False)
        else:
            pickle.loads(path.read_bytes())
        assert marker.exists(), form


@pytest.mark.parametrize("poisoned", CASES, indirect=True, ids=[f"{n}-{f}" for n, f in CASES])
def test_malicious_weight_file_is_refused_by_every_loader(poisoned):
    checkpoint, bad_file, marker = poisoned
    with pytest.raises(CheckpointError) as raised:
        read_state_dict(bad_file)
    assert str(bad_file) in str(raised.value)

    if bad_file.name == "model.pth":
        with pytest.raises(CheckpointError, match=re.escape(str(bad_file))):
            load_text2semantic(checkpoint)
    else:
        with pytest.raises(CheckpointError, match=re.escape(str(bad_file))):
            Codec.from_checkpoint(checkpoint, device="cpu")

    config = EngineConfig(checkpoint_path=str(checkpoint), device="cpu", precision="float32",
                          compile_model=False, warmup=False)
    with pytest.raises(CheckpointError, match=re.escape(str(bad_file))):
        ProductionTTSEngine(config).start()

    # the deploy tooling verifies weights before packaging them
    with pytest.raises(DeployError, match=re.escape(bad_file.name)):
        package_model(checkpoint, checkpoint.parent / "model.tar.gz", progress=False)
    assert not (checkpoint.parent / "model.tar.gz").exists()
    assert not marker.exists(), "the pickle payload ran"


@pytest.mark.parametrize("poisoned", [("model.pth", "zip"), ("codec.pth", "zip")], indirect=True,
                         ids=["model.pth", "codec.pth"])
def test_http_server_refuses_to_start_on_a_malicious_checkpoint(poisoned):
    import subprocess
    import sys

    checkpoint, bad_file, marker = poisoned
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "s1_mini.server", "--checkpoint", str(checkpoint),
                           "--host", "127.0.0.1", "--port", str(free_port()), "--device", "cpu",
                           "--precision", "float32", "--no-compile"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=checkpoint.parent)
    assert done.returncode != 0, done.stderr
    assert "error: loading the models failed" in done.stderr and str(bad_file) in done.stderr
    assert not marker.exists(), "the pickle payload ran"


# ---------------------------------------------------------------- the AST scan


PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """Every way ``source`` could unpickle data, except ``torch.load(..., weights_only=True)``
    and ``np.load`` without ``allow_pickle=True``: one line per finding."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> module it stands for (import torch as t)
    findings = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if a.name.split(".")[0] in PICKLE_MODULES:
                    findings.append(f"{filename}:{node.lineno}: imports {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            for a in node.names:
                if root in PICKLE_MODULES:
                    findings.append(f"{filename}:{node.lineno}: imports from {node.module}")
                elif (root, a.name) in {("torch", "load"), ("numpy", "load"), ("yaml", "load"),
                                        ("yaml", "unsafe_load"), ("torch.serialization", "load")}:
                    # a bare load() hides which loader runs; the scan wants the module prefix
                    findings.append(f"{filename}:{node.lineno}: from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if not name or "." not in name:
            continue
        head, _, rest = name.partition(".")
        name = f"{aliases.get(head, head)}.{rest}"
        where = f"{filename}:{node.lineno}: {name}"
        if name in ("torch.load", "torch.serialization.load"):
            flag = _keyword(node, "weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                findings.append(f"{where} without weights_only=True")
        elif name in ("numpy.load", "numpy.lib.format.read_array"):
            flag = _keyword(node, "allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                findings.append(f"{where} with allow_pickle other than False")
        elif name in ("yaml.load", "yaml.unsafe_load", "pandas.read_pickle", "torch.jit.load"):
            findings.append(where)
    return findings


def _product_sources() -> list[Path]:
    return sorted(p for d in PRODUCT_DIRS for p in d.rglob("*.py"))


def test_scan_flags_every_unsafe_form():
    """The scanner itself: each unsafe spelling is found, the safe ones are not."""
    unsafe = {
        "import torch\ntorch.load(p)": "without weights_only=True",
        "import torch\ntorch.load(p, weights_only=False)": "without weights_only=True",
        "import torch as t\nt.load(p, weights_only=flag)": "without weights_only=True",
        "from torch import load\nload(p, weights_only=True)": "from torch import load",
        "import numpy as np\nnp.load(p, allow_pickle=True)": "allow_pickle",
        "import pickle\npickle.loads(b)": "imports pickle",
        "from joblib import load": "imports from joblib",
        "import yaml\nyaml.load(s)": "yaml.load",
    }
    for source, expected in unsafe.items():
        findings = unsafe_loads(source)
        assert any(expected in f for f in findings), (source, findings)
    safe = ("import torch\ntorch.load(p, map_location='cpu', weights_only=True)\n"
            "import numpy as np\nnp.load(p)\nnp.load(p, allow_pickle=False)\n")
    assert unsafe_loads(safe) == []


def test_product_never_unpickles_untrusted_data():
    sources = _product_sources()
    assert len(sources) > 30  # the scan sees the whole product
    findings = [f for path in sources for f in unsafe_loads(path.read_text(), str(path.relative_to(ROOT)))]
    assert findings == []
    # and it really met the loaders it guards (so an empty result is not a blind scan)
    text = {path: path.read_text() for path in sources}
    assert any("torch.load(" in t for t in text.values()) and any("np.load(" in t for t in text.values())


# ============================================================== 2. voice ids stay inside


SEPARATORS = ["/", "\\", "\0", ":", "\u2215", "\u2044", "\uff0f", "\uff3c", "\u29f8", "\u2024", "\uff0e", ".",
              "\n", " ", "%2f", "%00"]
# {abs} and {parent} become absolute paths inside the test's own temporary tree, so an
# escape through them would land where the test looks.
NASTY_IDS = ["../victim", "..", ".", "...", "/", "/etc/passwd", "{abs}", "{abs}/x", "{parent}/victim",
             "a/b", "a\\b", "..\\victim", "C:\\victim", "C:victim", "a:b", "a\0b", "\0", "victim\n", "\u2215victim",
             "\u2044victim", "\uff0fvictim", "\uff0e\uff0e", "\u2024\u2024", "\u202evictim", "x" * 65, "x" * 255,
             "x" * 4096, "x" * 100_000, "", " ", "a b", "é", "%2e%2e%2fvictim", "~", "~root", "\\\\server\\share",
             "victim.npz", ".hidden", "-", "_", "x" * 64, "CON", "NUL", "aux"]


def voice_id_strategy() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(NASTY_IDS),
        st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),  # valid ids: they must land inside
        st.text(max_size=80),
        st.lists(st.sampled_from(SEPARATORS + list("aZ09_-~{}")), max_size=24).map("".join),
        st.builds(lambda a, sep, b: a + sep + b, st.text(max_size=6), st.sampled_from(SEPARATORS),
                  st.sampled_from(["victim", "..", "", "x"])),
    )


def expand(voice_id: str, sentinel: Path) -> str:
    return voice_id.replace("{abs}", str(sentinel / "escaped")).replace("{parent}", str(sentinel))


def confined(sentinel: Path, voice_dir: Path, outside: set[str]) -> list[str]:
    """Every file under ``sentinel`` that is not inside ``voice_dir`` (resolved) and not one
    of the pre-existing ``outside`` names; links anywhere count too."""
    inside = os.path.realpath(voice_dir)
    strays = []
    for parent, dirs, files in os.walk(sentinel):
        for name in dirs + files:
            path = os.path.join(parent, name)
            real = os.path.realpath(path)
            if os.path.islink(path):
                strays.append(f"link {path}")
            elif real != inside and not real.startswith(inside + os.sep) and \
                    os.path.relpath(path, sentinel) not in outside:
                strays.append(path)
    return strays


def fake_encoder(audio, sample_rate) -> np.ndarray:
    return np.arange(8, dtype=np.int64).reshape(2, 4)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_id=voice_id_strategy())
def test_registry_ids_never_escape_the_directory(raw_id):
    with tempfile.TemporaryDirectory() as root:
        sentinel = Path(root)
        voice_dir = sentinel / "voices"
        (sentinel / "victim.npz").write_bytes(b"keep")
        voice_id = expand(raw_id, sentinel)
        registry = VoiceRegistry(voice_dir, fake_encoder)
        valid = VOICE_ID_RULE.fullmatch(voice_id) is not None
        try:
            registry.register(voice_id, b"audio bytes", "hello")
        except InvalidVoiceId as exc:
            assert not valid, exc
            assert str(exc).startswith("voice_id: must match [A-Za-z0-9_-]{1,64}"), exc
        else:
            assert valid, f"registered {voice_id!r}"
            stored = voice_dir / f"{voice_id}.npz"
            assert os.path.dirname(os.path.realpath(stored)) == os.path.realpath(voice_dir)
            assert sorted(os.listdir(voice_dir)) == [stored.name]
        assert confined(sentinel, voice_dir, {"victim.npz"}) == []
        if valid:
            assert registry.get(voice_id).id == voice_id
            registry.delete(voice_id)
        else:
            for action in (registry.get, registry.delete):
                with pytest.raises(InvalidVoiceId):
                    action(voice_id)
        assert (sentinel / "victim.npz").read_bytes() == b"keep"
        assert os.listdir(voice_dir) == []  # a valid id was deleted again, from inside
        assert confined(sentinel, voice_dir, {"victim.npz"}) == []


# ============================================================== 3. the Python API's limits


def wav_seconds(seconds: float, rate: int = 8000) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(seconds * rate), dtype=np.float32), rate, format="WAV")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def engine(clean_checkpoint):
    config = EngineConfig(checkpoint_path=str(clean_checkpoint), device="cpu", precision="float32",
                          compile_model=False, warmup=False, max_text_length=40, max_new_tokens=4)
    with ProductionTTSEngine(config) as started:
        yield started


def test_python_api_text_length_limit(engine):
    response = engine.generate("x" * 41)
    assert not response.success and response.error_code == "invalid_request"
    assert response.error == "text: must be at most 40 characters, got 41"
    assert engine.generate("x" * 40, seed=0).success
    with pytest.raises(ValueError, match="text: must be at most 2000 characters"):
        engine.register_voice("long_text", sine_wav(0.05), "y" * 2001)


def test_python_api_reference_duration_limit(clean_checkpoint):
    config = EngineConfig(checkpoint_path=str(clean_checkpoint), device="cpu", precision="float32",
                          compile_model=False, warmup=False, max_new_tokens=4, max_reference_seconds=0.5)
    with ProductionTTSEngine(config) as limited:
        response = limited.generate("hi", reference_audio=wav_seconds(1.0), reference_text="one second")
        assert response.error_code == "invalid_request"
        assert response.error.startswith("reference_audio:") and "0.5 s" in response.error
        with pytest.raises(ValueError, match=r"audio: .*0\.5 s"):
            limited.register_voice("long_voice", wav_seconds(1.0), "one second")


# ============================================================== 4. the API key, in constant time


def test_api_key_is_compared_with_hmac_compare_digest():
    middleware = ROOT / "s1_mini" / "server" / "middleware.py"
    tree = ast.parse(middleware.read_text())
    digests = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _dotted(n.func) == "hmac.compare_digest"]
    assert [ast.unparse(n) for n in digests] == ["hmac.compare_digest(token.strip(), self.api_key)"]
    # No other comparison may set the key against another value (an == would leak how
    # much of the presented token matches through its timing).
    for path in _product_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            text = ast.unparse(node)
            touches = "api_key" in text or (path == middleware and re.search(r"\btoken\b", text))
            variables = [o for o in [node.left, *node.comparators] if not isinstance(o, ast.Constant)]
            # one variable against literals (None, "") is validation, not a check of a key
            assert not (touches and len(variables) > 1), f"{path.relative_to(ROOT)}:{node.lineno}: {text}"


# ============================================================== 5. the container's user


def final_stage() -> list[tuple[str, str]]:
    from test_container_image import instructions

    steps = instructions()
    start = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[start:]


def service_user() -> tuple[str, str]:
    """(user name of the last USER of the final stage, the useradd command creating it)."""
    stage = final_stage()
    users = [args for word, args in stage if word == "USER"]
    assert users, "the final stage has no USER: the container runs as root"
    name = users[-1].partition(":")[0]
    runs = " && ".join(args for word, args in stage if word == "RUN")
    useradd = re.search(rf"useradd\b[^&;]*\s{re.escape(name)}\b", runs)
    assert useradd, f"the final stage does not create the user {name}"
    return name, useradd.group(0)


def test_container_runs_as_a_non_root_user_owning_opt_ml():
    stage = final_stage()
    user = [args for word, args in stage if word == "USER"][-1]
    name, _, group = user.partition(":")
    assert name not in ("root", "0") and group not in ("root", "0")
    _, useradd = service_user()
    uid = re.search(r"(?:--uid|-u)\s+(\d+)", useradd)
    assert uid is None or int(uid.group(1)) != 0
    last_user = max(i for i, (word, _) in enumerate(stage) if word == "USER")
    before = " && ".join(args for word, args in stage[:last_user] if word == "RUN")
    # /opt/ml (SageMaker mounts model/ there and may write output/) exists and is the user's
    assert re.search(r"mkdir -p /opt/ml(\s|$)", before)
    assert re.search(rf"chown -R {re.escape(name)}(:\S+)? /opt/ml(\s|$)", before)
    # the code and the virtual environment stay root's: the service cannot rewrite itself
    assert not re.search(r"chown[^&;]*/opt/(venv|s1-mini)", before)
    # caches the service writes go where it may write
    env = " ".join(args for word, args in stage if word == "ENV")
    assert re.search(r"TORCHINDUCTOR_CACHE_DIR=/tmp/", env)
    assert "--create-home" in useradd or " -m " in useradd  # ~/.cache and ~/.triton


def test_the_service_uid_is_free_in_the_base_image():
    stage = final_stage()
    base = stage[0][1]
    runs = " && ".join(args for word, args in stage if word == "RUN")
    _, useradd = service_user()
    uid = re.search(r"(?:--uid|-u)\s+(\d+)", useradd)
    version = re.search(r"ubuntu(\d+)\.(\d+)", base)
    if uid is not None and version is not None and (int(version[1]), int(version[2])) >= (23, 4):
        # Ubuntu images since 23.04 ship the user 'ubuntu' with uid and gid 1000
        assert int(uid.group(1)) != 1000 or re.search(r"userdel[^&;]*\bubuntu\b", runs)


def test_packaged_files_are_readable_by_the_non_root_user(clean_checkpoint, tmp_path):
    checkpoint = Path(shutil.copytree(clean_checkpoint, tmp_path / "ckpt"))
    for path in checkpoint.iterdir():
        path.chmod(0o600)
    archive = package_model(checkpoint, tmp_path / "model.tar.gz", verify=False, progress=False).path
    with tarfile.open(archive) as tar:
        unreadable = [m.name for m in tar.getmembers() if m.isfile() and m.mode & 0o004 == 0]
    assert unreadable == []
