"""The ADM-style U-Net (Dhariwal & Nichol 2021) every pixel/latent diffusion method here trains.

    x [B, in, H, W] -> conv3x3 -> encoder: per level, num_res_blocks x (ResBlock [+ attention]),
    then a strided-conv downsample (not after the last level) -> middle: ResBlock [+ attention]
    ResBlock -> decoder: per level, num_res_blocks + 1 x (concat skip, ResBlock [+ attention]),
    then a nearest+conv upsample (not after the first level) -> GN -> SiLU -> conv3x3 -> [B, out, H, W]

Every encoder output (the input conv's included) is a skip that one decoder block concatenates,
as in ADM. Attention sits wherever the feature-map side is in `attention_resolutions`, the middle
block included. The conditioning vector emb [B, 4 * channels] = MLP(sinusoidal(t)) + class row
(the last row of the class table is the NULL class for classifier-free guidance) modulates every
ResBlock through FiLM.

Normalisations go through `kernels.group_norm_film_silu` (the fused GroupNorm -> FiLM -> SiLU);
the zero-initialised last conv of each residual branch and of the head makes a fresh network an
identity map on its residual stream and return exactly zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as checkpoint_block

from engine.models.attention import spatial_attention
from engine.models.embeddings import ClassEmbedding, TimestepEmbedding
from engine.models.layers import GroupNorm, Upsample


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN -> FiLM(emb) -> SiLU -> dropout -> conv3x3 (zero-init), + skip."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, num_groups: int, dropout: float):
        super().__init__()
        self.norm1 = GroupNorm(in_channels, num_groups, act=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(embed_dim, 2 * out_channels)
        self.norm2 = GroupNorm(out_channels, num_groups, act=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        scale, shift = self.emb_proj(F.silu(emb)).chunk(2, dim=1)  # [B, out] each
        h = self.conv2(self.dropout(self.norm2(h, scale, shift)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions: GN -> qkv 1x1 -> attention -> proj 1x1 (zero-init), + x."""

    def __init__(self, channels: int, num_heads: int, num_groups: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"model.num_heads={num_heads} must divide the {channels} channels of an attention "
                             "block; pick num_heads dividing channels * every attended channel_mult")
        self.num_heads = num_heads
        self.norm = GroupNorm(channels, num_groups, act=False)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # q, k, v reach the attention kernel with stride 1 along d (see engine/models/attention.py).
        return x + spatial_attention(self.norm(x), self.qkv, self.proj, self.num_heads)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class EmbedSequential(nn.ModuleList):
    """Layers applied in order; ResBlocks also receive the conditioning embedding."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h


class UNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, channels: int, channel_mult: Sequence[int],
                 num_res_blocks: int, attention_resolutions: Sequence[int], num_heads: int, num_groups: int,
                 dropout: float, num_classes: int, image_size: int, checkpoint: bool = False):
        super().__init__()
        levels = len(channel_mult)
        if image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size={image_size} must be divisible by 2^{levels - 1} for "
                             f"{levels} levels (len(model.channel_mult)); use fewer levels or another size")
        sides = [image_size // 2**level for level in range(levels)]
        unreachable = sorted(set(attention_resolutions) - set(sides))
        if unreachable:
            raise ValueError(f"model.attention_resolutions {unreachable} never occur: the feature maps of a "
                             f"{image_size}-pixel input are {sides}")
        self.in_channels = in_channels
        self.num_levels = levels
        self.checkpoint = checkpoint
        self.time_embed_dim = embed_dim = 4 * channels
        self.time_embedding = TimestepEmbedding(channels, embed_dim)
        self.class_embedding = ClassEmbedding(num_classes, embed_dim)

        def stage(cin: int, cout: int, side: int) -> list[nn.Module]:
            layers: list[nn.Module] = [ResBlock(cin, cout, embed_dim, num_groups, dropout)]
            if side in attention_resolutions:
                layers.append(AttentionBlock(cout, num_heads, num_groups))
            return layers

        self.input_conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        skip_channels = [channels]
        ch = channels
        self.down_blocks = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down_blocks.append(EmbedSequential(stage(ch, channels * mult, sides[level])))
                ch = channels * mult
                skip_channels.append(ch)
            if level != levels - 1:
                self.down_blocks.append(EmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)

        middle = stage(ch, ch, sides[-1]) + [ResBlock(ch, ch, embed_dim, num_groups, dropout)]
        self.middle_block = EmbedSequential(middle)

        self.up_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = stage(ch + skip_channels.pop(), channels * mult, sides[level])
                ch = channels * mult
                if level != 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.up_blocks.append(EmbedSequential(layers))

        self.out_norm = GroupNorm(ch, num_groups, act=True)
        self.out_conv = zero_init(nn.Conv2d(ch, out_channels, 3, padding=1))

    @classmethod
    def from_config(cls, model_cfg, in_channels: int, out_channels: int, num_classes: int,
                    image_size: int) -> UNet:
        """The U-Net a [model] config section describes (engine.methods.sections.ModelConfig)."""
        return cls(in_channels, out_channels, model_cfg.channels, model_cfg.channel_mult,
                   model_cfg.num_res_blocks, model_cfg.attention_resolutions, model_cfg.num_heads,
                   model_cfg.num_groups, model_cfg.dropout, num_classes, image_size, model_cfg.checkpoint)

    @property
    def num_classes(self) -> int:
        return self.class_embedding.num_classes

    @property
    def null_label(self) -> int:
        """The class index that means "unconditional" (the last row of the class table)."""
        return self.class_embedding.null_label

    def embed(self, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """t [B] float (integer-valued or continuous; the sinusoid sees it unscaled), labels [B] long
        or None (= NULL for all) -> emb [B, time_embed_dim]."""
        return self.time_embedding(t) + self.class_embedding(labels, t.shape[0], t.device)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, in, H, W], t [B], labels [B] or None -> [B, out, H, W]."""
        self._check_inputs(x)
        emb = self.embed(t, labels)
        h = self.input_conv(x)
        skips = [h]
        for block in self.down_blocks:
            h = self._run(block, h, emb)
            skips.append(h)
        h = self._run(self.middle_block, h, emb)
        for block in self.up_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out_conv(self.out_norm(h))

    def _run(self, block: EmbedSequential, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            # Non-reentrant: works with inputs that do not require grad and keeps the dropout RNG
            # state, so the recomputed forward matches the original.
            return checkpoint_block(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def _check_inputs(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects x of shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        factor = 2 ** (self.num_levels - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"UNet input sides {tuple(x.shape[2:])} must be divisible by {factor} "
                             f"({self.num_levels} levels)")
