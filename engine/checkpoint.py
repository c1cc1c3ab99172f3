"""Atomic, verifiable checkpoints: `run/checkpoints/step-N/` plus a `latest` pointer.

A checkpoint directory is written under a temporary name, every file fsync'ed, a manifest with
each file's size and SHA-256 written last, then renamed into place; `latest` is updated after
that. Loading verifies the manifest, so a truncated or corrupt checkpoint is skipped (with a
warning) in favour of the previous one, and is never half-loaded.

Layout of one checkpoint:
    model.safetensors   the method's state_dict (network weights and fixed buffers)
    ema.safetensors     the EMA copy's state_dict (absent when EMA is off)
    train_state.pt      optimizer, LR schedule, grad scaler, step, data position, RNG states
    config.toml         the resolved config of the run that wrote it
    data_info.json      sample shape and class names, so samplers need not open the data
    manifest.json       {"step": N, "files": {name: {"bytes": n, "sha256": hex}}}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.config import Config, load_config

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


@dataclass
class Checkpoint:
    path: Path
    step: int

    def model_state(self, ema: bool = False) -> dict[str, torch.Tensor]:
        name = "ema.safetensors" if ema else "model.safetensors"
        if ema and not (self.path / name).exists():
            name = "model.safetensors"  # trained without EMA: the raw weights are what there is
        return load_file(self.path / name)

    def train_state(self) -> dict[str, Any]:
        # weights_only=False: the file holds optimizer state and RNG byte tensors we wrote ourselves.
        return torch.load(self.path / "train_state.pt", map_location="cpu", weights_only=False)

    def config(self) -> Config:
        return load_config(self.path / "config.toml")

    def data_info(self) -> dict[str, Any]:
        return json.loads((self.path / "data_info.json").read_text())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _host_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses non-contiguous tensors and tensors sharing storage: give each its own copy.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def save_checkpoint(checkpoint_dir: Path, step: int, *, model_state: dict[str, torch.Tensor],
                    ema_state: dict[str, torch.Tensor] | None, train_state: dict[str, Any],
                    config: Config, data_info: dict[str, Any], keep: int) -> Path:
    """Write `checkpoint_dir/step-{step}` atomically, point `latest` at it, keep the newest `keep`."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / f"step-{step}"
    tmp = checkpoint_dir / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    save_file(_host_copy(model_state), tmp / "model.safetensors")
    if ema_state is not None:
        save_file(_host_copy(ema_state), tmp / "ema.safetensors")
    torch.save(train_state, tmp / "train_state.pt")
    (tmp / "config.toml").write_text(config.to_toml())
    (tmp / "data_info.json").write_text(json.dumps(data_info))

    files = {}
    for path in sorted(tmp.iterdir()):
        _fsync_file(path)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
    _fsync_file(tmp / MANIFEST)
    _fsync_dir(tmp)

    if final.exists():  # re-saving the same step (e.g. stopped right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(checkpoint_dir)
    _write_latest(checkpoint_dir, final.name)
    _remove_old(checkpoint_dir, keep)
    return final


def _write_latest(checkpoint_dir: Path, name: str) -> None:
    tmp = checkpoint_dir / "latest.tmp"
    tmp.write_text(name + "\n")
    _fsync_file(tmp)
    os.replace(tmp, checkpoint_dir / "latest")
    _fsync_dir(checkpoint_dir)


def _step_dirs(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """Every `step-N` directory, newest first (temporary `.tmp-*` directories are not candidates)."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def _remove_old(checkpoint_dir: Path, keep: int) -> None:
    """Keep the `keep` newest intact checkpoints and delete everything older. Damaged directories
    never count towards `keep` (they cannot be resumed from); those newer than the kept ones are
    left for inspection, and loading skips them."""
    intact = 0
    for _, path in _step_dirs(checkpoint_dir):  # newest first
        if intact < keep:
            intact += verify(path, checksums=False) is None
            continue
        shutil.rmtree(path, ignore_errors=True)
    for leftover in checkpoint_dir.glob(".tmp-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def verify(path: Path, checksums: bool = True) -> str | None:
    """None if the checkpoint at `path` is complete and intact, else what is wrong with it.
    `checksums=False` checks presence and sizes only (cheap; used when rotating old checkpoints)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (the write never finished)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "manifest.json is unreadable"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} is {file.stat().st_size} bytes, expected {expected['bytes']} (truncated?)"
        if checksums and _sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum (corrupt)"
    return None


def find_checkpoints(checkpoint_dir: Path) -> tuple[Checkpoint | None, int]:
    """The newest intact checkpoint (None if there is none) and how many step-N dirs exist at all.

    Damaged newer checkpoints are skipped with a warning naming what is wrong with each."""
    candidates = _step_dirs(checkpoint_dir)
    for step, path in candidates:
        problem = verify(path)
        if problem is None:
            return Checkpoint(path, step), len(candidates)
        warnings.warn(f"skipping damaged checkpoint {path}: {problem}; trying the previous one", stacklevel=2)
    return None, len(candidates)


def latest_checkpoint(checkpoint_dir: Path) -> Checkpoint | None:
    """The checkpoint to resume from; None for a fresh run; CheckpointError when checkpoints exist
    but none is intact (never silently start over on top of them)."""
    checkpoint, count = find_checkpoints(checkpoint_dir)
    if checkpoint is None and count > 0:
        raise CheckpointError(
            f"{checkpoint_dir} holds {count} checkpoint(s) but none is intact (see the warnings above). "
            f"Move them away to start a fresh run in this directory, or set --run.dir to a new one.")
    return checkpoint


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A run directory (its newest intact checkpoint) or one `step-N` checkpoint directory."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        problem = verify(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
        match = _STEP_DIR.match(path.name)
        step = int(match.group(1)) if match else json.loads((path / MANIFEST).read_text())["step"]
        return Checkpoint(path, step)
    for checkpoint_dir in (path / "checkpoints", path):
        if checkpoint_dir.is_dir() and _step_dirs(checkpoint_dir):
            checkpoint = latest_checkpoint(checkpoint_dir)
            assert checkpoint is not None
            return checkpoint
    raise CheckpointError(f"no checkpoint found at {path}: pass a run directory (with checkpoints/) "
                          f"or a checkpoints/step-N directory")
