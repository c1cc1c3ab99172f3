"""Triton backend of `kernels.ssm_loss` (the module docstring there describes it): tiled kernels
that form G_x - G_y tile by tile and never store an S x S matrix, and their autograd Function.
Imported only when the Triton backend runs, so that `import kernels` works where triton is not
installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable


@triton.jit
def _load_rows(f_ptr, rows, cols, S, D):
    """[len(rows), len(cols)] block of a [S, D] row-major matrix; rows past S and cols past D are 0."""
    mask = (rows[:, None] < S) & (cols[None, :] < D)
    return tl.load(f_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _accumulate_gram(gram, f_ptr, rows_i, rows_j, cols, S, D):
    """gram + f[rows_i, cols] f[rows_j, cols]^T."""
    f_i = _load_rows(f_ptr, rows_i, cols, S, D)
    f_j = _load_rows(f_ptr, rows_j, cols, S, D)
    # "ieee": an fp32 tl.dot would otherwise run in tf32 on tensor cores (10-bit mantissa).
    return tl.dot(f_i, tl.trans(f_j), gram, input_precision="ieee")


@triton.jit
def _gram_difference_tile(fx_ptr, fy_ptr, rows_i, rows_j, S, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """(G_x - G_y)[rows_i, rows_j] in fp32; zero-padded rows and columns contribute nothing."""
    gram_x = tl.zeros([BLOCK_S, BLOCK_S], dtype=tl.float32)
    gram_y = tl.zeros([BLOCK_S, BLOCK_S], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        gram_x = _accumulate_gram(gram_x, fx_ptr, rows_i, rows_j, cols, S, D)
        gram_y = _accumulate_gram(gram_y, fy_ptr, rows_i, rows_j, cols, S, D)
    # Subtracting whole Grams (not accumulating f_x f_x - f_y f_y) makes x == y give exactly 0.
    return gram_x - gram_y


@triton.jit
def _ssm_fwd_kernel(fx_ptr, fy_ptr, partial_ptr, S, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sum of squared G_x - G_y over row block i and every column block j >= i of sample b."""
    b = tl.program_id(0)
    block_i = tl.program_id(1)
    num_blocks = tl.cdiv(S, BLOCK_S)
    fx_ptr += b * S * D
    fy_ptr += b * S * D
    rows_i = block_i * BLOCK_S + tl.arange(0, BLOCK_S)
    squares = tl.zeros([BLOCK_S, BLOCK_S], dtype=tl.float32)
    for block_j in range(block_i, num_blocks):
        rows_j = block_j * BLOCK_S + tl.arange(0, BLOCK_S)
        diff = _gram_difference_tile(fx_ptr, fy_ptr, rows_i, rows_j, S, D, BLOCK_S, BLOCK_D)
        # G is symmetric: an off-diagonal tile also stands for its mirror image.
        squares += tl.where(block_j == block_i, 1.0, 2.0) * diff * diff
    tl.store(partial_ptr + b * num_blocks + block_i, tl.sum(tl.sum(squares, axis=1), axis=0))


