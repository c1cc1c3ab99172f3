"""Triton kernels and launchers of `kernels.group_norm_film_silu` (see that module's docstring for
the maths and the notation). Imported only when the Triton backend runs, so that `import kernels`
works where triton is not installed; the torch.library ops that call these launchers are defined,
with their fake and autograd implementations, in `kernels.group_norm_film_silu`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements per tile held in registers: forward tiles hold x; backward tiles hold x and dy.
_FORWARD_TILE = 4096
_BACKWARD_TILE = 2048


# ----------------------------------------------------------------------------------------------
# Triton kernels. One program per (batch row, group); the group is walked in [BLOCK_C, BLOCK_S]
# tiles (channels x flattened spatial positions), masked at the edges.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _film_coefficients(weight_ptr, bias_ptr, scale_ptr, shift_ptr, b, cols, col_mask,
                       scale_stride_b, scale_stride_c, shift_stride_b, shift_stride_c,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """Per-channel a = weight * (1 + scale) and offset = bias * (1 + scale) + shift, [BLOCK_C] fp32."""
    one_plus_scale = tl.full(cols.shape, 1.0, tl.float32)
    if HAS_SCALE:
        one_plus_scale += tl.load(scale_ptr + b * scale_stride_b + cols * scale_stride_c,
                                  mask=col_mask, other=0.0).to(tl.float32)
    a = one_plus_scale
    if HAS_WEIGHT:
        a = a * tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    offset = tl.zeros(cols.shape, tl.float32)
    if HAS_BIAS:
        offset = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) * one_plus_scale
    if HAS_SHIFT:
        offset += tl.load(shift_ptr + b * shift_stride_b + cols * shift_stride_c,
                          mask=col_mask, other=0.0).to(tl.float32)
    return a, offset


@triton.jit
def _group_norm_film_silu_fwd_kernel(
    x_ptr, y_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
    x_stride_b, x_stride_c, x_stride_s, y_stride_b, y_stride_c, y_stride_s,
    scale_stride_b, scale_stride_c, shift_stride_b, shift_stride_c,
    num_groups, channels_per_group, spatial, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // num_groups).to(tl.int64)  # int64: b * stride_b passes 2**31 on large activations
    first_channel = (pid % num_groups) * channels_per_group
    x_base = x_ptr + b * x_stride_b
    y_base = y_ptr + b * y_stride_b
    channel_range = tl.arange(0, BLOCK_C)
    spatial_range = tl.arange(0, BLOCK_S)

    # Pass 1: mean and variance. Trap: with E[x^2] - E[x]^2, or even a plain fp32 sum, data offset
    # by 1e4 with spread 0.1 loses the spread. So every value is taken relative to a pivot (the
    # group's first element; x - pivot is exact for nearby values), and tiles are merged with
    # Chan's parallel update of (count, mean, m2 = sum of squared deviations).
    pivot = tl.load(x_base + first_channel * x_stride_c).to(tl.float32)
    count = 0.0
    mean_from_pivot = 0.0
    m2 = 0.0
    for c0 in range(0, channels_per_group, BLOCK_C):
        cols = first_channel + c0 + channel_range
        col_mask = (c0 + channel_range) < channels_per_group
        for s0 in range(0, spatial, BLOCK_S):
            positions = s0 + spatial_range
            mask = col_mask[:, None] & (positions < spatial)[None, :]
            x = tl.load(x_base + cols[:, None] * x_stride_c + positions[None, :] * x_stride_s,
                        mask=mask, other=0.0).to(tl.float32)
            tile_count = tl.sum(mask.to(tl.float32))
            tile_mean = tl.sum(tl.where(mask, x - pivot, 0.0)) / tile_count
            deviation = tl.where(mask, x - pivot - tile_mean, 0.0)
            tile_m2 = tl.sum(deviation * deviation)
            merged_count = count + tile_count
            delta = tile_mean - mean_from_pivot
            mean_from_pivot += delta * (tile_count / merged_count)
            m2 += tile_m2 + delta * delta * (count * tile_count / merged_count)
            count = merged_count
    rstd = tl.rsqrt(m2 / count + eps)
    # Trap: an fp32 mean of data at 1e4 is only good to 1e-3 (1% of a 0.1 spread): store fp64.
    tl.store(mean_ptr + pid, pivot.to(tl.float64) + mean_from_pivot.to(tl.float64))
    tl.store(rstd_ptr + pid, rstd)

    # Pass 2: normalise, FiLM, SiLU, store in y's dtype.
    for c0 in range(0, channels_per_group, BLOCK_C):
        cols = first_channel + c0 + channel_range
        col_mask = (c0 + channel_range) < channels_per_group
        a, offset = _film_coefficients(weight_ptr, bias_ptr, scale_ptr, shift_ptr, b, cols, col_mask,
                                       scale_stride_b, scale_stride_c, shift_stride_b, shift_stride_c,
                                       HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
        for s0 in range(0, spatial, BLOCK_S):
            positions = s0 + spatial_range
            mask = col_mask[:, None] & (positions < spatial)[None, :]
            # Masked lanes read the pivot so that they stay small (no overflow in the sigmoid).
            x = tl.load(x_base + cols[:, None] * x_stride_c + positions[None, :] * x_stride_s,
                        mask=mask, other=pivot).to(tl.float32)
            xhat = (x - pivot - mean_from_pivot) * rstd
            u = xhat * a[:, None] + offset[:, None]
            if ACT:
                u = u * tl.sigmoid(u)
            tl.store(y_base + cols[:, None] * y_stride_c + positions[None, :] * y_stride_s,
                     u.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _film_silu_input_grad(x, dy, pivot, mean_from_pivot, rstd, a, offset, ACT: tl.constexpr):
    """Recompute xhat from x and return (xhat, du): du = dy * silu'(u), the gradient at u."""
    xhat = (x - pivot - mean_from_pivot) * rstd
    du = dy
    if ACT:
        u = xhat * a[:, None] + offset[:, None]
        sig = tl.sigmoid(u)
        du = dy * sig * (1.0 + u * (1.0 - sig))
    return xhat, du


