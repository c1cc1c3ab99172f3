"""The U-Net with two times, for flow maps: v(x, s, t) conditions on a source time s and a target
time t.

It is the engine's U-Net (engine/models/unet.py) unchanged except for its embedding: the times
travel through `UNet.forward` as one [B, 2] tensor (s, t), and `embed` adds a second sinusoidal
MLP for s to the U-Net's own time embedding of t and the class row,

    emb = time_embedding(t) + source_time_embedding(s) + class row (none under text conditioning),

so the network has the U-Net's layers and parameter names plus `source_time_embedding.*`.
Addition rather than concatenation keeps every ResBlock's FiLM projection as it is.
"""

from __future__ import annotations

import torch

from engine.models.embeddings import TimestepEmbedding
from engine.models.unet import UNet


class DualTimeUNet(UNet):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.source_time_embedding = TimestepEmbedding(self.time_embedding.freq_dim, self.time_embed_dim)

    def embed(self, times: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """times [B, 2] = (s, t) (scaled by the caller like the U-Net's t), labels [B] or None -> emb."""
        if times.dim() != 2 or times.shape[1] != 2:
            raise ValueError(f"DualTimeUNet expects times of shape [B, 2] (s, t), got {tuple(times.shape)}")
        s, t = times.unbind(1)
        return (self.time_embedding(t) + self.source_time_embedding(s)
                + self.class_row(labels, times.shape[0], times.device))

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, in, H, W], source and target times s, t [B], labels [B] or None -> [B, out, H, W]."""
        return super().forward(x, torch.stack([s, t], dim=1), labels)
