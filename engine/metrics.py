"""metrics.jsonl (one JSON object per logged step) and TensorBoard scalars/images."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from engine.safe_files import write_text_atomic


class MetricsWriter:
    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        if self.path.is_symlink():
            raise OSError(f"{self.path} is a symbolic link; the engine never writes through links: remove it "
                          f"(or move the run directory) and rerun")
        self._drop_lines_after(resume_step)
        # O_NOFOLLOW: a link planted between the check above and this open is refused, not followed.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        self._file = os.fdopen(fd, "a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when wanted

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def _drop_lines_after(self, step: int) -> None:
        """A resumed run re-logs the steps after its checkpoint: drop the interrupted run's copies
        (and lines torn by a hard kill). The file is replaced atomically, and only when a line goes:
        a kill at any moment leaves either the old history or the new one, never an empty file."""
        if not self.path.exists():
            return
        lines = self.path.read_text(errors="replace").splitlines()
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a hard kill or a full disk
                warnings.warn(f"{self.path}: dropping an unreadable line: {line[:80]!r}", stacklevel=2)
                continue
            if isinstance(row, dict) and isinstance(row.get("step", 0), int) and row.get("step", 0) <= step:
                kept.append(line)
        if len(kept) != len(lines):
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key if "/" in key else f"train/{key}", value, step)

    def image(self, tag: str, image_chw: torch.Tensor, step: int) -> None:
        if self._tb is not None:
            self._tb.add_image(tag, image_chw, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
