"""metrics.jsonl (one JSON object per logged step) and TensorBoard scalars/images."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch


class MetricsWriter:
    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        self._drop_lines_after(resume_step)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - open for the whole run; closed by close()
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when wanted

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def _drop_lines_after(self, step: int) -> None:
        """A resumed run re-logs the steps after its checkpoint: drop the interrupted run's copies."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a hard kill or a full disk
                warnings.warn(f"{self.path}: dropping an unreadable line: {line[:80]!r}", stacklevel=2)
                continue
            if row.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

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
