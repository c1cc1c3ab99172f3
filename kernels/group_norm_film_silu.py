"""GroupNorm -> FiLM -> SiLU: y = silu((groupnorm(x) * weight + bias) * (1 + scale) + shift)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._dispatch import resolve_backend


def _check_inputs(x, num_groups, weight, bias, scale, shift):
    if x.dim() != 4:
        raise ValueError(f"group_norm_film_silu: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    B, C = x.shape[:2]
    if num_groups <= 0 or C % num_groups != 0:
        raise ValueError(f"group_norm_film_silu: C={C} is not divisible by num_groups={num_groups}")
    for name, t, shape in (("weight", weight, (C,)), ("bias", bias, (C,)),
                           ("scale", scale, (B, C)), ("shift", shift, (B, C))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"group_norm_film_silu: {name} must have shape {shape}, got {tuple(t.shape)}")


def group_norm_film_silu_reference(x, num_groups, weight=None, bias=None, scale=None, shift=None,
                                   eps=1e-5, act=True):
    """Pure-PyTorch reference: statistics and maths in fp32, output in x's dtype."""
    h = F.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if scale is not None:
        h = h * (1 + scale.float()[:, :, None, None])
    if shift is not None:
        h = h + shift.float()[:, :, None, None]
    if act:
        h = F.silu(h)
    return h.to(x.dtype)


def group_norm_film_silu(x, num_groups, weight=None, bias=None, scale=None, shift=None,
                         eps=1e-5, act=True, backend="auto"):
    _check_inputs(x, num_groups, weight, bias, scale, shift)
    resolved = resolve_backend(backend, x, weight, bias, scale, shift)
    if resolved == "torch":
        return group_norm_film_silu_reference(x, num_groups, weight, bias, scale, shift, eps, act)
    raise NotImplementedError("the Triton group_norm_film_silu kernel is not written yet")
