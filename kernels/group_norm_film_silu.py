"""GroupNorm -> FiLM -> SiLU: y = silu((groupnorm(x) * weight + bias) * (1 + scale) + shift).

One fused Triton kernel forward (x read twice, y written once) and one backward that recomputes
the normalised value from x and the saved per-(batch, group) statistics (mean [B, G] in fp64,
rstd [B, G] in fp32), so no activation other than x is kept for backward. Both are `torch.library` custom ops (`lgt::group_norm_film_silu_fwd`,
`lgt::group_norm_film_silu_bwd`) with fake implementations and autograd, so torch.compile traces
through them without a graph break.

Layout: x is read through its strides, so contiguous and channels_last inputs need no copy. The
kernels index H and W as one spatial axis, which both layouts allow (stride_h == W * stride_w).

Notation used below, per batch row b and channel c (group g holds channels g*Cg .. g*Cg+Cg-1):
    xhat = (x - mean[b, g]) * rstd[b, g]
    u    = xhat * a[b, c] + offset[b, c],   a = weight * (1 + scale),   offset = bias * (1 + scale) + shift
    y    = silu(u)  (or u when act=False)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._dispatch import resolve_backend

# Elements per tile held in registers: forward tiles hold x; backward tiles hold x and dy.
_FORWARD_TILE = 4096
_BACKWARD_TILE = 2048


def _check_inputs(x, num_groups, weight, bias, scale, shift):
    if x.dim() != 4:
        raise ValueError(f"group_norm_film_silu: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    B, C = x.shape[:2]
    if num_groups <= 0 or C % num_groups != 0:
        raise ValueError(f"group_norm_film_silu: C={C} is not divisible by num_groups={num_groups}")
    for name, t, shape in (("x", x, None), ("weight", weight, (C,)), ("bias", bias, (C,)),
                           ("scale", scale, (B, C)), ("shift", shift, (B, C))):
        if t is None:
            continue
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"group_norm_film_silu: {name} must have shape {shape}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"group_norm_film_silu: {name} must be a floating-point tensor, got {t.dtype}")


def group_norm_film_silu_reference(x, num_groups, weight=None, bias=None, scale=None, shift=None,
                                   eps=1e-5, act=True):
    """Pure-PyTorch reference: statistics and maths in fp32 (fp64 for fp64 x), output in x's dtype."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)

    def up(t):
        return None if t is None else t.to(compute_dtype)

    if weight is None and bias is not None:
        # Trap: F.group_norm's backward raises "tensor does not have a device" on CPU (torch 2.13)
        # when it is given a bias but no weight.
        weight = torch.ones_like(bias)
    h = F.group_norm(up(x), num_groups, up(weight), up(bias), eps)
    if scale is not None:
        h = h * (1 + up(scale)[:, :, None, None])
    if shift is not None:
        h = h + up(shift)[:, :, None, None]
    if act:
        h = F.silu(h)
    return h.to(x.dtype)


def group_norm_film_silu(x, num_groups, weight=None, bias=None, scale=None, shift=None,
                         eps=1e-5, act=True, backend="auto"):
    """Fused GroupNorm -> FiLM -> SiLU; see the module docstring. x [B, C, H, W], weight/bias [C],
    scale/shift [B, C] (any may be None), returns x's dtype and memory format."""
    _check_inputs(x, num_groups, weight, bias, scale, shift)
    resolved = resolve_backend(backend, x, weight, bias, scale, shift)
    if resolved == "torch":
        return group_norm_film_silu_reference(x, num_groups, weight, bias, scale, shift, eps, act)
    y, _, _ = torch.ops.lgt.group_norm_film_silu_fwd(x, num_groups, weight, bias, scale, shift,
                                                     float(eps), bool(act))
    return y


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
# Launchers: take preallocated outputs (so tests can poison them) and pick the tiling.
# ----------------------------------------------------------------------------------------------


def _spatial_stride(t: torch.Tensor) -> int | None:
    """Stride of the flattened H*W axis of a [B, C, H, W] tensor, or None if H and W cannot be
    flattened without a copy. True for contiguous, channels_last and expanded (stride 0) tensors."""
    _, _, H, W = t.shape
    if W == 1:
        return t.stride(2)
    if H == 1 or t.stride(2) == W * t.stride(3):
        return t.stride(3)
    return None


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """t itself when the kernels can read it through its strides, else a contiguous copy."""
    return t if _spatial_stride(t) is not None else t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, channel, flattened spatial) strides of a [B, C, H, W] tensor."""
    return t.stride(0), t.stride(1), _spatial_stride(t)


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


def _launch_forward(x, y, mean, rstd, num_groups, weight, bias, scale, shift, eps, act):
    """Write y [B, C, H, W], mean [B, G] fp64 and rstd [B, G] fp32. x and y in _kernel_layout."""
    B, C, H, W = x.shape
    channels_per_group = C // num_groups
    pointers, film_strides, flags = _film_arguments(weight, bias, scale, shift, x)
    _group_norm_film_silu_fwd_kernel[(B * num_groups,)](
        x, y, *pointers, mean, rstd, *_strides(x), *_strides(y), *film_strides,
        num_groups, channels_per_group, H * W, eps, ACT=act, **flags,
        **_tiling(channels_per_group, H * W, _FORWARD_TILE),
    )


def _launch_backward(dy, x, dx, mean, rstd, sum_du, sum_du_xhat, num_groups, weight, bias, scale, shift,
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


# ----------------------------------------------------------------------------------------------
# torch.library registration: forward and backward ops, their fake (meta) versions, autograd.
# ----------------------------------------------------------------------------------------------


def _empty_statistics(x, num_groups):
    B = x.shape[0]
    return (x.new_empty((B, num_groups), dtype=torch.float64),
            x.new_empty((B, num_groups), dtype=torch.float32))


@torch.library.custom_op("lgt::group_norm_film_silu_fwd", mutates_args=())
def _forward_op(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                scale: torch.Tensor | None, shift: torch.Tensor | None, eps: float, act: bool,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns y (x's dtype and layout), mean [B, G] fp64 and rstd [B, G] fp32."""
    x = _kernel_layout(x)
    y = torch.empty_like(x)
    mean, rstd = _empty_statistics(x, num_groups)
    _launch_forward(x, y, mean, rstd, num_groups, weight, bias, scale, shift, eps, act)
    return y, mean, rstd


