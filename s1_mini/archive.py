"""Safe extraction of a model archive (``model.tar.gz``).

A model archive comes from S3 and is data: extracting it must never write outside the
destination, create links that point elsewhere, create devices or FIFOs, or fill the
disk. Python's ``filter="data"`` covers most of this; the explicit checks below come
first so that every refusal names the member and the rule (and links, which the data
filter allows inside the destination, are refused outright: a checkpoint has none).

The archive is read once, as a stream, into a fresh directory next to ``dest`` that is
renamed to ``dest`` only when every member is in: a refused, truncated or corrupt
archive leaves nothing behind, and a reader never sees a half-extracted model.
"""

from __future__ import annotations

import contextlib
import gzip
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

DEFAULT_MAX_BYTES = 32 * 1024**3  # the full S1-mini checkpoint is under 4 GB


class ArchiveError(ValueError):
    """An archive that is refused or cannot be read; the message names the archive,
    the member (where there is one) and the rule."""


def extract_model_archive(archive: Path, dest: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Extract the tar (gzip or plain) ``archive`` into ``dest``, which must not exist
    yet or be an empty directory. Regular files and directories only, relative paths
    without ``..``, at most ``max_bytes`` uncompressed bytes in all. Raises
    :class:`ArchiveError`; on any failure nothing is left at ``dest``."""
    archive, dest = Path(archive), Path(dest)
    if max_bytes <= 0:
        raise ValueError(f"max_bytes: must be > 0, got {max_bytes}")
    if not archive.is_file():
        raise ArchiveError(f"{archive}: no such file")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ArchiveError(f"{dest}: the destination must not exist or be an empty directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.errorlevel = 2  # every extraction problem raises; none is only logged
                tar.extractall(partial, members=_checked(tar, archive, max_bytes), filter="data")
        except tarfile.FilterError as exc:  # the data filter's own refusals, should ours miss one
            raise ArchiveError(f"{archive}: member {exc.tarinfo.name!r}: refused by the data filter: {exc}") from None
        except (tarfile.ReadError, tarfile.CompressionError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise ArchiveError(f"{archive}: corrupt or truncated archive: {exc or type(exc).__name__}") from None
        except OSError as exc:  # the disk, not the archive: full, read-only, ...
            raise ArchiveError(f"{archive}: cannot write the extracted files under {dest.parent}: {exc}") from None
        if dest.exists():
            dest.rmdir()  # checked empty above
        partial.rename(dest)
    except BaseException:
        with contextlib.suppress(OSError):  # best effort: the first error is the one to report
            shutil.rmtree(partial)
        raise


def _checked(tar: tarfile.TarFile, archive: Path, max_bytes: int) -> Iterator[tarfile.TarInfo]:
    """The archive's members, each refused (ArchiveError) before it is written if it
    breaks a rule; the size bound counts the sizes in the headers, which are exactly
    what extraction writes."""
    total = 0
    for member in tar:
        rule = _broken_rule(member)
        total += member.size if member.isfile() else 0
        if rule is None and total > max_bytes:
            rule = f"the archive's uncompressed size exceeds the limit of {max_bytes} bytes"
        if rule is not None:
            raise ArchiveError(f"{archive}: member {member.name!r}: refused: {rule}")
        yield member


def _broken_rule(member: tarfile.TarInfo) -> str | None:
    """The rule ``member`` breaks, or None."""
    path = PurePosixPath(member.name)
    if path.is_absolute():
        return "absolute paths are not allowed"
    if ".." in path.parts:
        return "'..' path components are not allowed"
    if member.issym():
        return f"symbolic links are not allowed (to {member.linkname!r})"
    if member.islnk():
        return f"hard links are not allowed (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "device files are not allowed"
    if member.isfifo():
        return "FIFOs are not allowed"
    if not (member.isfile() or member.isdir()):
        return f"only regular files and directories are allowed (type {member.type!r})"
    return None
