"""Build model.tar.gz from a checkpoint directory and the container's code/ directory.

Verifies the checkpoint first (required files present, config.json parses, model.pth
and codec.pth load with weights_only), then streams every checkpoint file to the
archive root and the inference code to code/ (code/inference.py, and
code/requirements.txt when given) through tar+gzip with a progress bar. The archive is
written to a temporary file beside the output and renamed at the end, so a failed or
interrupted run leaves nothing behind. No AWS calls.
"""

from __future__ import annotations

import argparse
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from s1_mini.deploy.aws import AwsContext, DeployError
from s1_mini.deploy.progress import ReadProgress, byte_bar

REQUIRED_FILES = ("config.json", "model.pth", "tokenizer.tiktoken", "special_tokens.json", "codec.pth")
OPTIONAL_FILES = ("codec_config.json",)
DEFAULT_CODE_DIR = Path(__file__).resolve().parents[2] / "code"


@dataclass
class PackageResult:
    path: Path
    size: int
    members: list[str]  # archive member names, in order


def verify_checkpoint(checkpoint_dir: str | Path) -> None:
    """Refuse a checkpoint the container could not load: a missing file, a config that
    does not parse, or weights that do not load with ``weights_only=True``."""
    import torch

    from s1_mini.checkpoint import CheckpointError
    from s1_mini.codec import Codec
    from s1_mini.model import load_text2semantic

    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise DeployError(f"checkpoint: {d} is not a directory; pass the directory that holds config.json "
                          "and model.pth")
    missing = [name for name in REQUIRED_FILES if not (d / name).is_file()]
    if missing:
        raise DeployError(f"checkpoint: {d} lacks {', '.join(missing)}; the container needs "
                          f"{', '.join(REQUIRED_FILES)} at the archive root")
    try:
        # bf16 halves the memory of a real checkpoint; the point is that it loads
        load_text2semantic(d, device="cpu", dtype=torch.bfloat16)
        Codec.from_checkpoint(d, device="cpu")
    except CheckpointError as exc:
        raise DeployError(f"checkpoint: {exc}") from None
    except (ValueError, KeyError, TypeError, OSError, RuntimeError) as exc:
        raise DeployError(f"checkpoint: {d} does not load ({type(exc).__name__}: {exc}); "
                          "check that it is a complete S1-mini checkpoint") from None


def _plan(checkpoint_dir: Path, code_dir: Path, requirements: Path | None) -> list[tuple[Path, str]]:
    """(source file, archive name) pairs: checkpoint files at the root, code under code/."""
    entries: list[tuple[Path, str]] = []
    for path in sorted(checkpoint_dir.rglob("*")):
        rel = path.relative_to(checkpoint_dir)
        if not path.is_file() or rel.parts[0] == "code" or any(p.startswith(".") for p in rel.parts):
            continue
        entries.append((path, rel.as_posix()))
    if not (code_dir / "inference.py").is_file():
        raise DeployError(f"code_dir: {code_dir} has no inference.py; pass --code-dir with the repo's code/ "
                          "directory")
    code_files = sorted(p for p in code_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in code_files:
        entries.append((path, "code/" + path.relative_to(code_dir).as_posix()))
    if requirements is not None:
        if not requirements.is_file():
            raise DeployError(f"requirements: {requirements} is not a file")
        entries = [e for e in entries if e[1] != "code/requirements.txt"]
        entries.append((requirements, "code/requirements.txt"))
    return entries


def package_model(checkpoint_dir: str | Path, output: str | Path, *, code_dir: str | Path | None = None,
                  requirements: str | Path | None = None, verify: bool = True, compresslevel: int = 6,
                  progress: bool = True) -> PackageResult:
    """Verify ``checkpoint_dir`` and write ``output`` (model.tar.gz) atomically."""
    checkpoint_dir, output = Path(checkpoint_dir), Path(output)
    code_dir = Path(code_dir) if code_dir is not None else DEFAULT_CODE_DIR
    if not 0 <= compresslevel <= 9:
        raise DeployError(f"compresslevel: must be 0..9, got {compresslevel}")
    if verify:
        verify_checkpoint(checkpoint_dir)
    elif not checkpoint_dir.is_dir():
        raise DeployError(f"checkpoint: {checkpoint_dir} is not a directory")
    entries = _plan(checkpoint_dir, code_dir, Path(requirements) if requirements else None)
    if not output.parent.is_dir():
        raise DeployError(f"output: directory {output.parent} does not exist")
    if output.is_dir():
        raise DeployError(f"output: {output} is a directory; pass a file name such as {output / 'model.tar.gz'}")
    total = sum(src.stat().st_size for src, _ in entries)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw, byte_bar(total, f"package {output.name}", progress) as bar, \
                tarfile.open(fileobj=raw, mode="w:gz", compresslevel=compresslevel) as tar:
            for src, name in entries:
                info = tar.gettarinfo(str(src), arcname=name)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                # Extracted as root, the files stay root's: the image's non-root user can
                # read them only through these bits (a checkpoint written under umask 077
                # would otherwise arrive 0600).
                info.mode = 0o755 if info.isdir() else 0o644
                with open(src, "rb") as f:
                    tar.addfile(info, ReadProgress(f, bar))
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return PackageResult(path=output, size=output.stat().st_size, members=[name for _, name in entries])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json, model.pth, ...)")
    parser.add_argument("--output", default="model.tar.gz", help="archive to write (default: model.tar.gz)")
    parser.add_argument("--code-dir", help=f"directory with inference.py (default: {DEFAULT_CODE_DIR})")
    parser.add_argument("--requirements", help="requirements.txt to ship as code/requirements.txt")
    parser.add_argument("--compresslevel", type=int, default=6, help="gzip level 0-9 (default 6; 1 is faster)")
    parser.add_argument("--no-verify", action="store_true", help="skip loading the weights before packaging")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, ctx: AwsContext) -> int:
    if ctx.dry_run:
        print("[dry-run] package makes no AWS calls; building the archive", file=ctx.out)
    result = package_model(args.checkpoint, args.output, code_dir=args.code_dir, requirements=args.requirements,
                           verify=not args.no_verify, compresslevel=args.compresslevel,
                           progress=not args.no_progress)
    print(f"wrote {result.path} ({result.size} bytes, {len(result.members)} files)", file=ctx.out)
    return 0
