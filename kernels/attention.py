"""Multi-head attention backends: xformers' memory_efficient_attention on CUDA when it imports and
accepts the inputs, else PyTorch's scaled_dot_product_attention (which has its own flash /
memory-efficient kernels).

Both fused paths need q, k and v with stride 1 along d (the last dimension): SDPA otherwise falls
back to its fp32 "math" kernel, which stores [B, heads, L, L] matrices, and xformers refuses them.

Beyond first derivatives. The fused kernels (SDPA's and xformers') have a backward with no
derivative of its own and no forward-mode rule, so a backward taken with create_graph=True and
differentiated again (LGT's Hutchinson divergence penalty) or a torch.func.jvp (flow map matching)
would fail or be wrong through them. Code that needs those runs under `unfused_attention()`, inside
which attention is written out as plain tensor ops (softmax(q k^T) v in fp32, as SDPA's math kernel
computes it): differentiable to any order, in forward mode and under vmap. Everywhere else the
fused kernels run with nothing wrapped around them (torch.compile traces them without a break).
xformers is an optional build for one torch and CUDA: with `backend="auto"` an xformers that imports
but rejects the inputs (or was built for another GPU) is skipped for SDPA, with one warning.

Key padding (cross-attention to a padded prompt context): `key_padding_mask` [B, Lk] bool, True for
a real key. It reaches SDPA as an additive bias [B, 1, 1, Lk] (0 or -inf), which rules out SDPA's
flash kernel and leaves its memory-efficient one (masks of any length; the prompt tables keep Lk a
multiple of 8 so the bias needs no padding there). Masked attention does not go through xformers,
whose tensor biases need a [B, heads, Lq, Lk] layout of their own: `backend="xformers"` with a mask
is a ValueError. Every row must keep at least one key, or its softmax is 0/0."""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Iterator

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


def _check_inputs(q, k, v, key_padding_mask):
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
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or key_padding_mask.shape != (k.shape[0], k.shape[2])
                                         or key_padding_mask.device != k.device):
        raise ValueError(f"attention: key_padding_mask must be a bool tensor [B, Lk] = {[k.shape[0], k.shape[2]]} "
                         f"on {k.device}, got {key_padding_mask.dtype} {list(key_padding_mask.shape)} on "
                         f"{key_padding_mask.device}")


@functools.cache
def _warn_xformers_rejected(reason: str) -> None:
    warnings.warn(f"xformers rejected the attention inputs ({reason}); using PyTorch SDPA", stacklevel=3)


def _xformers_attention(xops, q, k, v):
    # xformers takes [B, L, heads, d]: a transposed view of [B, heads, L, d], stride 1 along d kept.
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _padding_bias(key_padding_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, Lk] bool (True = attend) -> additive bias [B, 1, 1, Lk]: 0 where kept, -inf where masked."""
    bias = torch.zeros(key_padding_mask.shape, dtype=dtype, device=key_padding_mask.device)
    return bias.masked_fill(~key_padding_mask, float("-inf"))[:, None, None, :]


def _written_out_attention(q, k, v, key_padding_mask=None):
    """softmax(q k^T / sqrt(d)) v in fp32 (SDPA's math formulation), in q's dtype: differentiable
    as many times as needed; it stores the [B, heads, Lq, Lk] probabilities."""
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    if key_padding_mask is not None:
        scores = scores + _padding_bias(key_padding_mask, torch.float32)
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


_unfused = threading.local()


@contextlib.contextmanager
def unfused_attention() -> Iterator[None]:
    """Attention inside this block runs as plain tensor ops (see the module doc)."""
    previous = getattr(_unfused, "active", False)
    _unfused.active = True
    try:
        yield
    finally:
        _unfused.active = previous


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto",
              key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q [B, heads, Lq, d], k and v [B, heads, Lk, d]; returns
    [B, heads, Lq, d]. `key_padding_mask` [B, Lk] bool: only keys marked True are attended to.

    q, k and v must be floating point of one dtype on one device (ValueError otherwise); the result
    has that dtype and is differentiable in all three. backend: "auto" (xformers on CUDA when it
    imports and accepts the inputs, else SDPA), "sdpa", or "xformers" (ValueError without xformers
    and CUDA tensors, or when xformers rejects the inputs). Give q, k and v stride 1 along d for
    the fused kernels (see the module doc).
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    _check_inputs(q, k, v, key_padding_mask)
    if getattr(_unfused, "active", False):
        return _written_out_attention(q, k, v, key_padding_mask)
    if key_padding_mask is not None:
        if backend == "xformers":
            raise ValueError("attention backend 'xformers' does not take a key_padding_mask here; use 'sdpa'")
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_padding_bias(key_padding_mask, q.dtype))
    if backend == "xformers":
        xops = _xformers_ops()
        if xops is None or not q.is_cuda:
            raise ValueError("attention backend 'xformers' needs xformers installed and CUDA tensors")
        try:
            return _xformers_attention(xops, q, k, v)
        except NotImplementedError as err:  # xformers' "no operator found for these inputs"
            raise ValueError(f"attention backend 'xformers' rejected the inputs: {err}") from err
    if backend == "auto" and q.is_cuda and _xformers_ops() is not None:
        try:
            return _xformers_attention(_xformers_ops(), q, k, v)
        except (NotImplementedError, ValueError) as err:  # rejected inputs, or a build for another GPU
            _warn_xformers_rejected(str(err).splitlines()[0] if str(err) else type(err).__name__)
    return F.scaled_dot_product_attention(q, k, v)
