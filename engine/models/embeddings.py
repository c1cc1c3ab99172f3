"""Conditioning embeddings shared by the U-Net and the methods that wrap it.

- `sinusoidal_embedding`: the Transformer / ADM encoding of a scalar time per sample.
- `TimestepEmbedding`: that encoding through a two-layer MLP (time_embed_dim = 4 x base width).
- `ClassEmbedding`: a learned row per class plus one NULL row (index = num_classes) that stands for
  "no condition", which is what classifier-free guidance drops labels to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t [B] (integer-valued or continuous, any scale) -> [B, dim] = [cos(t f_k), sin(t f_k)].

    Frequencies f_k = max_period^(-k / half) for k < half span [1/max_period, 1], so times of a
    few hundred to a few thousand (DDPM's 0..T-1) are resolved; continuous times in [0, 1] should
    be scaled up by the caller first, or most of the frequencies see an almost constant input.
    """
    if t.dim() != 1:
        raise ValueError(f"timesteps must be a 1-D tensor [B], got shape {tuple(t.shape)}")
    half = dim // 2
    # Always fp32: under bf16 autocast a time of 999 would be rounded to a multiple of 4.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """t [B] -> sinusoidal(t, freq_dim) -> Linear -> SiLU -> Linear -> [B, embed_dim]."""

    def __init__(self, freq_dim: int, embed_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.freq_dim))


class ClassEmbedding(nn.Module):
    """labels [B] long in [0, num_classes] (num_classes = NULL) or None (all NULL) -> [B, embed_dim]."""

    def __init__(self, num_classes: int, embed_dim: int):
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, embed_dim)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor | None, batch_size: int, device: torch.device) -> torch.Tensor:
        if labels is None:
            labels = torch.full((batch_size,), self.null_label, dtype=torch.long, device=device)
        elif labels.shape != (batch_size,):
            raise ValueError(f"labels must have shape [{batch_size}] (one per sample), got {tuple(labels.shape)}")
        # Values are not range-checked here: that would be a GPU->CPU sync every call. nn.Embedding
        # raises on CPU; on CUDA an out-of-range label is a device-side assert.
        return self.table(labels)
