"""Patch sliced-Wasserstein distance per sample ("stratified" SWD): the LGT style energy.

For each sample b and unit direction theta[p], the k x k zero-padded patches of x[b] and y[b]
(F.unfold's order c*k*k + i*k + j, padding k//2) are projected onto theta[p]; each row of N = H*W
projections is sorted, and the loss is the mean over (b, p, n) of the squared difference of the
sorted rows of x and y.

backend="torch"  `patch_swd_reference`: conv2d with theta as a [P, C, k, k] filter bank (the
                 unfold + matmul projection without the [B*H*W, C*k*k] patch copy), then torch.sort.
backend="triton" one program per sample and block of directions projects the patches straight
                 from the image (implicit im2col), sorts each (b, p) row in registers and writes
                 one partial sum per row. When a gradient is needed the same program also gets the
                 row's permutation and writes dL/dproj [B, P, N], so the backward does no sorting:
                 it maps dL/dproj back to pixels (the transposed implicit im2col). Keeping dL/dproj
                 costs what keeping the sorted y rows for the backward would. When theta needs a
                 gradient the forward writes dL/dproj for both x and y (y's projections depend on
                 theta even when y is data), and dL/dtheta is the correlation of each image with its
                 dL/dproj: sum over b and n of dL/dproj[b, p, n] times the patch of the image at n.
                 In `kernels._triton_patch_swd`, imported the first time this backend runs.
backend="csrc"   the same algorithm in C++ on CPU tensors (csrc/patch_swd.cpp; "auto" on CPU tensors
                 when the library is loaded): one (b, p) row per task, projection by shifted-row
                 multiply-adds, a sort of packed (value, position) keys, dL/dproj written by the
                 forward. In float32 (float64 for float64 inputs). One autograd Function serves
                 both fused backends (`kernels._patch_swd_autograd`).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from kernels._dispatch import csrc_loaded, resolve_backend
from kernels._patch_swd_autograd import PatchSWDKernels, patch_swd_from_projections

__all__ = ["MAX_TRITON_ROW_LENGTH", "patch_swd", "patch_swd_reference"]

# tl.sort sorts a whole row in one program's registers; longer rows go to the torch path.
MAX_TRITON_ROW_LENGTH = 4096
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_inputs(x, y, theta, kernel_size):
    # ValueError like every other bad argument (the kernels contract), not TypeError.
    for name, t in (("x", x), ("y", y), ("theta", theta)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"patch_swd: {name} must be a tensor, got {type(t).__name__}")  # noqa: TRY004
    if x.dim() != 4 or x.numel() == 0:
        raise ValueError(f"patch_swd: x must be a non-empty [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    if y.shape != x.shape:
        raise ValueError(f"patch_swd: y must have x's shape {tuple(x.shape)} (samples are paired), "
                         f"got {tuple(y.shape)}")
    for name, t in (("x", x), ("y", y), ("theta", theta)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"patch_swd: {name} must be float16, bfloat16, float32 or float64, "
                             f"got {t.dtype}")
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"patch_swd: kernel_size must be a positive odd int (zero padding k//2 keeps "
                         f"H x W), got {kernel_size!r}")
    patch_size = x.shape[1] * kernel_size * kernel_size
    if theta.dim() != 2 or theta.shape[0] == 0 or theta.shape[1] != patch_size:
        raise ValueError(f"patch_swd: theta must be [P, C*k*k] = [P, {patch_size}] for C={x.shape[1]}, "
                         f"k={kernel_size}, got shape {tuple(theta.shape)}")
    if not x.device == y.device == theta.device:
        raise ValueError(f"patch_swd: x, y and theta must be on one device, got {x.device}, {y.device}, "
                         f"{theta.device}")


def _sorted_patch_projections(image, filters):
    """[B, C, H, W] image, [P, C, k, k] filters -> [B, P, H*W] projections sorted along the last dim."""
    projections = F.conv2d(image.to(filters.dtype), filters, padding=filters.shape[-1] // 2)
    return projections.flatten(2).sort(dim=-1).values


def patch_swd_reference(x, y, theta, kernel_size=3):
    """Pure-PyTorch patch SWD (see the module docstring); also the CPU training path.

    Computes in float32 (float64 inputs stay float64, for test references) with autocast off, and
    returns a scalar in x's dtype. Differentiable in x, y and theta (plain autograd).
    """
    _check_inputs(x, y, theta, kernel_size)
    return _patch_swd_torch(x, y, theta, kernel_size)


def _patch_swd_torch(x, y, theta, kernel_size):
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        filters = theta.to(compute_dtype).reshape(theta.shape[0], x.shape[1], kernel_size, kernel_size)
        loss = F.mse_loss(_sorted_patch_projections(x, filters), _sorted_patch_projections(y, filters))
    return loss.to(x.dtype)


@functools.cache
def _warn_row_too_long_once():
    warnings.warn(f"patch_swd: H*W > {MAX_TRITON_ROW_LENGTH} is too long for the in-kernel sort; "
                  "using the torch backend", stacklevel=3)


def patch_swd(x, y, theta, kernel_size=3, backend="auto"):
    """Per-sample patch sliced-Wasserstein distance between x and y [B, C, H, W].

    theta [P, C*k*k]: unit directions in F.unfold's order (c*k*k + i*k + j). For each b and p the
    H*W projections of x[b] and y[b] are sorted; returns the mean over b, p, n of the squared
    difference, a scalar in x's dtype, computed in float32. Differentiable in x, y and theta (each
    when it requires grad; LGT redraws theta every step and passes it as data, which costs nothing
    extra). Rows longer than MAX_TRITON_ROW_LENGTH use the torch backend (warned once). The fused
    backends' backward is not itself differentiable: a second derivative (backward with
    create_graph=True through this loss) is refused with an error naming backend="torch".
    """
    _check_inputs(x, y, theta, kernel_size)
    resolved = resolve_backend(backend, x, y, theta)
    # The fused backends' autograd Function has neither jvp nor vmap rules (torch.func would fail):
    # under a transform the reference runs, whatever the backend.
    if resolved == "torch" or torch._C._are_functorch_transforms_active():
        return _patch_swd_torch(x, y, theta, kernel_size)
    if resolved == "csrc":
        dtype = torch.promote_types(x.dtype, torch.float32)  # the C++ op computes in x's float dtype
        loss = patch_swd_from_projections(_CSRC_KERNELS, x.to(dtype).contiguous(), y.to(dtype).contiguous(),
                                          theta.to(dtype).contiguous(), kernel_size)
        return loss.to(x.dtype)
    if x.shape[2] * x.shape[3] > MAX_TRITON_ROW_LENGTH:
        _warn_row_too_long_once()
        return _patch_swd_torch(x, y, theta, kernel_size)
    from kernels._triton_patch_swd import patch_swd_triton

    return patch_swd_triton(x, y, theta, kernel_size)


def _csrc_forward(x, y, theta, kernel_size, grad_x, grad_y):
    loss, grad_proj_x, grad_proj_y = torch.ops.lgt.csrc_patch_swd_fwd(x, y, theta, kernel_size, grad_x, grad_y)
    return loss, grad_proj_x if grad_x else None, grad_proj_y if grad_y else None


def _csrc_image_grad(grad_proj, theta, grad_loss, image_shape, image_dtype, kernel_size):
    _, C, H, W = image_shape
    grad = torch.ops.lgt.csrc_patch_swd_image_grad(grad_proj, theta, C, H, W, kernel_size)
    return (grad * grad_loss.to(grad.dtype)).to(image_dtype)


def _csrc_theta_grad(images, grad_projs, grad_loss, kernel_size):
    grad_theta = sum(torch.ops.lgt.csrc_patch_swd_theta_grad(image, grad_proj, kernel_size)
                     for image, grad_proj in zip(images, grad_projs))
    return grad_theta * grad_loss.to(grad_theta.dtype)


_CSRC_KERNELS = PatchSWDKernels(_csrc_forward, _csrc_image_grad, _csrc_theta_grad)


def _register_csrc_fakes():
    """Fake versions of the C++ ops (shapes only), for torch.compile."""

    @torch.library.register_fake("lgt::csrc_patch_swd_fwd")
    def _(x, y, theta, kernel_size, grad_x, grad_y):
        B, _, H, W = x.shape
        grad_shape = (B, theta.shape[0], H * W)
        return (x.new_empty(()), x.new_empty(grad_shape if grad_x else (0,)),
                x.new_empty(grad_shape if grad_y else (0,)))

    @torch.library.register_fake("lgt::csrc_patch_swd_image_grad")
    def _(grad_proj, theta, C, H, W, kernel_size):
        return grad_proj.new_empty((grad_proj.shape[0], C, H, W))

    @torch.library.register_fake("lgt::csrc_patch_swd_theta_grad")
    def _(image, grad_proj, kernel_size):
        return image.new_empty((grad_proj.shape[1], image.shape[1] * kernel_size ** 2))


if csrc_loaded():
    _register_csrc_fakes()
