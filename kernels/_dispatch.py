"""Backend selection shared by every op in `kernels`: the one place that maps `backend=` to code.

    "auto"    Triton for CUDA tensors (the torch reference there when triton is not installed); for
              tensors anywhere else the csrc op library once it is built and loaded, else the
              pure-PyTorch reference. Never the Triton interpreter: interpreting a kernel on CPU is
              orders of magnitude slower than the reference.
    "triton"  the Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (how the
              tests run the kernels without a GPU). ValueError anywhere else, or without triton.
    "torch"   the pure-PyTorch reference, on any device.
    "csrc"    the C++/CUDA op library; not built in this version, so a ValueError.

triton is imported only when the Triton backend is asked for or chosen (`triton_available`, then
each op's private `_triton_*` module), so `import kernels` and the torch path work where triton is
not installed. TRITON_INTERPRET is read by triton when it is imported (`@triton.jit` then decides
whether to interpret, triton's own helpers included), so it must be set before that first import:
before the first backend="triton" call of the process, not necessarily before `import kernels`.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch", "csrc")


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
    """Whether the csrc op library is loaded. It is not built in this version; once it is, this
    reports whether its ops were registered, `auto` picks it for tensors off CUDA, and each op gains
    the branch that runs it."""
    return False


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
    """The backend that runs for tensors on `device`, "triton" or "torch" ("csrc" only once that
    library is loaded): see the module docstring. ValueError for an unknown backend or one that
    cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "csrc":
        # The structure once csrc is built: return "csrc" here when csrc_loaded(), else this error.
        raise ValueError("backend='csrc': the csrc op library is not built in this installation; "
                         "use 'auto', 'triton' or 'torch'")
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
    return "csrc" if csrc_loaded() else "torch"


def resolve_backend(backend: str, *tensors: torch.Tensor | None) -> str:
    """`backend_for_device` for the one device these tensors are on (None entries are skipped).
    ValueError for an unknown or unusable backend, and for tensors on more than one device."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    device = devices.pop() if devices else torch.device("cpu")
    return backend_for_device(backend, device)
