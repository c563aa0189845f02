"""Progress bars and file checksums shared by the deploy steps (tqdm on stderr)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

CHUNK = 8 * 1024 * 1024


def byte_bar(total: int, desc: str, enabled: bool = True) -> tqdm:
    """A bytes progress bar; off when ``enabled`` is false or stderr is not a terminal
    (``disable=None``), so logs and CI output stay clean."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=None if enabled else True, leave=False)


class ReadProgress:
    """A file object wrapper that advances ``bar`` as it is read."""

    def __init__(self, raw: IO[bytes], bar: tqdm) -> None:
        self._raw, self._bar = raw, bar

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._bar.update(len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def sha256_file(path: str | Path, progress: bool = True) -> str:
    """Hex SHA-256 of a file, read in 8 MiB chunks (with a bar for big files)."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f, byte_bar(path.stat().st_size, f"sha256 {path.name}", progress) as bar:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()
