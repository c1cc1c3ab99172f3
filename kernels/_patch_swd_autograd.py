"""The autograd Function of patch SWD's fused backends (Triton and csrc): their forward leaves
dL/dproj for the images whose projections need a gradient, so the backward never sorts. A module of
its own so that `kernels.patch_swd` and `kernels._triton_patch_swd` both import it without a cycle."""

from __future__ import annotations

from typing import NamedTuple

import torch


class PatchSWDKernels(NamedTuple):
    """A backend's three kernels.
    forward(x, y, theta, k, grad_x, grad_y) -> (loss fp32/fp64 scalar, dL/dproj of x or None, of y or None)
    image_grad(grad_proj, theta, grad_loss, image_shape, image_dtype, k) -> grad_loss * dL/dimage
    theta_grad((x, y), (dL/dproj x, dL/dproj y), grad_loss, k) -> grad_loss * dL/dtheta [P, C*k*k]"""

    forward: object
    image_grad: object
    theta_grad: object


class _PatchSWDFromProjections(torch.autograd.Function):
    """Loss from a fused forward that also leaves dL/dproj for the images whose projections need a
    gradient: x (y) when x (y) needs one, both when theta does."""

    @staticmethod
    def forward(ctx, kernels, x, y, theta, kernel_size, need_grad_x, need_grad_y, need_grad_theta):
        loss, grad_proj_x, grad_proj_y = kernels.forward(
            x, y, theta, kernel_size, need_grad_x or need_grad_theta, need_grad_y or need_grad_theta)
        # The images are kept only for dL/dtheta; without it nothing but dL/dproj is saved.
        images = (x, y) if need_grad_theta else (None, None)
        ctx.save_for_backward(theta, grad_proj_x, grad_proj_y, *images)
        ctx.kernels = kernels
        ctx.kernel_size = kernel_size
        ctx.image_shape = x.shape
        ctx.dtypes = (x.dtype, y.dtype)
        ctx.needs_grad = (need_grad_x, need_grad_y, need_grad_theta)
        return loss.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            # backward(create_graph=True): the gradient would be returned detached from the graph
            # and its own derivative silently zero (once_differentiable raises only when grad_loss
            # requires grad, which it does not here).
            raise RuntimeError("patch_swd: the fused backward is not differentiable (create_graph=True); use "
                               "backend='torch' for higher-order gradients of the patch SWD")
        theta, grad_proj_x, grad_proj_y, x, y = ctx.saved_tensors
        need_grad_x, need_grad_y, need_grad_theta = ctx.needs_grad
        grad_projs = (grad_proj_x if need_grad_x else None, grad_proj_y if need_grad_y else None)
        grads = [
            None if grad_proj is None else ctx.kernels.image_grad(
                grad_proj, theta, grad_loss, ctx.image_shape, dtype, ctx.kernel_size)
            for grad_proj, dtype in zip(grad_projs, ctx.dtypes)
        ]
        grad_theta = None
        if need_grad_theta:
            grad_theta = ctx.kernels.theta_grad((x, y), (grad_proj_x, grad_proj_y), grad_loss, ctx.kernel_size)
        return None, *grads, grad_theta, None, None, None, None


def patch_swd_from_projections(kernels: PatchSWDKernels, x, y, theta, kernel_size):
    """The loss through a fused backend's kernels, for checked inputs in the layout they read."""
    # Decided here, not from ctx.needs_input_grad, which ignores torch.no_grad().
    grad_enabled = torch.is_grad_enabled()
    return _PatchSWDFromProjections.apply(kernels, x, y, theta, kernel_size, grad_enabled and x.requires_grad,
                                          grad_enabled and y.requires_grad, grad_enabled and theta.requires_grad)
