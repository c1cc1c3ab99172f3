"""Self-attention over the positions of a feature map, shared by the U-Net's and the autoencoders'
attention blocks.

Layout. SDPA's fused kernels (flash, memory-efficient, cuDNN) and xformers need stride 1 along the
head dimension d of q, k and v. A channels-first [B, 3C, H, W] qkv gives d a stride of H*W, and
SDPA then falls back to its "math" kernel, which upcasts to fp32 and stores [B, heads, L, L]
scores and probabilities (for configs/lgt_4070.toml at batch 48, engine-plan predicts 0.68 of the
step's 2.36 GiB peak and a third of its roofline floor on an RTX 4070 Laptop). So the 1x1 qkv
convolution runs in channels_last: it writes each position's 3C values together, and q, k, v are
views [B, heads, L, d] with stride 1 along d (in xformers' [B, L, heads, d] order too). The
attention output comes back as [B, L, heads, d] from the fused kernels, which is a channels_last
[B, C, H, W] view for the 1x1 output projection: no copy on either side.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels


def spatial_attention(x: torch.Tensor, qkv: nn.Conv2d, proj: nn.Conv2d, num_heads: int) -> torch.Tensor:
    """proj(multi-head softmax attention over the H*W positions), x [B, C, H, W] (normalised) ->
    [B, C, H, W]. qkv maps C to 3C channels ordered (q, k, v) x heads x d; heads = num_heads."""
    B, C, H, W = x.shape
    d = C // num_heads
    # x in channels_last (written as permute + contiguous, which torch.func.vmap also runs).
    x_last = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    qkv_last = qkv(x_last)  # [B, 3C, H, W], channels_last
    tokens = qkv_last.permute(0, 2, 3, 1).reshape(B, H * W, 3, num_heads, d)  # a view: [B, L, 3, heads, d]
    q, k, v = (t.transpose(1, 2) for t in tokens.unbind(2))  # [B, heads, L, d], stride 1 along d
    out = kernels.attention(q, k, v)  # [B, heads, L, d]
    out = out.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)  # [B, C, H, W], channels_last
    return proj(out)
