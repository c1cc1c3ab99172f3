"""Self-similarity (Gram) loss: the LGT content energy.

f = x[:, :, index] / max(||.||_2 over D, eps) for features x [B, D, N] (or [B, C, H, W], read as
D = C, N = H*W); G = f^T f [B, S, S]; loss = mean((G_x - G_y)^2).

backend="torch"  `ssm_loss_reference`: gather + normalise + bmm; holds one [B, S, S] difference.
backend="triton" gather + normalise in torch (O(B*S*D)), then tiled kernels that form G_x - G_y
                 tile by tile with tl.dot and never store an S x S matrix: the forward accumulates
                 the squared tiles (upper triangle only, G is symmetric), the backward recomputes
                 them flash-attention style to get dL/df = (4 / (B*S*S)) (G_x - G_y) f per row
                 block. Autograd takes the gradient back through the normalisation and the gather
                 (repeated positions accumulate). In `kernels._triton_ssm_loss`, imported the
                 first time this backend runs.
backend="csrc"   none: a ValueError; "auto" on CPU tensors is the torch reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
        # A host check only for CPU tensors outside torch.compile (where .tolist() is cheap and
        # does not break the graph); a device-side assertion everywhere else.
        on_host = index.device.type == "cpu" and not torch.compiler.is_compiling()
        _check_index_range(index, num_positions, valid, on_host)
    if not eps > 0:
        raise ValueError(f"ssm_loss: eps must be > 0, got {eps!r}")


def _check_index_range(index, num_positions, valid, on_host):
    """Reject positions outside [0, N), which index_select would turn into an IndexError on CPU and
    into a device-side assert on CUDA.

    on_host=True: read min and max back and raise a ValueError naming them. On CPU tensors that read
    is a memory access, not a synchronisation.
    on_host=False: a device-side assertion (torch._assert_async), queued with the op's other
    kernels; nothing is read back, so there is no CPU-GPU sync and the check can be captured in a
    CUDA graph and traced by torch.compile. The trade-off: an out-of-range index then surfaces as a
    RuntimeError ("device-side assert triggered") at a later synchronisation rather than as a
    ValueError here, and on CUDA it leaves the context unusable (the process must restart). A host
    check would instead stall every LGT training step on a sync, although the step's positions
    come from `random_subset` (torch.randperm(N)[:S]) and are in range by construction. A caller
    that wants the ValueError for its own indices can run them through ssm_loss on CPU first.
    """
    if on_host:
        low, high = torch.stack(torch.aminmax(index)).tolist()
        if low < 0 or high >= num_positions:
            raise ValueError(f"ssm_loss: index must hold {valid}, got values from {low} to {high}")
        return
    in_range = ((index >= 0) & (index < num_positions)).all()
    torch._assert_async(in_range, f"ssm_loss: index must hold {valid}")


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


def ssm_loss(x, y, index=None, eps=1e-8, backend="auto"):
    """Self-similarity loss between x and y: mean((G_x - G_y)^2), a scalar in x's dtype.

    x, y: [B, D, N] features or [B, C, H, W] (read as D = C, N = H*W). index: int64/int32 [S] of
    positions in [0, N) (repeats allowed), or None for all N. Positions out of range raise a
    ValueError for CPU tensors, and fail a device-side assertion on the GPU (no host sync; see
    `_check_index_range`). f = x[:, :, index] / max(||.||_2 over D, eps), G = f^T f [B, S, S].
    Computed in float32, differentiable in x and y; the Triton backend never materialises G.
    """
    _check_inputs(x, y, index, eps)
    # No csrc version: on a CPU the reference's bmm is already fast at LGT's S <= 64 positions.
    if resolve_backend(backend, x, y, index, has_csrc=False) == "torch":
        return _ssm_loss_torch(x, y, index, eps)
    from kernels._triton_ssm_loss import GramDistanceTriton

    with torch.autocast(device_type=x.device.type, enabled=False):
        f_x = _unit_features(x, index, eps, torch.float32).transpose(1, 2).contiguous()  # [B, S, D]
        f_y = _unit_features(y, index, eps, torch.float32).transpose(1, 2).contiguous()
        loss = GramDistanceTriton.apply(f_x, f_y)
    return loss.to(x.dtype)
