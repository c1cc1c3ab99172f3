"""Named phases on the profilers' timelines: NVTX ranges for Nsight Systems and record_function
ranges for torch.profiler, costing next to nothing when neither is recording and never raising on
a CPU-only torch.

    with phase("forward"): ...

Nsight sees the NVTX range through the `nvtx` package (a no-op unless a tool is attached);
torch.profiler's trace sees a record_function range, entered only while torch.profiler records (it
would otherwise cost a dispatcher call per phase, every step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

try:
    import nvtx as _nvtx  # the `nvtx` package: a no-op without a profiler attached, and on CPU-only machines
except ImportError:  # pragma: no cover - nvtx is a declared dependency
    _nvtx = None


def _torch_profiler_recording() -> bool:
    return torch.autograd.profiler._is_profiler_enabled


def phase(name: str) -> contextlib.AbstractContextManager:
    """Mark the enclosed code as phase `name` for Nsight Systems and torch.profiler. Inside code
    that torch.compile traces it is a plain nullcontext, so it never breaks the graph."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _ranges(name)


@contextlib.contextmanager
def _ranges(name: str) -> Iterator[None]:
    with contextlib.ExitStack() as ranges:
        if _nvtx is not None:
            ranges.enter_context(_nvtx.annotate(name))
        if _torch_profiler_recording():
            ranges.enter_context(torch.profiler.record_function(name))
        yield
