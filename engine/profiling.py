"""NVTX ranges for Nsight Systems that cost nothing, and never raise, where there is no CUDA."""

from __future__ import annotations

import contextlib

import torch

try:
    import nvtx as _nvtx  # the `nvtx` package is a no-op without a profiler attached
except ImportError:  # pragma: no cover - nvtx is a declared dependency
    _nvtx = None


def nvtx_range(name: str):
    """`with nvtx_range("forward"): ...` marks a phase on the Nsight timeline."""
    if _nvtx is not None:
        return _nvtx.annotate(name)
    if torch.cuda.is_available():
        return _torch_range(name)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _torch_range(name: str):
    torch.cuda.nvtx.range_push(name)  # raises on CPU-only torch builds: only reached with CUDA
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
