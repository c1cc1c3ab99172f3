"""Multi-head attention backends: xformers' memory_efficient_attention on CUDA when it imports and
runs, else PyTorch's scaled_dot_product_attention (which has its own flash/mem-efficient kernels)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("auto", "sdpa", "xformers")


@functools.cache
def _xformers_ops():
    try:
        import xformers.ops as xops
    except Exception:  # noqa: BLE001 - a broken xformers build raises all sorts; treat as absent
        return None
    return xops


def _check_inputs(q, k, v):
    # ValueError like every other bad argument (the kernels contract), not TypeError.
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"attention: {name} must be a tensor, got {type(t).__name__}")  # noqa: TRY004
    if (q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2]
            or q.shape[-1] != k.shape[-1]):
        raise ValueError(f"attention expects q [B,h,Lq,d], k and v [B,h,Lk,d]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.is_floating_point() and q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k and v must be floating point of one dtype, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"attention: q, k and v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v of shape [B, heads, L, d]; returns [B, heads, L, d].

    q, k and v must be floating point of one dtype on one device (ValueError otherwise); the result
    has that dtype and is differentiable in all three. backend: "auto" (xformers on CUDA when it
    imports, else SDPA), "sdpa", or "xformers" (ValueError without xformers and CUDA tensors).
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    _check_inputs(q, k, v)
    use_xformers = backend == "xformers" or (backend == "auto" and q.is_cuda and _xformers_ops() is not None)
    if use_xformers:
        xops = _xformers_ops()
        if xops is None or not q.is_cuda:
            raise ValueError("attention backend 'xformers' needs xformers installed and CUDA tensors")
        # xformers wants [B, L, heads, d]
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)