@triton.jit
def _ssm_bwd_kernel(fx_ptr, fy_ptr, grad_loss_ptr, grad_fx_ptr, grad_fy_ptr, S, D, scale,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, GRAD_X: tl.constexpr, GRAD_Y: tl.constexpr):
    """dL/df_x = scale (G_x - G_y) f_x and dL/df_y = -scale (G_x - G_y) f_y for row block i and
    feature block d of sample b, recomputing the Gram tiles instead of reading a stored S x S."""
    b = tl.program_id(0)
    rows_i = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    fx_ptr += b * S * D
    fy_ptr += b * S * D
    grad_x = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    grad_y = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for j0 in range(0, S, BLOCK_S):
        rows_j = j0 + tl.arange(0, BLOCK_S)
        diff = _gram_difference_tile(fx_ptr, fy_ptr, rows_i, rows_j, S, D, BLOCK_S, BLOCK_D)
        if GRAD_X:
            grad_x = tl.dot(diff, _load_rows(fx_ptr, rows_j, cols, S, D), grad_x, input_precision="ieee")
        if GRAD_Y:
            grad_y = tl.dot(diff, _load_rows(fy_ptr, rows_j, cols, S, D), grad_y, input_precision="ieee")
    scale = scale * tl.load(grad_loss_ptr).to(tl.float32)
    out = b * S * D + rows_i[:, None] * D + cols[None, :]
    out_ok = (rows_i[:, None] < S) & (cols[None, :] < D)
    if GRAD_X:
        tl.store(grad_fx_ptr + out, scale * grad_x, mask=out_ok)
    if GRAD_Y:
        tl.store(grad_fy_ptr + out, -scale * grad_y, mask=out_ok)


# Shared memory is num_stages x the four [BLOCK_S, BLOCK_D] fp32 operand tiles: 2 stages of 32 x 32
# tiles need 32 KiB (an sm_89 laptop GPU gives a block 99 KiB).
_NUM_STAGES = 2
# Registers: two live [BLOCK_S, BLOCK_S] fp32 Gram tiles and the dot operands. With 64-row blocks at 4
# warps ptxas needed 255 registers a thread and spilled (268 B of stores in the forward, 532 B in the
# backward on sm_89); 32 x 32 blocks at 8 warps take 112-190 registers and spill nothing for sm_89
# and sm_90, for D from 4 to 64 (engine-plan --kernels reports it; tests/test_plan_kernels.py checks).
_MAX_BLOCK = 32
_NUM_WARPS = 8


def _block_sizes(S, D):
    # tl.dot needs every dimension >= 16: smaller S or D are padded with masked zero loads.
    return (min(_MAX_BLOCK, max(16, triton.next_power_of_2(S))),
            min(_MAX_BLOCK, max(16, triton.next_power_of_2(D))))


class GramDistanceTriton(torch.autograd.Function):
    """mean over (b, i, j) of ((f_x f_x^T) - (f_y f_y^T))^2 for unit rows f [B, S, D] (fp32, contiguous)."""

    @staticmethod
    def forward(ctx, f_x, f_y):
        B, S, D = f_x.shape
        block_s, block_d = _block_sizes(S, D)
        num_blocks = triton.cdiv(S, block_s)
        partial = torch.empty((B, num_blocks), device=f_x.device, dtype=torch.float32)
        _ssm_fwd_kernel[(B, num_blocks)](f_x, f_y, partial, S, D, BLOCK_S=block_s, BLOCK_D=block_d,
                                         num_warps=_NUM_WARPS, num_stages=_NUM_STAGES)
        ctx.save_for_backward(f_x, f_y)
        return partial.sum() / (B * S * S)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        f_x, f_y = ctx.saved_tensors
        need_grad_x, need_grad_y = ctx.needs_input_grad
        B, S, D = f_x.shape
        block_s, block_d = _block_sizes(S, D)
        grad_fx = torch.empty_like(f_x) if need_grad_x else None
        grad_fy = torch.empty_like(f_y) if need_grad_y else None
        grid = (B, triton.cdiv(S, block_s), triton.cdiv(D, block_d))
        # L = sum((G_x - G_y)^2) / (B S^2) and G symmetric: dL/df_x = 4 / (B S^2) (G_x - G_y) f_x.
        scale = 4.0 / (B * S * S)
        _ssm_bwd_kernel[grid](f_x, f_y, grad_loss.float().contiguous(), grad_fx, grad_fy, S, D, scale,
                              BLOCK_S=block_s, BLOCK_D=block_d, GRAD_X=need_grad_x, GRAD_Y=need_grad_y,
                              num_warps=_NUM_WARPS, num_stages=_NUM_STAGES)
        return grad_fx, grad_fy
