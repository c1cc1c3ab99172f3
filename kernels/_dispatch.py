"""Backend selection shared by every op in `kernels`: the one place that maps `backend=` to code.

    "auto"    Triton for CUDA tensors (the torch reference there when triton is not installed); for
              CPU tensors the csrc op library when it is loaded (`kernels._csrc`), else the
              pure-PyTorch reference; the reference anywhere else. Never the Triton interpreter:
              interpreting a kernel on CPU is orders of magnitude slower than the reference.
    "triton"  the Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (how the
              tests run the kernels without a GPU). ValueError anywhere else, or without triton.
    "torch"   the pure-PyTorch reference, on any device.
    "csrc"    the C++ op library of csrc/ (CPU tensors; built and loaded by `kernels._csrc` when
              `kernels` is imported). ValueError when it is not loaded (the message says why) or
              for tensors off the CPU (the library has no CUDA ops yet).

triton is imported only when the Triton backend is asked for or chosen (`triton_available`, then
each op's private `_triton_*` module), so `import kernels` and the torch path work where triton is
not installed. TRITON_INTERPRET is read by triton when it is imported (`@triton.jit` then decides
whether to interpret, triton's own helpers included), so it must be set before that first import:
before the first backend="triton" call of the process, not necessarily before `import kernels`.
"""

from __future__ import annotations

import contextlib
import os

import torch

from kernels import _csrc

BACKENDS = ("auto", "triton", "torch", "csrc")

_auto_means: str | None = None  # set by `auto_backend`


@contextlib.contextmanager
def auto_backend(backend: str):
    """Inside the block, `backend="auto"` (what the engine's models use) means `backend`: e.g.
    "torch" to compare the reference ops with the csrc ones in one process (bench/), or to rule the
    fused ops out while debugging a numerical difference. Not thread-safe; read at trace time by
    torch.compile."""
    global _auto_means
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    previous, _auto_means = _auto_means, None if backend == "auto" else backend
    try:
        yield
    finally:
        _auto_means = previous


def triton_interpreting() -> bool:
    """Whether TRITON_INTERPRET=1 is set: Triton kernels then run in Python on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_triton_imports: bool | None = None  # triton_available()'s answer, once known


def triton_available() -> bool:
    """Whether triton imports. Tried once, on the first call (the kernels' own imports then come
    from the module cache); the answer is kept in a module global rather than a functools.cache so
    that torch.compile reads a constant instead of tracing through a cache wrapper."""
    global _triton_imports
    if _triton_imports is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            _triton_imports = False
        else:
            _triton_imports = True
    return _triton_imports


def csrc_loaded() -> bool:
    """Whether the csrc op library's ops are registered (it is loaded once, on the first import of
    this module; a global read, so torch.compile sees a constant)."""
    return _csrc.loaded()


# Loaded here, when `kernels` is first imported and before any op module registers the library's
# fake and autograd implementations; never inside a traced function.
_csrc.load()


def triton_unusable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on tensors on `device`; otherwise why not, in words."""
    if not triton_available():
        return "triton is not installed; use backend='torch' or 'auto'"
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
        return None
    if device.type == "cpu":
        return ("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before triton is first "
                "imported); use backend='torch' or 'auto'")
    return f"backend='triton' needs CUDA tensors, got tensors on {device}; use backend='torch' or 'auto'"


def backend_for_device(backend: str, device: torch.device) -> str:
    """The backend that runs for tensors on `device`, "triton", "csrc" or "torch": see the module
    docstring. ValueError for an unknown backend or one that cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto" and _auto_means is not None:
        backend = _auto_means
    if backend == "csrc":
        if not csrc_loaded():
            raise ValueError(f"backend='csrc': {_csrc.problem()}; use 'auto' or 'torch'")
        if device.type != "cpu":
            raise ValueError(f"backend='csrc' has CPU ops only, got tensors on {device}; use 'auto'")
        return "csrc"
    if backend == "torch":
        return "torch"
    if backend == "triton":
        reason = triton_unusable_reason(device)
        if reason is not None:
            raise ValueError(reason)
        return "triton"
    # auto: the interpreter is never chosen here, only when "triton" is asked for explicitly.
    if device.type == "cuda":
        return "triton" if triton_available() else "torch"
    return "csrc" if device.type == "cpu" and csrc_loaded() else "torch"


def resolve_backend(backend: str, *tensors: torch.Tensor | None, has_csrc: bool = True) -> str:
    """`backend_for_device` for the one device these tensors are on (None entries are skipped), for
    an op that has a csrc implementation or (has_csrc=False) not: then "auto" falls to the torch
    reference where it would pick csrc, and "csrc" is a ValueError. ValueError for an unknown or
    unusable backend, and for tensors on more than one device."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    device = devices.pop() if devices else torch.device("cpu")
    if has_csrc:
        return backend_for_device(backend, device)
    if backend == "csrc":
        raise ValueError("backend='csrc': this op has no csrc implementation; use 'auto' or 'torch'")
    resolved = backend_for_device(backend, device)
    return "torch" if resolved == "csrc" else resolved
