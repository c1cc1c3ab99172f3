"""Self-similarity (Gram) loss: the LGT content energy.

f = x[:, :, index] / max(||.||_2 over D, eps) for features x [B, D, N] (or [B, C, H, W], read as
D = C, N = H*W); G = f^T f [B, S, S]; loss = mean((G_x - G_y)^2).

backend="torch"  `ssm_loss_reference`: gather + normalise + bmm; holds one [B, S, S] difference.
backend="triton" gather + normalise in torch (O(B*S*D)), then tiled kernels that form G_x - G_y
                 tile by tile with tl.dot and never store an S x S matrix: the forward accumulates
                 the squared tiles (upper triangle only, G is symmetric), the backward recomputes
                 them flash-attention style to get dL/df = (4 / (B*S*S)) (G_x - G_y) f per row
                 block. Autograd takes the gradient back through the normalisation and the gather
                 (repeated positions accumulate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels._dispatch import resolve_backend

__all__ = ["ssm_loss", "ssm_loss_reference"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32)


def _check_inputs(x, y, index, eps):
    # ValueError like every other bad argument (the kernels contract), not TypeError.
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"ssm_loss: {name} must be a tensor, got {type(t).__name__}")  # noqa: TRY004
    if x.dim() not in (3, 4) or x.numel() == 0:
        raise ValueError(f"ssm_loss: x must be a non-empty [B, D, N] or [B, C, H, W] tensor, got shape "
                         f"{tuple(x.shape)}")
    if y.shape != x.shape:
        raise ValueError(f"ssm_loss: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    for name, t in (("x", x), ("y", y)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"ssm_loss: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if x.device != y.device:
        raise ValueError(f"ssm_loss: x and y must be on one device, got {x.device} and {y.device}")
    if index is not None:
        num_positions = x[0, 0].numel()  # N (H*W for [B, C, H, W] inputs)
        valid = f"positions in [0, N) = [0, {num_positions})"
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.numel() == 0:
            shape = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
            raise ValueError(f"ssm_loss: index must be a non-empty 1-D tensor of {valid} (or None for all "
                             f"positions), got {shape}")
        if index.dtype not in _INDEX_DTYPES:
            raise ValueError(f"ssm_loss: index must be int64 or int32 {valid} (e.g. torch.randperm(N)[:S]), "
                             f"got {index.dtype}")
        if index.device != x.device:
            raise ValueError(f"ssm_loss: index must be on x's device {x.device}, got {index.device}")
        _check_index_range(index, num_positions, valid)
    if not eps > 0:
        raise ValueError(f"ssm_loss: eps must be > 0, got {eps!r}")


def _check_index_range(index, num_positions, valid):
    """ValueError for positions outside [0, N): index_select would raise an IndexError on CPU and a
    device-side assert on CUDA (which poisons the CUDA context).

    Reading min/max back costs one host sync per call on CUDA; accepted for a clear error (ssm_loss
    checks once per call, never twice). Skipped where a sync is impossible or would break the graph:
    while a CUDA graph is being captured and while torch.compile traces.
    """
    if torch.compiler.is_compiling() or (index.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    low, high = torch.stack(torch.aminmax(index)).tolist()  # one device-to-host copy for both
    if low < 0 or high >= num_positions:
        raise ValueError(f"ssm_loss: index must hold {valid}, got values from {low} to {high}")


def _unit_features(x, index, eps, dtype):
    """[B, D, S] features at the chosen positions, each position's vector scaled to unit L2 norm."""
    features = x.reshape(x.shape[0], x.shape[1], -1).to(dtype)  # [B, D, N]
    if index is not None:
        features = features.index_select(2, index)
    return F.normalize(features, dim=1, eps=eps)


def ssm_loss_reference(x, y, index=None, eps=1e-8):
    """Pure-PyTorch SSM loss (see the module docstring); also the CPU training path.

    Computes in float32 (float64 inputs stay float64, for test references) with autocast off, and
    returns a scalar in x's dtype.
    """
    _check_inputs(x, y, index, eps)
    return _ssm_loss_torch(x, y, index, eps)


def _ssm_loss_torch(x, y, index, eps):
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        f_x = _unit_features(x, index, eps, compute_dtype)
        f_y = _unit_features(y, index, eps, compute_dtype)
        gram_diff = torch.bmm(f_x.transpose(1, 2), f_x)  # [B, S, S]
        # In place: bmm's backward needs its inputs, not its output, so one S x S buffer serves.
        gram_diff -= torch.bmm(f_y.transpose(1, 2), f_y)
        # ||diff||^2 / numel rather than diff.square().mean(): no S x S temporary for the squares.
        loss = torch.linalg.vector_norm(gram_diff).square() / gram_diff.numel()
    return loss.to(x.dtype)


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


# Shared memory is num_stages x the four [BLOCK_S, BLOCK_D] fp32 operand tiles: at 64 x 64 Triton's
# default of 3 stages needs 128 KiB, more than an sm_89 laptop GPU gives a block (99 KiB); 2 need 64.
_NUM_STAGES = 2


def _block_sizes(S, D):
    # tl.dot needs every dimension >= 16: smaller S or D are padded with masked zero loads.
    return min(64, max(16, triton.next_power_of_2(S))), min(64, max(16, triton.next_power_of_2(D)))


class _GramDistanceTriton(torch.autograd.Function):
    """mean over (b, i, j) of ((f_x f_x^T) - (f_y f_y^T))^2 for unit rows f [B, S, D] (fp32, contiguous)."""

    @staticmethod
    def forward(ctx, f_x, f_y):
        B, S, D = f_x.shape
        block_s, block_d = _block_sizes(S, D)
        num_blocks = triton.cdiv(S, block_s)
        partial = torch.empty((B, num_blocks), device=f_x.device, dtype=torch.float32)
        _ssm_fwd_kernel[(B, num_blocks)](f_x, f_y, partial, S, D, BLOCK_S=block_s, BLOCK_D=block_d,
                                         num_stages=_NUM_STAGES)
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
                              num_stages=_NUM_STAGES)
        return grad_fx, grad_fy


def ssm_loss(x, y, index=None, eps=1e-8, backend="auto"):
    """Self-similarity loss between x and y: mean((G_x - G_y)^2), a scalar in x's dtype.

    x, y: [B, D, N] features or [B, C, H, W] (read as D = C, N = H*W). index: int64/int32 [S] of
    positions in [0, N) (repeats allowed; others raise ValueError), or None for all N. f = x[:, :, index] / max(||.||_2 over D, eps),
    G = f^T f [B, S, S]. Computed in float32, differentiable in x and y; the Triton backend never
    materialises G.
    """
    _check_inputs(x, y, index, eps)
    if resolve_backend(backend, x, y, index) == "torch":
        return _ssm_loss_torch(x, y, index, eps)
    with torch.autocast(device_type=x.device.type, enabled=False):
        f_x = _unit_features(x, index, eps, torch.float32).transpose(1, 2).contiguous()  # [B, S, D]
        f_y = _unit_features(y, index, eps, torch.float32).transpose(1, 2).contiguous()
        loss = _GramDistanceTriton.apply(f_x, f_y)
    return loss.to(x.dtype)
