"""The interface every method (DDPM, autoencoder, LGT, ...) implements.

A method owns the maths: what a training loss is and how samples are drawn. It is an nn.Module
holding the network(s) and any fixed buffers (noise schedules), so that the EMA copy, DDP and
checkpoints treat it as one object. The loop calls `method(batch)` (DDP wraps that call) and
`method.sample_grid(...)` on the EMA copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from engine.data.base import Batch


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to backpropagate
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # each logged under its own key


class Method(nn.Module):
    @classmethod
    def training_data(cls, cfg, world, device: torch.device):
        """The data source this method trains on; most methods take `data.source` as it is.
        `world` (engine.distributed.World) lets a method prepare shared data on one rank."""
        from engine.data import build_data_source

        return build_data_source(cfg.data, cfg.run.seed, world.rank, device)

    def forward(self, batch: Batch) -> LossOutput:
        """Training loss for one micro-batch. Randomness comes from the global torch RNG, which the
        loop reseeds every step from (run.seed, rank, step)."""
        raise NotImplementedError

    @torch.no_grad()
    def sample_grid(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """Pictures for the periodic sample grid: (images [N, C, H, W] in [-1, 1], images per row).

        `batch` is a fixed batch of real data (for methods that transform data); `generator` is
        seeded identically every time so successive grids are comparable."""
        raise NotImplementedError

    def evaluate(self, data) -> dict[str, float]:
        """Numbers printed (and logged as eval/*) at the end of training; none by default."""
        return {}
