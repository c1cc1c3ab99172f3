"""Attention over the positions of a feature map: self-attention (the U-Net's and the autoencoders'
attention blocks) and cross-attention to a prompt context (the U-Net's text conditioning).

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


def cross_attention(x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor, to_q: nn.Conv2d,
                    to_kv: nn.Linear, proj: nn.Conv2d, num_heads: int) -> torch.Tensor:
    """proj(multi-head attention from the H*W positions of x [B, C, H, W] (normalised) to the L tokens
    of context [B, L, D]), only to tokens where context_mask [B, L] is True -> [B, C, H, W].

    Queries come from the image (the 1x1 conv to_q, in channels_last as in `spatial_attention`),
    keys and values from the context (to_kv maps D to 2C, ordered (k, v) x heads x d): all three
    reach the kernel with stride 1 along d."""
    B, C, H, W = x.shape
    d = C // num_heads
    x_last = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    q = to_q(x_last).permute(0, 2, 3, 1).reshape(B, H * W, num_heads, d).transpose(1, 2)  # [B, heads, HW, d]
    kv = to_kv(context).reshape(B, context.shape[1], 2, num_heads, d)  # [B, L, 2, heads, d]
    k, v = (t.transpose(1, 2) for t in kv.unbind(2))  # [B, heads, L, d]
    out = kernels.attention(q, k, v, key_padding_mask=context_mask)
    out = out.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)
    return proj(out)
