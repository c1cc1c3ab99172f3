"""Exponential moving average of a module's weights, with k-diffusion style warm-up."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Holds a frozen copy of a module whose parameters trail the live ones.

    decay_n = min(decay, (1 + n) / (10 + n)) with warm-up, so the average tracks the model closely
    early in training instead of being dominated by the random initialisation."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, module: nn.Module, skipped: torch.Tensor | None = None) -> None:
        """One EMA step towards `module`. `skipped` (a 0/1 device tensor, 1 when the optimizer skipped
        this step on the device) turns the step into a no-op without a host sync."""
        weight = 1.0 - self.current_decay()
        if skipped is not None:
            weight = (1.0 - skipped) * weight
        ema_params = list(self.module.parameters())
        live_params = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(ema_params, live_params, weight)
        for ema_buffer, live_buffer in zip(self.module.buffers(), module.buffers()):
            ema_buffer.copy_(live_buffer)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()
