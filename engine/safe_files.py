"""Writing files so that a crash never leaves half of one and a planted symlink is never followed.

Every file the engine writes into a run directory, the cache or a user's output goes through
here: the content is written to a temporary file created exclusively next to the target
(O_CREAT | O_EXCL | O_NOFOLLOW: it cannot already exist, as a file or as a symlink someone planted),
fsync'ed, and renamed over the target (os.replace replaces a symlink at the target itself rather
than writing through it); the directory is fsync'ed so the rename survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are durable enough
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_exclusive(path: Path, mode: int = 0o644) -> int:
    """A write descriptor on a NEW file at `path`; FileExistsError if anything (a symlink included)
    is already there."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode)


@contextlib.contextmanager
def replacing(target: str | Path) -> Iterator[Path]:
    """`with replacing(target) as tmp:` write the new content to `tmp` (a fresh, empty, exclusively
    created file beside `target`) by any means, e.g. a library that takes a path; on a clean exit it
    is fsync'ed and renamed over `target`. On an error it is removed and `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(open_exclusive(tmp))
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    fsync_dir(target.parent)


def write_bytes_atomic(target: str | Path, data: bytes) -> None:
    """Replace `target` with `data`, atomically (see the module doc)."""
    with replacing(target) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | _NOFOLLOW)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)


def write_text_atomic(target: str | Path, text: str) -> None:
    write_bytes_atomic(target, text.encode())
