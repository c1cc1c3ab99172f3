"""Triton backend of `kernels.patch_swd` (the module docstring there describes it): the fused
projection + sort + loss forward and the backward that maps dL/dproj back to pixels (the autograd
Function around them is kernels.patch_swd's, shared with the csrc backend). Imported only when the Triton backend runs, so that `import kernels` works where
triton is not installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._patch_swd_autograd import PatchSWDKernels, patch_swd_from_projections


@triton.jit
def _project_patches(image_ptr, theta_ptr, b, offs_p, offs_n, C, H, W, P,
                     KERNEL_SIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_P, BLOCK_N] projections onto theta[offs_p] of the zero-padded k x k patches centred at
    pixels offs_n of image[b]; each pixel tap is loaded once for all BLOCK_P directions."""
    N = H * W
    half: tl.constexpr = KERNEL_SIZE // 2
    pixel_row = offs_n // W
    pixel_col = offs_n % W
    in_image = offs_n < N
    theta_rows = theta_ptr + offs_p * (C * KERNEL_SIZE * KERNEL_SIZE)
    p_ok = offs_p < P
    projection = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for c in range(C):
        channel = image_ptr + (b * C + c) * N
        for i in tl.static_range(KERNEL_SIZE):
            row = pixel_row + (i - half)
            row_ok = in_image & (row >= 0) & (row < H)
            for j in tl.static_range(KERNEL_SIZE):
                col = pixel_col + (j - half)
                weights = tl.load(theta_rows + (c * KERNEL_SIZE + i) * KERNEL_SIZE + j, mask=p_ok, other=0.0)
                # Upcast right after loading: bf16/fp16 maths stays out of the kernel.
                pixels = tl.load(channel + row * W + col, mask=row_ok & (col >= 0) & (col < W), other=0.0)
                projection += weights[:, None] * pixels.to(tl.float32)[None, :]
    return projection


@triton.jit
def _sort_with_positions(values, positions):
    """Sort a fp32 row; return the sorted values and the position each came from.

    tl.sort has no argsort: pack an order-preserving int32 image of each value into the high half
    of an int64 key and its position into the low half, sort the keys, unpack both. Equal values
    come out in position order.
    """
    bits = values.to(tl.int32, bitcast=True)
    # As int32, negative floats order backwards; flipping their magnitude bits fixes that (and is
    # its own inverse, used again below to unpack).
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    keys = tl.sort((ordered.to(tl.int64) << 32) | positions.to(tl.int64))
    sorted_positions = keys.to(tl.int32)  # truncation keeps the low half
    ordered = (keys >> 32).to(tl.int32)
    sorted_values = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    return sorted_values, sorted_positions


@triton.jit
def _patch_swd_fwd_kernel(x_ptr, y_ptr, theta_ptr, row_sums_ptr, grad_proj_x_ptr, grad_proj_y_ptr,
                          C, H, W, P, grad_scale,
                          KERNEL_SIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                          GRAD_X: tl.constexpr, GRAD_Y: tl.constexpr):
    """One program per sample b and block of BLOCK_P directions; each (b, p) row is sorted whole."""
    b = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    N = H * W
    in_row = offs_n[None, :] < N
    row_ok = offs_p < P
    proj_x = _project_patches(x_ptr, theta_ptr, b, offs_p, offs_n, C, H, W, P, KERNEL_SIZE, BLOCK_P, BLOCK_N)
    proj_y = _project_patches(y_ptr, theta_ptr, b, offs_p, offs_n, C, H, W, P, KERNEL_SIZE, BLOCK_P, BLOCK_N)
    # Pad the rows to the power-of-two sort length with +inf: padding sorts last, so sorted
    # entries 0..N-1 are the real projections and the padded tail is masked out below.
    proj_x = tl.where(in_row, proj_x, float("inf"))
    proj_y = tl.where(in_row, proj_y, float("inf"))
    if GRAD_X:
        sorted_x, source_x = _sort_with_positions(proj_x, offs_n[None, :])
    else:
        sorted_x = tl.sort(proj_x)
    if GRAD_Y:
        sorted_y, source_y = _sort_with_positions(proj_y, offs_n[None, :])
    else:
        sorted_y = tl.sort(proj_y)
    # Mask before subtracting: the padded tail holds inf - inf.
    diff = tl.where(in_row, sorted_x, 0.0) - tl.where(in_row, sorted_y, 0.0)
    rows = b * P + offs_p
    tl.store(row_sums_ptr + rows, tl.sum(diff * diff, axis=1), mask=row_ok)
    # dL/dproj at a source position is the scaled difference at that position's rank.
    store_ok = row_ok[:, None] & in_row
    if GRAD_X:
        tl.store(grad_proj_x_ptr + rows[:, None] * N + source_x, grad_scale * diff, mask=store_ok)
    if GRAD_Y:
        tl.store(grad_proj_y_ptr + rows[:, None] * N + source_y, -grad_scale * diff, mask=store_ok)


