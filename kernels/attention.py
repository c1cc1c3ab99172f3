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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v of shape [B, heads, L, d]; returns [B, heads, L, d]."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention expects q [B,h,Lq,d], k and v [B,h,Lk,d]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    use_xformers = backend == "xformers" or (backend == "auto" and q.is_cuda and _xformers_ops() is not None)
    if use_xformers:
        xops = _xformers_ops()
        if xops is None or not q.is_cuda:
            raise ValueError("attention backend 'xformers' needs xformers installed and CUDA tensors")
        # xformers wants [B, L, heads, d]
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)
