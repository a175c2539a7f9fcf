"""One atomic write: a file appears whole or not at all, whatever stops its writer."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def write_atomically(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside `path` to write to, renamed over `path` when the block ends without an
    error and removed when it raises: readers see the old file or the new one, never part of it.

    The temporary name keeps `path`'s suffix (ASE picks a format by it) and holds this process's id
    (two writers of one file never share a temporary).
    """
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8) to `path` through `write_atomically`."""
    with write_atomically(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
