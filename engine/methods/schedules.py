"""Discrete Gaussian noise schedules and the algebra of the variance-preserving path.

    x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps,   t in {0, ..., T-1}

Write a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t) (so a^2 + s^2 = 1). The three things a
network can predict are interchangeable given x_t:

    x0 = (x_t - s * eps) / a        eps = (x_t - a * x0) / s
    v  = a * eps - s * x0           eps = s * x_t + a * v        x0 = a * x_t - s * v
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("linear", "cosine")


def linear_betas(timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Ho et al.'s betas, evenly spaced from beta_start to beta_end: [T] float64."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_alpha_bar(u: torch.Tensor, offset: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's alpha_bar as a function of u = t / T in [0, 1]."""
    return torch.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2


def cosine_betas(timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """betas_t = 1 - alpha_bar((t+1)/T) / alpha_bar(t/T), clipped at max_beta (alpha_bar(1) = 0
    would make the last beta 1 and x_{T-1} carry no signal at all): [T] float64."""
    u = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    alpha_bar = cosine_alpha_bar(u)
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def make_betas(schedule: str, timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    if schedule == "linear":
        return linear_betas(timesteps, beta_start, beta_end)
    if schedule == "cosine":
        return cosine_betas(timesteps)
    raise ValueError(f"unknown noise schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


def extract(coefficients: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """coefficients [T] indexed at t [B] -> [B, 1, ..., 1] broadcastable against an ndim tensor."""
    return coefficients[t].reshape(t.shape[0], *([1] * (ndim - 1)))


class NoiseSchedule(nn.Module):
    """The per-timestep coefficients of the forward process and its posterior q(x_{t-1} | x_t, x0).

    Computed once in float64 and stored as float32 buffers (a product of 1000 factors in float32
    drifts). Buffers are not persistent: they are a pure function of the [ddpm] config, which the
    run directory stores, so checkpoints hold weights only.
    """

    def __init__(self, betas: torch.Tensor):
        super().__init__()
        betas = betas.double()
        if betas.dim() != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D tensor with every value in (0, 1)")
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "posterior_variance": posterior_variance,
            # The posterior variance is 0 at t = 0: log it as the t = 1 value there (ADM's clip).
            "posterior_log_variance_clipped": torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log(),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    @property
    def timesteps(self) -> int:
        return self.betas.shape[0]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, for x0, noise [B, ...], t [B] long."""
        # The buffers already hold the square roots: taking .sqrt() of them again is a classic bug.
        a = extract(self.sqrt_alphas_cumprod, t, x0.dim())
        s = extract(self.sqrt_one_minus_alphas_cumprod, t, x0.dim())
        return a * x0 + s * noise

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x0), t [B] long."""
        return (extract(self.posterior_mean_coef1, t, x_t.dim()) * x0
                + extract(self.posterior_mean_coef2, t, x_t.dim()) * x_t)


# ----------------------------------------------------------------------------- prediction conversions
# a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t), broadcastable against the images.


def predict_x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (x_t - s * eps) / a


def predict_eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (x_t - a * x0) / s


def v_from_eps_x0(eps: torch.Tensor, x0: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return a * eps - s * x0


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return s * x_t + a * v


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return a * x_t - s * v
