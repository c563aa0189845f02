"""``package``: a verified checkpoint + code/ streamed into model.tar.gz in the layout
the container expects; bad checkpoints are refused and leave no archive behind."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest

from s1_mini.deploy.aws import DeployError
from s1_mini.deploy.cli import main
from s1_mini.deploy.package import DEFAULT_CODE_DIR, package_model
from s1_mini.sagemaker.handlers import find_checkpoint
from s1_mini.testing.make_checkpoint import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    make_checkpoint(d, "tiny", seed=0)
    return d


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_package_layout_and_contents(checkpoint: Path, tmp_path: Path) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("soundfile\n")
    result = package_model(checkpoint, tmp_path / "model.tar.gz", requirements=req, progress=False)
    assert result.path.is_file() and result.size == result.path.stat().st_size
    with tarfile.open(result.path) as tar:
        names = tar.getnames()
        for name in ("config.json", "model.pth", "tokenizer.tiktoken", "special_tokens.json", "codec.pth",
                     "code/inference.py", "code/requirements.txt"):
            assert name in names
        assert tar.extractfile("model.pth").read() == (checkpoint / "model.pth").read_bytes()
        assert tar.extractfile("code/requirements.txt").read() == b"soundfile\n"
        tar.extractall(tmp_path / "model", filter="data")
    # the container's own lookup finds the checkpoint at the archive root
    assert find_checkpoint(tmp_path / "model") == tmp_path / "model"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_members_are_root_owned_and_world_readable_whatever_the_umask(checkpoint: Path, tmp_path: Path) -> None:
    # Written by a real process under umask 077 (files 0600, directories 0700), as a
    # checkpoint made by a careful user is; an executable code file (0700) too.
    private = tmp_path / "private"
    code = tmp_path / "code"
    subprocess.run(["sh", "-c", f"umask 077 && cp -R '{checkpoint}' '{private}' && mkdir '{code}' && "
                    f"cp '{DEFAULT_CODE_DIR / 'inference.py'}' '{code}/' && echo exit > '{code}/run.sh' && "
                    f"chmod 700 '{code}/run.sh'"], check=True)
    assert (private / "model.pth").stat().st_mode & 0o777 == 0o600
    result = package_model(private, tmp_path / "model.tar.gz", code_dir=code, progress=False)
    with tarfile.open(result.path) as tar:
        members = tar.getmembers()
    assert {m.name for m in members} >= {"model.pth", "code/inference.py", "code/run.sh"}
    assert {(m.name, m.mode, m.uid, m.gid) for m in members} == {(m.name, 0o644, 0, 0) for m in members}


def test_missing_file_is_refused_without_archive(checkpoint: Path, tmp_path: Path) -> None:
    bad = copy_checkpoint(checkpoint, tmp_path / "bad")
    (bad / "codec.pth").unlink()
    with pytest.raises(DeployError, match="lacks codec.pth"):
        package_model(bad, tmp_path / "model.tar.gz", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


@pytest.mark.parametrize("name, content", [("model.pth", b"not a zip file"), ("config.json", b"{not json"),
                                           ("codec.pth", b"\x00" * 64)])
def test_corrupt_checkpoint_is_refused_without_archive(checkpoint: Path, tmp_path: Path, name: str,
                                                       content: bytes) -> None:
    bad = copy_checkpoint(checkpoint, tmp_path / "bad")
    (bad / name).write_bytes(content)
    with pytest.raises(DeployError, match="checkpoint"):
        package_model(bad, tmp_path / "model.tar.gz", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_cli_package_and_errors(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.tar.gz"
    assert main(["package", "--checkpoint", str(checkpoint), "--output", str(out), "--no-progress",
                 "--compresslevel", "1"]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    assert main(["package", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "x.tar.gz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint:") and "Traceback" not in err
    assert main(["package", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "y.tar.gz"),
                 "--code-dir", str(tmp_path)]) == 2
    assert "no inference.py" in capsys.readouterr().err
    assert not (tmp_path / "y.tar.gz").exists()