@triton.jit
def _group_norm_film_silu_bwd_kernel(
    dy_ptr, x_ptr, dx_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
    sum_du_ptr, sum_du_xhat_ptr,
    dy_stride_b, dy_stride_c, dy_stride_s, x_stride_b, x_stride_c, x_stride_s,
    dx_stride_b, dx_stride_c, dx_stride_s,
    scale_stride_b, scale_stride_c, shift_stride_b, shift_stride_c,
    num_groups, channels_per_group, spatial,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dx, plus per-(b, c) sums over space of du and du * xhat ([B, C] fp32), from which the
    caller forms dweight, dbias, dscale and dshift."""
    pid = tl.program_id(0)
    b = (pid // num_groups).to(tl.int64)
    first_channel = (pid % num_groups) * channels_per_group
    x_base = x_ptr + b * x_stride_b
    dy_base = dy_ptr + b * dy_stride_b
    dx_base = dx_ptr + b * dx_stride_b
    channel_range = tl.arange(0, BLOCK_C)
    spatial_range = tl.arange(0, BLOCK_S)
    # Same pivot as the forward, so x - mean keeps its precision (see the forward's pass 1).
    pivot = tl.load(x_base + first_channel * x_stride_c).to(tl.float32)
    mean_from_pivot = (tl.load(mean_ptr + pid) - pivot.to(tl.float64)).to(tl.float32)
    rstd = tl.load(rstd_ptr + pid)

    # Pass 1: per-channel sums of du and du * xhat; with dxhat = a * du, the group sums of dxhat
    # and dxhat * xhat that dx needs are sums over channels of a times those.
    group_sum_dxhat = 0.0
    group_sum_dxhat_xhat = 0.0
    for c0 in range(0, channels_per_group, BLOCK_C):
        cols = first_channel + c0 + channel_range
        col_mask = (c0 + channel_range) < channels_per_group
        a, offset = _film_coefficients(weight_ptr, bias_ptr, scale_ptr, shift_ptr, b, cols, col_mask,
                                       scale_stride_b, scale_stride_c, shift_stride_b, shift_stride_c,
                                       HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
        sum_du = tl.zeros((BLOCK_C,), tl.float32)
        sum_du_xhat = tl.zeros((BLOCK_C,), tl.float32)
        for s0 in range(0, spatial, BLOCK_S):
            positions = s0 + spatial_range
            mask = col_mask[:, None] & (positions < spatial)[None, :]
            x = tl.load(x_base + cols[:, None] * x_stride_c + positions[None, :] * x_stride_s,
                        mask=mask, other=pivot).to(tl.float32)
            dy = tl.load(dy_base + cols[:, None] * dy_stride_c + positions[None, :] * dy_stride_s,
                         mask=mask, other=0.0).to(tl.float32)
            xhat, du = _film_silu_input_grad(x, dy, pivot, mean_from_pivot, rstd, a, offset, ACT)
            du = tl.where(mask, du, 0.0)
            sum_du += tl.sum(du, axis=1)
            sum_du_xhat += tl.sum(du * xhat, axis=1)
        tl.store(sum_du_ptr + b * num_groups * channels_per_group + cols, sum_du, mask=col_mask)
        tl.store(sum_du_xhat_ptr + b * num_groups * channels_per_group + cols, sum_du_xhat, mask=col_mask)
        group_sum_dxhat += tl.sum(a * sum_du)
        group_sum_dxhat_xhat += tl.sum(a * sum_du_xhat)
    count = channels_per_group * spatial
    mean_dxhat = group_sum_dxhat / count
    mean_dxhat_xhat = group_sum_dxhat_xhat / count

    # Pass 2: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
    for c0 in range(0, channels_per_group, BLOCK_C):
        cols = first_channel + c0 + channel_range
        col_mask = (c0 + channel_range) < channels_per_group
        a, offset = _film_coefficients(weight_ptr, bias_ptr, scale_ptr, shift_ptr, b, cols, col_mask,
                                       scale_stride_b, scale_stride_c, shift_stride_b, shift_stride_c,
                                       HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
        for s0 in range(0, spatial, BLOCK_S):
            positions = s0 + spatial_range
            mask = col_mask[:, None] & (positions < spatial)[None, :]
            x = tl.load(x_base + cols[:, None] * x_stride_c + positions[None, :] * x_stride_s,
                        mask=mask, other=pivot).to(tl.float32)
            dy = tl.load(dy_base + cols[:, None] * dy_stride_c + positions[None, :] * dy_stride_s,
                         mask=mask, other=0.0).to(tl.float32)
            xhat, du = _film_silu_input_grad(x, dy, pivot, mean_from_pivot, rstd, a, offset, ACT)
            dx = rstd * (du * a[:, None] - mean_dxhat - xhat * mean_dxhat_xhat)
            tl.store(dx_base + cols[:, None] * dx_stride_c + positions[None, :] * dx_stride_s,
                     dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers: take preallocated outputs (so tests can poison them) and pick the tiling. Every
# [B, C, H, W] argument must be in the layout `_kernel_layout` (kernels.group_norm_film_silu) gives.
# ----------------------------------------------------------------------------------------------


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, channel, flattened spatial) strides of a [B, C, H, W] tensor whose H and W flatten into
    one axis (contiguous, channels_last, expanded): the spatial stride is then W's, or H's when W == 1."""
    return t.stride(0), t.stride(1), t.stride(2) if t.shape[3] == 1 else t.stride(3)


def _tiling(channels_per_group: int, spatial: int, tile: int) -> dict:
    """Tile shape [BLOCK_C, BLOCK_S] (powers of two, about `tile` elements) and warps for it."""
    block_s = min(triton.next_power_of_2(spatial), tile)
    block_c = min(triton.next_power_of_2(channels_per_group), max(tile // block_s, 1))
    num_warps = 8 if block_c * block_s >= 2048 else 4
    return {"BLOCK_C": block_c, "BLOCK_S": block_s, "num_warps": num_warps}


def _film_arguments(weight, bias, scale, shift, placeholder):
    """Pointers (a placeholder tensor for absent ones), strides and presence flags for the FiLM terms."""
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))  # read with stride 1

    def pointer(t):
        return placeholder if t is None else t

    def stride(t):
        return (0, 0) if t is None else (t.stride(0), t.stride(1))

    pointers = [pointer(weight), pointer(bias), pointer(scale), pointer(shift)]
    strides = [*stride(scale), *stride(shift)]
    flags = {"HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None,
             "HAS_SCALE": scale is not None, "HAS_SHIFT": shift is not None}
    return pointers, strides, flags


def launch_forward(x, y, mean, rstd, num_groups, weight, bias, scale, shift, eps, act):
    """Write y [B, C, H, W], mean [B, G] fp64 and rstd [B, G] fp32."""
    B, C, H, W = x.shape
    channels_per_group = C // num_groups
    pointers, film_strides, flags = _film_arguments(weight, bias, scale, shift, x)
    _group_norm_film_silu_fwd_kernel[(B * num_groups,)](
        x, y, *pointers, mean, rstd, *_strides(x), *_strides(y), *film_strides,
        num_groups, channels_per_group, H * W, eps, ACT=act, **flags,
        **_tiling(channels_per_group, H * W, _FORWARD_TILE),
    )


def launch_backward(dy, x, dx, mean, rstd, sum_du, sum_du_xhat, num_groups, weight, bias, scale, shift,
                    act):
    """Write dx [B, C, H, W] and the per-(b, c) sums of du and du * xhat ([B, C] fp32, contiguous)."""
    B, C, H, W = x.shape
    channels_per_group = C // num_groups
    pointers, film_strides, flags = _film_arguments(weight, bias, scale, shift, x)
    _group_norm_film_silu_bwd_kernel[(B * num_groups,)](
        dy, x, dx, *pointers, mean, rstd, sum_du, sum_du_xhat,
        *_strides(dy), *_strides(x), *_strides(dx), *film_strides,
        num_groups, channels_per_group, H * W, ACT=act, **flags,
        **_tiling(channels_per_group, H * W, _BACKWARD_TILE),
    )
