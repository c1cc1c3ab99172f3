"""An advisory lock on a file, held by an open file descriptor.

The operating system releases it when the process exits, however it exits (kill -9 included), so
a lock left by a dead process never blocks the next one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range lock plays the same role
    fcntl = None
    import msvcrt


class LockHeld(RuntimeError):
    """A non-blocking lock attempt found the lock taken."""


def _acquire(fd: int, blocking: bool) -> None:
    if fcntl is not None:
        flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError as err:
            raise LockHeld(str(err)) from err
        return
    mode = msvcrt.LK_LOCK if blocking else msvcrt.LK_NBLCK
    try:
        msvcrt.locking(fd, mode, 1)
    except OSError as err:
        raise LockHeld(str(err)) from err


@contextlib.contextmanager
def exclusive_lock(path: Path, blocking: bool = True) -> Iterator[int]:
    """Hold an exclusive lock on `path` (created if missing) for the `with` block; yields the file
    descriptor. `blocking=False` raises LockHeld at once when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW: a symlink planted at the lock's name is never followed.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        _acquire(fd, blocking)
        yield fd
    finally:
        os.close(fd)  # closing the descriptor releases the lock
