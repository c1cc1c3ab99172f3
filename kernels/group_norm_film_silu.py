"""GroupNorm -> FiLM -> SiLU: y = silu((groupnorm(x) * weight + bias) * (1 + scale) + shift).

One fused Triton kernel forward (x read twice, y written once) and one backward that recomputes
the normalised value from x and the saved per-(batch, group) statistics (mean [B, G] in fp64,
rstd [B, G] in fp32), so no activation other than x is kept for backward. Both are
`torch.library` custom ops (`lgt::group_norm_film_silu_fwd`, `lgt::group_norm_film_silu_bwd`) with
fake implementations and autograd, so torch.compile traces through them without a graph break.
The ops are registered here, without triton; their Triton kernels and launchers live in
`kernels._triton_group_norm`, imported the first time an op runs. backend="csrc" (and "auto" on CPU
tensors when the library is loaded) runs `lgt::csrc_group_norm_film_silu` of
csrc/group_norm_film_silu.cpp: C++ forward / backward ops with the schemas of the two above (and
statistics and sums in float64 for float64 x), under an autograd Function written in C++ too (a
Python one costs more than the kernels at a CPU run's sizes); their fake versions are registered here.

Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) and vmap: a torch.library custom op
carries no jvp rule, and under torch.func.jvp it silently returns a zero tangent. So while a
torch.func transform or a forward-AD level is active the op runs through `_FusedForwardAD`, an
autograd.Function around the same forward op with the same backward, a jvp rule (`film_tangent`,
the analytic tangent) and a vmap rule (the vmapped dimension folded into the batch, so the kernel
runs once for the whole vmapped batch). Plain autograd and torch.compile see the custom op itself.

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

from kernels._dispatch import csrc_loaded, resolve_backend


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
    if resolved == "csrc":
        if _transform_active():  # the C++ ops carry no jvp / vmap rules; the reference works everywhere
            return group_norm_film_silu_reference(x, num_groups, weight, bias, scale, shift, eps, act)
        return torch.ops.lgt.csrc_group_norm_film_silu(x, num_groups, weight, bias, scale, shift,
                                                       float(eps), bool(act))
    if _transform_active():
        y, _, _ = _FusedForwardAD.apply(x, num_groups, weight, bias, scale, shift, float(eps), bool(act))
        return y
    y, _, _ = torch.ops.lgt.group_norm_film_silu_fwd(x, num_groups, weight, bias, scale, shift,
                                                     float(eps), bool(act))
    return y


# ----------------------------------------------------------------------------------------------
# Memory layout the kernels read.
# ----------------------------------------------------------------------------------------------


def _flattens_spatially(t: torch.Tensor) -> bool:
    """Whether H and W of a [B, C, H, W] tensor can be read as one spatial axis through its strides:
    true for contiguous, channels_last and expanded (stride 0) tensors."""
    _, _, H, W = t.shape
    return W == 1 or H == 1 or t.stride(2) == W * t.stride(3)


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """t itself when the kernels can read it through its strides, else a contiguous copy."""
    return t if _flattens_spatially(t) else t.contiguous()


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
    from kernels._triton_group_norm import launch_forward

    x = _kernel_layout(x)
    y = torch.empty_like(x)
    mean, rstd = _empty_statistics(x, num_groups)
    launch_forward(x, y, mean, rstd, num_groups, weight, bias, scale, shift, eps, act)
    return y, mean, rstd


@_forward_op.register_fake
def _forward_op_fake(x, num_groups, weight, bias, scale, shift, eps, act):
    return (torch.empty_like(_kernel_layout(x)), *_empty_statistics(x, num_groups))


@torch.library.custom_op("lgt::group_norm_film_silu_bwd", mutates_args=())
def _backward_op(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, num_groups: int,
                 weight: torch.Tensor | None, bias: torch.Tensor | None, scale: torch.Tensor | None,
                 shift: torch.Tensor | None, act: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dx (x's dtype) and the per-(b, c) sums over space of du and du * xhat ([B, C] fp32)."""
    from kernels._triton_group_norm import launch_backward

    x = _kernel_layout(x)
    dx = torch.empty_like(x)
    sum_du = x.new_empty(x.shape[:2], dtype=torch.float32)
    sum_du_xhat = torch.empty_like(sum_du)
    launch_backward(_kernel_layout(dy), x, dx, mean, rstd, sum_du, sum_du_xhat, num_groups,
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
    # two sums; weight and bias are then reduced over the batch. (csrc/group_norm_film_silu.cpp
    # does the same in C++.)
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


# ----------------------------------------------------------------------------------------------
# The csrc library's ops (defined in C++, with their autograd): fake versions, for torch.compile.
# ----------------------------------------------------------------------------------------------


def _csrc_layout(x):
    """The layout the C++ ops read (and write y in): contiguous or channels_last, else a copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _csrc_accumulation_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _csrc_forward_fake(x, num_groups, weight, bias, scale, shift, eps, act):
    B = x.shape[0]
    return (torch.empty_like(_csrc_layout(x)), x.new_empty((B, num_groups), dtype=torch.float64),
            x.new_empty((B, num_groups), dtype=_csrc_accumulation_dtype(x)))


def _csrc_backward_fake(dy, x, mean, rstd, num_groups, weight, bias, scale, shift, act):
    sum_du = x.new_empty(x.shape[:2], dtype=_csrc_accumulation_dtype(x))
    return torch.empty_like(_csrc_layout(x)), sum_du, torch.empty_like(sum_du)


def _csrc_fake(x, num_groups, weight, bias, scale, shift, eps, act):
    return torch.empty_like(_csrc_layout(x))


if csrc_loaded():
    torch.library.register_fake("lgt::csrc_group_norm_film_silu")(_csrc_fake)
    torch.library.register_fake("lgt::csrc_group_norm_film_silu_fwd")(_csrc_forward_fake)
    torch.library.register_fake("lgt::csrc_group_norm_film_silu_bwd")(_csrc_backward_fake)


# ----------------------------------------------------------------------------------------------
# Forward-mode AD and vmap: the op inside an autograd.Function that has jvp and vmap rules.
# ----------------------------------------------------------------------------------------------


def _transform_active() -> bool:
    """Whether a torch.func transform (jvp, vmap, grad, ...) or a forward-AD dual level is active."""
    return torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0


def film_tangent(x, num_groups, weight, bias, scale, shift, eps, act, dx, dweight, dbias, dscale, dshift):
    """The tangent of y for tangents dx, dweight, ... of the inputs (any may be None = zero).

    Per group, with xhat = (x - mean) * rstd:
        dxhat = rstd * (dx - mean(dx) - xhat * mean(xhat * dx))
        dh    = dxhat * weight + xhat * dweight + dbias                  (h = xhat * weight + bias)
        du    = dh * (1 + scale) + h * dscale + dshift                   (u = h * (1 + scale) + shift)
        dy    = du * silu'(u),  silu'(u) = sigmoid(u) * (1 + u * (1 - sigmoid(u)))
    The statistics are recomputed here from x with differentiable ops rather than taken from the
    kernel (whose mean and rstd are non-differentiable outputs): the tangent is then an ordinary
    autograd graph of the inputs and their tangents, so a loss on it (flow map matching's time
    derivative) backpropagates exactly. Computed in fp32 (fp64 for fp64 x), returned in x's dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    B = x.shape[0]
    x_groups = x.to(dtype).reshape(B, num_groups, -1)
    var, mean = torch.var_mean(x_groups, dim=2, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat_groups = (x_groups - mean) * rstd
    xhat = xhat_groups.reshape(x.shape)

    def per_channel(t):  # [C] or [B, C] -> broadcastable against [B, C, H, W]
        if t is None:
            return None
        t = t.to(dtype)
        return t[:, :, None, None] if t.dim() == 2 else t[None, :, None, None]

    w, b, s, sh, dw, db, ds, dsh = map(per_channel, (weight, bias, scale, shift, dweight, dbias, dscale, dshift))
    h = xhat if w is None else xhat * w
    h = h if b is None else h + b
    dh = torch.zeros_like(xhat)
    if dx is not None:
        dx_groups = dx.to(dtype).reshape(B, num_groups, -1)
        dxhat = rstd * (dx_groups - dx_groups.mean(2, keepdim=True)
                        - xhat_groups * (xhat_groups * dx_groups).mean(2, keepdim=True))
        dxhat = dxhat.reshape(x.shape)
        dh = dxhat if w is None else dxhat * w
    if dw is not None:
        dh = dh + xhat * dw
    if db is not None:
        dh = dh + db
    u, du = (h, dh) if s is None else (h * (1 + s), dh * (1 + s))
    if ds is not None:
        du = du + h * ds
    if sh is not None:
        u = u + sh
    if dsh is not None:
        du = du + dsh
    if act:
        sigmoid = torch.sigmoid(u)
        du = du * sigmoid * (1 + u * (1 - sigmoid))
    return du.to(x.dtype)


class _FusedForwardAD(torch.autograd.Function):
    """The fused forward op with its backward, plus jvp and vmap rules (see the module doc).
    Returns (y, mean, rstd) like the op; mean and rstd are non-differentiable."""

    @staticmethod
    def forward(x, num_groups, weight, bias, scale, shift, eps, act):
        return torch.ops.lgt.group_norm_film_silu_fwd(x, num_groups, weight, bias, scale, shift, eps, act)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        x, _, weight, bias, scale, shift, _, _ = inputs
        ctx.save_for_forward(x, weight, bias, scale, shift)

    @staticmethod
    def backward(ctx, dy, dmean, drstd):
        return _backward(ctx, dy, dmean, drstd)

    @staticmethod
    def jvp(ctx, dx, _dgroups, dweight, dbias, dscale, dshift, _deps, _dact):
        x, weight, bias, scale, shift = ctx.saved_tensors
        dy = film_tangent(x, ctx.num_groups, weight, bias, scale, shift, ctx.eps, ctx.act,
                          dx, dweight, dbias, dscale, dshift)
        return dy, None, None

    @staticmethod
    def vmap(info, in_dims, x, num_groups, weight, bias, scale, shift, eps, act):
        """Fold the vmapped dimension V into the batch: x [V, B, C, H, W] -> [V * B, C, H, W], the
        FiLM tensors to [V * B, C]. A vmapped weight or bias cannot stay [C]: it is folded into the
        FiLM tensors, (xhat * w + b) * (1 + s) + t = xhat * (w (1 + s)) + (b (1 + s) + t)."""
        V = info.batch_size
        x_dim, _, weight_dim, bias_dim, scale_dim, shift_dim, _, _ = in_dims

        def leading(t, dim):  # the vmapped dimension first (expanded when t is not vmapped)
            if t is None:
                return None
            return t.movedim(dim, 0) if dim is not None else t.expand(V, *t.shape)

        xs = leading(x, x_dim)  # [V, B, C, H, W]
        B, C = xs.shape[1:3]
        scale, shift = leading(scale, scale_dim), leading(shift, shift_dim)  # [V, B, C] or None
        if weight_dim is not None or bias_dim is not None:
            one_plus_scale = 1 if scale is None else 1 + scale
            if bias is not None:
                bias_term = leading(bias, bias_dim)[:, None, :] * one_plus_scale  # [V, 1 or B, C]
                shift = bias_term if shift is None else bias_term + shift
            if weight is not None:
                scale = leading(weight, weight_dim)[:, None, :] * one_plus_scale - 1
            weight = bias = None

        def flat(t):
            return None if t is None else t.expand(V, B, C).reshape(V * B, C)

        y, mean, rstd = _FusedForwardAD.apply(xs.reshape(V * B, *xs.shape[2:]), num_groups, weight, bias,
                                              flat(scale), flat(shift), eps, act)
        return (y.view(V, B, *y.shape[1:]), mean.view(V, B, -1), rstd.view(V, B, -1)), (0, 0, 0)
