"""extract_model_archive: a good model.tar.gz is extracted; malicious or broken ones
(built here as real tar files) are refused with the member and the rule named, and
nothing is written outside the destination or left half-extracted at it."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

from s1_mini.archive import ArchiveError, extract_model_archive

GOOD = {"config.json": b'{"dim": 8}', "model.pth": b"\0" * 300, "code/inference.py": b"from x import *\n"}


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.devmajor, info.devminor = (1, 3) if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE) else (0, 0)
    return info


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def place(tmp_path):
    """(archive path, dest) in a directory whose whole content is checked afterwards."""
    root = tmp_path / "place"
    root.mkdir()
    return root / "model.tar.gz", root / "model"


def test_good_archive_is_extracted(place):
    archive, dest = place
    _tar(archive, list(GOOD.items()))
    extract_model_archive(archive, dest)
    assert {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()} == set(GOOD)
    for name, data in GOOD.items():
        assert (dest / name).read_bytes() == data
    assert _tree(archive.parent) == {"model.tar.gz", "model"} | {f"model/{n}" for n in (*GOOD, "code")}


def test_plain_tar_and_empty_existing_destination(place):
    archive, dest = place
    _tar(archive, list(GOOD.items()), mode="w")
    dest.mkdir()
    extract_model_archive(archive, dest)
    assert (dest / "config.json").read_bytes() == GOOD["config.json"]


def test_non_empty_destination_is_refused(place):
    archive, dest = place
    _tar(archive, list(GOOD.items()))
    dest.mkdir()
    (dest / "old").write_text("keep")
    with pytest.raises(ArchiveError, match="must not exist or be an empty directory"):
        extract_model_archive(archive, dest)
    assert (dest / "old").read_text() == "keep" and _tree(dest) == {"old"}


OUTSIDE = "/tmp/s1-mini-archive-test-outside"  # an absolute member name; must never be written


@pytest.mark.parametrize("member, rule", [
    (("../escaped.txt", b"x"), "'..' path components are not allowed"),
    (("code/../../escaped.txt", b"x"), "'..' path components are not allowed"),
    ((OUTSIDE, b"x"), "absolute paths are not allowed"),
    (_special("link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic links are not allowed"),
    (_special("inner-link", tarfile.SYMTYPE, "config.json"), "symbolic links are not allowed"),
    (_special("hard", tarfile.LNKTYPE, "/etc/passwd"), "hard links are not allowed"),
    (_special("hard-inside", tarfile.LNKTYPE, "config.json"), "hard links are not allowed"),
    (_special("fifo", tarfile.FIFOTYPE), "FIFOs are not allowed"),
    (_special("null", tarfile.CHRTYPE), "device files are not allowed"),
    (_special("disk", tarfile.BLKTYPE), "device files are not allowed"),
], ids=["traversal", "nested-traversal", "absolute", "symlink", "symlink-inside", "hardlink", "hardlink-inside",
        "fifo", "char-device", "block-device"])
def test_malicious_member_is_refused_and_nothing_is_written(place, member, rule):
    archive, dest = place
    # a good member first, so that the refusal comes after something was extracted
    _tar(archive, [("config.json", b"{}"), member, ("model.pth", b"weights")])
    name = member.name if isinstance(member, tarfile.TarInfo) else member[0]
    with pytest.raises(ArchiveError) as info:
        extract_model_archive(archive, dest)
    message = str(info.value)
    assert f"member {name!r}" in message and rule in message and str(archive) in message
    assert _tree(archive.parent) == {"model.tar.gz"}  # not even the partial directory is left
    assert not (archive.parent.parent / "escaped.txt").exists() and not os.path.lexists(OUTSIDE)


def test_total_size_bound(place):
    archive, dest = place
    _tar(archive, [("a.bin", b"a" * 600), ("b.bin", b"b" * 600)])
    with pytest.raises(ArchiveError, match=r"member 'b.bin': refused: .*exceeds the limit of 1000 bytes"):
        extract_model_archive(archive, dest, max_bytes=1000)
    assert _tree(archive.parent) == {"model.tar.gz"}
    extract_model_archive(archive, dest, max_bytes=1200)  # the bound is inclusive
    assert (dest / "b.bin").stat().st_size == 600


def test_size_bound_holds_for_a_highly_compressed_member(place):
    archive, dest = place
    _tar(archive, [("zeros.bin", bytes(4 * 1024 * 1024))])  # 4 MB of zeros: a few KB compressed
    assert archive.stat().st_size < 64 * 1024
    with pytest.raises(ArchiveError, match="zeros.bin"):
        extract_model_archive(archive, dest, max_bytes=1024 * 1024)
    assert _tree(archive.parent) == {"model.tar.gz"}


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_gzip_is_a_clear_error(place, cut):
    archive, dest = place
    _tar(archive, [("config.json", b"{}"), ("model.pth", os.urandom(200_000))])
    data = archive.read_bytes()
    archive.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ArchiveError, match="corrupt or truncated archive"):
        extract_model_archive(archive, dest)
    assert _tree(archive.parent) == {"model.tar.gz"}


@pytest.mark.parametrize("content", [b"this is not an archive at all", gzip.compress(b"not a tar inside" * 100),
                                     b"\x1f\x8b\x08\x00garbage after a gzip magic"])
def test_garbage_is_a_clear_error(place, content):
    archive, dest = place
    archive.write_bytes(content)
    with pytest.raises(ArchiveError, match="corrupt or truncated archive"):
        extract_model_archive(archive, dest)
    assert _tree(archive.parent) == {"model.tar.gz"}


def test_missing_archive_and_bad_bound(place):
    archive, dest = place
    with pytest.raises(ArchiveError, match="no such file"):
        extract_model_archive(archive, dest)
    with pytest.raises(ValueError, match="max_bytes: must be > 0"):
        extract_model_archive(archive, dest, max_bytes=0)