@triton.jit
def _patch_swd_bwd_kernel(grad_proj_ptr, theta_ptr, grad_loss_ptr, grad_image_ptr, C, H, W, P,
                          KERNEL_SIZE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """The adjoint of _project_patches for a block of pixels of image[b], all channels at once:
    grad_image[b, c, pixel] = sum over p, i, j of theta[p, c, i, j] * grad_proj[b, p, pixel - (i, j) + k//2].
    """
    b = tl.program_id(0)
    N = H * W
    half: tl.constexpr = KERNEL_SIZE // 2
    taps_per_channel: tl.constexpr = KERNEL_SIZE * KERNEL_SIZE
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_image = offs_n < N
    pixel_row = offs_n // W
    pixel_col = offs_n % W
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    grad = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
    for i in tl.static_range(KERNEL_SIZE):
        # This pixel is tap (i, j) of the patch centred at (row, col):
        row = pixel_row - (i - half)
        row_ok = in_image & (row >= 0) & (row < H)
        for j in tl.static_range(KERNEL_SIZE):
            col = pixel_col - (j - half)
            centre = row * W + col
            centre_ok = row_ok & (col >= 0) & (col < W)
            for p0 in range(0, P, BLOCK_P):
                offs_p = p0 + tl.arange(0, BLOCK_P)
                p_ok = offs_p < P
                # [BLOCK_P, BLOCK_N] and [BLOCK_P, BLOCK_C]
                grad_proj = tl.load(grad_proj_ptr + (b * P + offs_p[:, None]) * N + centre[None, :],
                                    mask=p_ok[:, None] & centre_ok[None, :], other=0.0)
                tap = (offs_p[:, None] * C + offs_c[None, :]) * taps_per_channel + (i * KERNEL_SIZE + j)
                taps = tl.load(theta_ptr + tap, mask=p_ok[:, None] & c_ok[None, :], other=0.0)
                grad += tl.sum(taps[:, :, None] * grad_proj[:, None, :], axis=0)
    grad *= tl.load(grad_loss_ptr).to(tl.float32)
    tl.store(grad_image_ptr + (b * C + offs_c[:, None]) * N + offs_n[None, :], grad,
             mask=c_ok[:, None] & in_image[None, :])


# Values per forward program (BLOCK_P rows of BLOCK_N) and warps for them: at 2048 values and 16
# warps ptxas reports ~96 registers a thread and no spills for sm_89/sm_90 (8 warps: ~150).
_SORT_TILE = 2048


def _sort_num_warps(tile):
    return min(16, max(4, tile // 128))


def _patch_swd_forward_triton(x, y, theta, kernel_size, need_grad_x, need_grad_y):
    """Loss (fp32 scalar) and, for x and y as asked, dL/dproj [B, P, N] (fp32; None where not)."""
    B, C, H, W = x.shape
    P = theta.shape[0]
    N = H * W
    rows = B * P
    block_n = triton.next_power_of_2(N)
    block_p = max(1, min(triton.next_power_of_2(P), _SORT_TILE // block_n))
    row_sums = torch.empty(rows, device=x.device, dtype=torch.float32)
    grad_proj_x = torch.empty((B, P, N), device=x.device, dtype=torch.float32) if need_grad_x else None
    grad_proj_y = torch.empty((B, P, N), device=x.device, dtype=torch.float32) if need_grad_y else None
    _patch_swd_fwd_kernel[(B, triton.cdiv(P, block_p))](
        x, y, theta, row_sums, grad_proj_x, grad_proj_y, C, H, W, P, 2.0 / (rows * N),
        KERNEL_SIZE=kernel_size, BLOCK_P=block_p, BLOCK_N=block_n, GRAD_X=need_grad_x, GRAD_Y=need_grad_y,
        num_warps=_sort_num_warps(block_p * block_n),
    )
    return row_sums.sum() / (rows * N), grad_proj_x, grad_proj_y


def _patch_swd_backward_triton(grad_proj, theta, grad_loss, image_shape, image_dtype, kernel_size):
    """grad_loss * dL/dimage [B, C, H, W] in image_dtype, from dL/dproj [B, P, N]."""
    B, C, H, W = image_shape
    P = theta.shape[0]
    N = H * W
    block_c = triton.next_power_of_2(C)
    block_p = min(16, triton.next_power_of_2(P))
    # Keep the [BLOCK_P, BLOCK_C, BLOCK_N] product tile at <= 4096 values (registers).
    block_n = max(16, min(triton.next_power_of_2(N), 4096 // (block_p * block_c)))
    grad_image = torch.empty(image_shape, device=grad_proj.device, dtype=image_dtype)
    _patch_swd_bwd_kernel[(B, triton.cdiv(N, block_n))](
        grad_proj, theta, grad_loss.float().contiguous(), grad_image, C, H, W, P,
        KERNEL_SIZE=kernel_size, BLOCK_C=block_c, BLOCK_P=block_p, BLOCK_N=block_n,
    )
    return grad_image


def _patch_swd_theta_grad(images, grad_projs, grad_loss, kernel_size):
    """grad_loss * dL/dtheta [P, C*k*k] (fp32): sum over the images and b, n of dL/dproj[b, p, n] times
    the patch of image[b] at n (the correlation torch.nn.grad.conv2d_weight computes).

    Written as unfold + batched matmul rather than conv2d_weight: cuDNN runs fp32 convolutions in
    TF32 by default (torch.backends.cudnn.allow_tf32), fp32 matmuls stay fp32 unless the user opts
    in. The [B, C*k*k, N] patch copy lives only for this call; the product is small
    (B*P*N*C*k*k multiply-adds).
    """
    grad_theta = None
    with torch.autocast(device_type=images[0].device.type, enabled=False):
        for image, grad_proj in zip(images, grad_projs):
            patches = F.unfold(image.float(), kernel_size, padding=kernel_size // 2)  # [B, C*k*k, N]
            term = torch.bmm(grad_proj, patches.transpose(1, 2)).sum(0)  # [P, C*k*k]
            grad_theta = term if grad_theta is None else grad_theta + term
        return grad_theta * grad_loss.float()


def patch_swd_triton(x, y, theta, kernel_size):
    """The loss through the Triton kernels, for inputs `kernels.patch_swd` has checked; the caller
    keeps rows of at most MAX_TRITON_ROW_LENGTH (the in-register sort) on this path."""
    kernels = PatchSWDKernels(_patch_swd_forward_triton, _patch_swd_backward_triton, _patch_swd_theta_grad)
    # .float() is differentiable: autograd casts dL/dtheta back to theta's dtype.
    return patch_swd_from_projections(kernels, x.contiguous(), y.contiguous(), theta.float().contiguous(),
                                      kernel_size)
