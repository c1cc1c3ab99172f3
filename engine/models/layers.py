"""Layers shared by the engine's networks (U-Net, autoencoders)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm's parameters (and state_dict names), computed by the fused kernel:
    y = [silu]((groupnorm(x) * weight + bias) * (1 + scale) + shift), scale/shift [B, C] optional.

    The group count is clamped to gcd(num_groups, channels) so any width works."""

    def __init__(self, num_channels: int, num_groups: int, act: bool, eps: float = 1e-5):
        super().__init__(math.gcd(num_groups, num_channels), num_channels, eps=eps)
        self.act = act

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.group_norm_film_silu(x, self.num_groups, self.weight, self.bias, scale, shift,
                                            eps=self.eps, act=self.act)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
