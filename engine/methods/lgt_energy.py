"""The energy terms LGT minimises, each a small callable with its settings.

    PatchSWD        style: sliced Wasserstein distance between the k x k patch distributions of the
                    transported latents and of real latents of the target style
    SelfSimilarity  content: distance between the cosine self-similarity (Gram) matrices of the
                    transported latents and of their sources
    hutchinson_divergence   div v estimated as probe^T (dv/dx) probe through one vector-Jacobian product

Randomness (projection directions, sampled positions) comes from `generator`, or the global RNG
when it is None (training: the loop reseeds it every step, and directions are redrawn every call).
Every energy runs in fp32 with autocast off, whatever the caller's precision: sorting and Gram
matrices of bf16 values are too coarse to train on.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels

Tensor = torch.Tensor


@contextmanager
def fp32_region(device: torch.device):
    """Autocast off for the enclosed maths; callers cast their inputs with .float()."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def random_directions(num: int, dim: int, device: torch.device, generator: torch.Generator | None = None
                      ) -> Tensor:
    """[num, dim] fp32 rows drawn uniformly on the unit sphere (normalised Gaussians)."""
    theta = torch.randn(num, dim, device=device, generator=generator)
    return F.normalize(theta, dim=1)


def random_subset(n: int, size: int, device: torch.device, generator: torch.Generator | None = None
                  ) -> Tensor | None:
    """`size` distinct indices below n, uniformly at random; None means all (size 0 or >= n)."""
    if size <= 0 or size >= n:
        return None
    return torch.randperm(n, device=device, generator=generator)[:size]


def global_patch_swd(x: Tensor, y: Tensor, theta: Tensor, kernel_size: int, max_samples: int,
                     generator: torch.Generator | None = None) -> Tensor:
    """SWD between the k x k patches of the whole batch x and of the whole batch y [B, C, H, W].

    The B*H*W patches of each side are pooled, `max_samples` of them drawn (all when fewer), projected
    on theta [P, C*k*k] (F.unfold order, zero padding k//2), sorted per direction; returns the mean
    squared difference of the sorted projections.

    The same (row, position) indices are drawn for x and y. Row b of y is the reference for row b of
    x (same target style), so shared indices give both pools exactly the same mixture of target
    styles; independent draws would compare two different random mixtures of styles (extra noise in
    the gradient) and make the distance between two identical batches positive.
    """
    if y.shape != x.shape:
        raise ValueError(f"global_patch_swd: x and y must have one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    B, n = x.shape[0], x.shape[2] * x.shape[3]
    index = random_subset(B * n, max_samples, x.device, generator)
    projections = []
    for image in (x, y):
        patches = F.unfold(image, kernel_size, padding=kernel_size // 2)  # [B, C*k*k, H*W]
        if index is None:
            pooled = patches.transpose(1, 2).reshape(B * n, -1)  # [B*H*W, C*k*k]
        else:
            pooled = patches[index // n, :, index % n]  # [S, C*k*k]: gathers only the drawn patches
        projections.append(torch.sort(pooled @ theta.T, dim=0).values)  # [S, P]
    return F.mse_loss(projections[0], projections[1])


@dataclass(frozen=True)
class PatchSWD:
    """Style energy: patch SWD with `num_projections` directions redrawn on every call.

    per_sample: kernels.patch_swd, row b of x against row b of y (a "stratified" SWD: every
    reference is matched with its own transported latent). Otherwise `global_patch_swd`.
    scales: the SWD is taken at each factor f of `scales`, on both sides average-pooled f x f (k x k
    patches of the pooled latents see (k f) x (k f) of the original: larger structures), and the
    energies are averaged; (1,) is the plain patch SWD. Each scale draws its own directions."""

    num_projections: int = 64
    kernel_size: int = 3
    per_sample: bool = True
    max_samples: int = 8192
    scales: tuple[int, ...] = (1,)

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        with fp32_region(x.device):
            x, y = x.float(), y.float()
            return sum(self._at_scale(F.avg_pool2d(x, f) if f > 1 else x, F.avg_pool2d(y, f) if f > 1 else y,
                                      generator) for f in self.scales) / len(self.scales)

    def _at_scale(self, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        theta = random_directions(self.num_projections, x.shape[1] * self.kernel_size ** 2, x.device, generator)
        if self.per_sample:
            return kernels.patch_swd(x, y, theta, self.kernel_size)
        return global_patch_swd(x, y, theta, self.kernel_size, self.max_samples, generator)


@dataclass(frozen=True)
class SelfSimilarity:
    """Content energy: kernels.ssm_loss on `max_spatial_samples` positions drawn per call (0 = all),
    the same positions for both sides (the Gram matrices must compare the same pairs of pixels)."""

    max_spatial_samples: int = 256

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        with fp32_region(x.device):
            x, y = x.float(), y.float()
            index = random_subset(x.shape[2] * x.shape[3], self.max_spatial_samples, x.device, generator)
            return kernels.ssm_loss(x, y, index)


def random_probe(like: Tensor, kind: str = "rademacher") -> Tensor:
    """A Hutchinson probe with E[eps eps^T] = I: Rademacher (+-1) or standard Gaussian, in fp32."""
    if kind == "rademacher":
        return torch.randint(0, 2, like.shape, device=like.device).float().mul_(2).sub_(1)
    if kind == "gaussian":
        return torch.randn(like.shape, device=like.device)
    raise ValueError(f"unknown Hutchinson probe {kind!r}; valid: 'rademacher', 'gaussian'")


def hutchinson_divergence(v: Tensor, x: Tensor, probe: Tensor) -> Tensor:
    """probe^T (dv/dx) probe per sample [B]: an unbiased estimate of div v = trace(dv/dx).

    One vector-Jacobian product with create_graph=True, so the estimate is itself differentiable
    (training on it is a double backward through the network). `v` must have been computed from `x`."""
    (vjp,) = torch.autograd.grad(v, x, probe.to(v.dtype), create_graph=True)
    return (vjp.float() * probe).flatten(1).sum(dim=1)
