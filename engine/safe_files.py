"""Writing files so that a crash never leaves half of one and a planted symlink is never followed.

Every file the engine writes into a run directory, the cache or a user's output goes through
here: the content is written to a temporary file created exclusively next to the target
(O_CREAT | O_EXCL | O_NOFOLLOW: it cannot already exist, as a file or as a symlink someone planted),
fsync'ed, and renamed over the target (os.replace replaces a symlink at the target itself rather
than writing through it); the directory is fsync'ed so the rename survives a power cut.

Reading the engine's own safetensors files (latents, prompt tables), which users hand over and so
are untrusted: `read_tensor_file` gives the tensors a format needs and its metadata, or a ValueError
that names the file and says how to make it again (safetensors never runs code; this adds the
checks of what the file holds).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

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


def read_tensor_file(path: Path, what: str, keys: tuple[str, ...], file_format: str, hint: str,
                     device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({key: tensor} for `keys`, onto `device`; the metadata) of the `what` file at `path` (e.g.
    "latents file"), whose metadata "format" must be `file_format`; ValueError naming the file
    and ending in `hint` when it is truncated, corrupt, lacks a tensor or is of another format."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            held = set(f.keys())
            if not set(keys) <= held:
                expected = " and ".join(repr(key) for key in keys)
                raise ValueError(f"{what} {path} holds tensors {sorted(held)}, expected {expected}; {hint}")
            tensors = {key: f.get_tensor(key) for key in keys}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {what} {path}: it is truncated or corrupt ({err}); {hint}") from err
    if metadata.get("format") != file_format:
        raise ValueError(f"{what} {path} has format {metadata.get('format')!r}, expected {file_format!r}; {hint}")
    return tensors, metadata
