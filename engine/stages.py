"""One progress line over the stages of an engine-train run.

A run can have up to four stages: preparation's autoencoder training and encoding (methods that
train on latents of builtin:textures), training, evaluation. Each stage has its own progress bar
with its ETA; this module adds the line above them that says where the run is as a whole, printed
whenever a stage starts:

    run 2/4 encoding (768 crops) | done: autoencoder 1m32s | next: training, evaluation | 1m35s in

engine-train opens the stages (`run_stages`) before preparation; the code of each stage marks
itself with `stage(name, detail)`, which does nothing outside engine-train (tests, the library) and
inside another stage (the built-in autoencoder is trained by a nested engine-train loop, whose own
training and evaluation belong to the "autoencoder" stage). A stage that turns out not to be needed
(a cached autoencoder) is marked `skipped`.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

from tqdm import tqdm

_current: contextvars.ContextVar[RunStages | None] = contextvars.ContextVar("run_stages", default=None)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class RunStages:
    """The stages `names` of one run, in order; see the module doc."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.start = time.monotonic()
        self.finished: dict[str, str] = {}  # name -> "1m32s" or "cached"
        self.active: str | None = None

    def line(self, name: str, detail: str) -> str:
        position = self.names.index(name) + 1
        done = ", ".join(f"{n} {self.finished[n]}" for n in self.names if n in self.finished)
        upcoming = [n for n in self.names[position:] if n not in self.finished]
        parts = [f"run {position}/{len(self.names)} {name}" + (f" ({detail})" if detail else "")]
        if done:
            parts.append(f"done: {done}")
        if upcoming:
            parts.append(f"next: {', '.join(upcoming)}")
        parts.append(f"{_duration(time.monotonic() - self.start)} in")
        return " | ".join(parts)


@contextlib.contextmanager
def run_stages(names: list[str]) -> Iterator[RunStages]:
    """The stages of the run this block makes (engine-train's body)."""
    stages = RunStages(names)
    token = _current.set(stages)
    try:
        yield stages
    finally:
        _current.reset(token)


@contextlib.contextmanager
def stage(name: str, detail: str = "") -> Iterator[None]:
    """Mark the enclosed work as stage `name` of the current run (see the module doc)."""
    stages = _current.get()
    if stages is None or stages.active is not None or name not in stages.names:
        yield
        return
    tqdm.write(stages.line(name, detail))
    stages.active, began = name, time.monotonic()
    try:
        yield
    finally:
        stages.active = None
        stages.finished[name] = _duration(time.monotonic() - began)


def skipped(name: str, why: str) -> None:
    """Stage `name` of the current run is not needed (`why`, e.g. "cached")."""
    stages = _current.get()
    if stages is not None and stages.active is None and name in stages.names:
        stages.finished[name] = why