@_forward_op.register_fake
def _forward_op_fake(x, num_groups, weight, bias, scale, shift, eps, act):
    return (torch.empty_like(_kernel_layout(x)), *_empty_statistics(x, num_groups))


@torch.library.custom_op("lgt::group_norm_film_silu_bwd", mutates_args=())
def _backward_op(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, num_groups: int,
                 weight: torch.Tensor | None, bias: torch.Tensor | None, scale: torch.Tensor | None,
                 shift: torch.Tensor | None, act: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dx (x's dtype) and the per-(b, c) sums over space of du and du * xhat ([B, C] fp32)."""
    x = _kernel_layout(x)
    dx = torch.empty_like(x)
    sum_du = x.new_empty(x.shape[:2], dtype=torch.float32)
    sum_du_xhat = torch.empty_like(sum_du)
    _launch_backward(_kernel_layout(dy), x, dx, mean, rstd, sum_du, sum_du_xhat, num_groups,
                     weight, bias, scale, shift, act)
    return dx, sum_du, sum_du_xhat


@_backward_op.register_fake
def _backward_op_fake(dy, x, mean, rstd, num_groups, weight, bias, scale, shift, act):
    sum_du = x.new_empty(x.shape[:2], dtype=torch.float32)
    return torch.empty_like(_kernel_layout(x)), sum_du, torch.empty_like(sum_du)


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, scale, shift, eps, act = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.num_groups = num_groups
    ctx.eps = eps
    ctx.act = act
    ctx.mark_non_differentiable(mean, rstd)


def _differentiable_backward(ctx, dy):
    """The backward as a graph of differentiable ops, for double backward (`create_graph=True`, e.g.
    LGT's Hutchinson divergence penalty): the Triton backward kernel has no derivative of its own,
    so the reference is differentiated instead. The saved inputs keep their autograd history."""
    x, weight, bias, scale, shift, _, _ = ctx.saved_tensors
    inputs = (x, weight, bias, scale, shift)
    y = group_norm_film_silu_reference(x, ctx.num_groups, weight, bias, scale, shift, ctx.eps, ctx.act)
    wanted = [t for t, needed in zip(inputs, (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:6]))
              if t is not None and needed]
    grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True))
    dx, dweight, dbias, dscale, dshift = (
        next(grads) if t is not None and needed else None
        for t, needed in zip(inputs, (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:6])))
    return dx, None, dweight, dbias, dscale, dshift, None, None


def _backward(ctx, dy, _dmean, _drstd):
    if torch.is_grad_enabled():  # backward(create_graph=True): a second derivative will be taken
        return _differentiable_backward(ctx, dy)
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    dx, sum_du, sum_du_xhat = torch.ops.lgt.group_norm_film_silu_bwd(
        dy, x, mean, rstd, ctx.num_groups, weight, bias, scale, shift, ctx.act)
    # With h = xhat * weight + bias and u = h * (1 + scale) + shift: dh = du * (1 + scale) and
    # dscale = sum du * h, so every FiLM and affine gradient is a [B, C]-sized combination of the
    # two sums; weight and bias are then reduced over the batch.
    one_plus_scale = 1.0 if scale is None else 1.0 + scale.float()
    dweight = dbias = dscale = dshift = None
    if weight is not None:
        dweight = (sum_du_xhat * one_plus_scale).sum(0).to(weight.dtype)
    if bias is not None:
        dbias = (sum_du * one_plus_scale).sum(0).to(bias.dtype)
    if scale is not None:
        dscale_fp32 = sum_du_xhat if weight is None else sum_du_xhat * weight.float()
        if bias is not None:
            dscale_fp32 = dscale_fp32 + sum_du * bias.float()
        dscale = dscale_fp32.to(scale.dtype)
    if shift is not None:
        dshift = sum_du.to(shift.dtype)
    return dx, None, dweight, dbias, dscale, dshift, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)
