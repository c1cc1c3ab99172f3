"""Backend selection shared by every op in `kernels`.

`backend="auto"` picks Triton for CUDA tensors, the pure-PyTorch reference for CPU tensors, and
Triton on CPU only under `TRITON_INTERPRET=1` (how the tests run the kernels without a GPU).
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch", "csrc")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, *tensors: torch.Tensor | None) -> str:
    """Return "triton" or "torch" for these tensors; ValueError for unknown or unusable backends."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "csrc":
        raise ValueError("backend='csrc' is not built in this installation; use 'auto', 'triton' or 'torch'")
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    on_cuda = any(t.is_cuda for t in present)
    if backend == "torch":
        return "torch"
    usable = triton_available() and (on_cuda or triton_interpreting())
    if backend == "triton":
        if not usable:
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import for CPU "
                "tensors) and the triton package; use backend='torch' or 'auto'"
            )
        return "triton"
    return "triton" if usable else "torch"
