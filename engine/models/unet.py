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

Text conditioning. A U-Net built with a prompt table (context [N, L, D], mask [N, L]: one row per
class, the last row the "" prompt, which is the null condition) has no class table: a label picks
its row of the prompt table, and a cross-attention block (queries from the image, keys and values
from the row's tokens) follows every self-attention block. The table is a constructor argument
held as buffers, so the context width D is fixed by the table the network is built from, there is
no way to attach a table to a network built without one, and a checkpoint carries its prompts.

Normalisations go through `kernels.group_norm_film_silu` (the fused GroupNorm -> FiLM -> SiLU);
the zero-initialised last conv of each residual branch and of the head makes a fresh network an
identity map on its residual stream and return exactly zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as checkpoint_block

from engine.models.attention import cross_attention, spatial_attention
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


def check_heads(channels: int, num_heads: int) -> None:
    """The heads of an attention block split its channels evenly."""
    if channels % num_heads:
        raise ValueError(f"model.num_heads={num_heads} must divide the {channels} channels of an attention "
                         "block; pick num_heads dividing channels * every attended channel_mult")


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions: GN -> qkv 1x1 -> attention -> proj 1x1 (zero-init), + x."""

    def __init__(self, channels: int, num_heads: int, num_groups: int):
        super().__init__()
        check_heads(channels, num_heads)
        self.num_heads = num_heads
        self.norm = GroupNorm(channels, num_groups, act=False)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # q, k, v reach the attention kernel with stride 1 along d (see engine/models/attention.py).
        return x + spatial_attention(self.norm(x), self.qkv, self.proj, self.num_heads)


class CrossAttentionBlock(nn.Module):
    """Multi-head attention from the image to the prompt context: GN -> q 1x1, k/v from the context
    -> attention over the context's real tokens -> proj 1x1 (zero-init), + x."""

    def __init__(self, channels: int, context_dim: int, num_heads: int, num_groups: int):
        super().__init__()
        check_heads(channels, num_heads)
        self.num_heads = num_heads
        self.norm = GroupNorm(channels, num_groups, act=False)
        self.to_q = nn.Conv2d(channels, channels, 1)
        self.to_kv = nn.Linear(context_dim, 2 * channels)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W], context [B, L, D], context_mask [B, L] bool -> [B, C, H, W]."""
        return x + cross_attention(self.norm(x), context, context_mask, self.to_q, self.to_kv, self.proj,
                                   self.num_heads)


class PromptContext(nn.Module):
    """The prompt embeddings a text-conditioned U-Net reads, as buffers: context [N, L, D] float32 and
    mask [N, L] bool (True = a real token). Row N - 1 is the "" prompt: the null condition. The
    prompts' text and the identity of their encoder ride along for messages and new prompts."""

    def __init__(self, table):
        super().__init__()
        context, mask = table.context, table.mask
        self.prompts, self.encoder = list(table.prompts), table.encoder
        if context.dim() != 3 or mask.shape != context.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(f"a prompt table is context [N, L, D] with a bool mask [N, L], got "
                             f"{tuple(context.shape)} and {mask.dtype} {tuple(mask.shape)}")
        if context.shape[0] < 2:
            raise ValueError(f"a prompt table needs a row per class and the '' row, got {context.shape[0]} row(s)")
        self.register_buffer("context", context.detach().float().clone())
        self.register_buffer("mask", mask.detach().clone())

    @property
    def null_label(self) -> int:
        return self.context.shape[0] - 1

    def forward(self, labels: torch.Tensor | None, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """labels [B] long in [0, N - 1] (N - 1 = null) or None (all null) -> (context [B, L, D], mask [B, L])."""
        if labels is None:
            labels = torch.full((batch_size,), self.null_label, dtype=torch.long, device=self.context.device)
        elif labels.shape != (batch_size,):
            raise ValueError(f"labels must have shape [{batch_size}] (one per sample), got {tuple(labels.shape)}")
        return self.context[labels], self.mask[labels]

    @contextlib.contextmanager
    def substituted(self, context: torch.Tensor, mask: torch.Tensor) -> Iterator[None]:
        """Rows 0..m-1 read the m prompts context [m, L', D] / mask [m, L'] inside the block (sampling
        with prompts typed at the command line), the table padded with masked tokens to the longer
        of L and L'; the table comes back unchanged afterwards."""
        m, length = context.shape[0], max(self.context.shape[1], context.shape[1])
        if context.shape[2] != self.context.shape[2] or not 1 <= m < self.context.shape[0]:
            raise ValueError(f"{m} prompt(s) of width {context.shape[2]} cannot stand in for rows of a "
                             f"{tuple(self.context.shape)} table")
        saved = self.context, self.mask
        padded_context = F.pad(self.context, (0, 0, 0, length - self.context.shape[1])).clone()
        padded_mask = F.pad(self.mask, (0, length - self.mask.shape[1])).clone()
        padded_context[:m] = F.pad(context.to(padded_context), (0, 0, 0, length - context.shape[1]))
        padded_mask[:m] = F.pad(mask.to(padded_mask.device), (0, length - mask.shape[1]))
        self.context, self.mask = padded_context, padded_mask
        try:
            yield
        finally:
            self.context, self.mask = saved


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class EmbedSequential(nn.ModuleList):
    """Layers applied in order; ResBlocks also receive the conditioning embedding, cross-attention
    blocks the prompt context and its mask."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, CrossAttentionBlock):
                h = layer(h, context, context_mask)
            else:
                h = layer(h)
        return h


class UNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, channels: int, channel_mult: Sequence[int],
                 num_res_blocks: int, attention_resolutions: Sequence[int], num_heads: int, num_groups: int,
                 dropout: float, num_classes: int, image_size: int, checkpoint: bool = False,
                 prompt_table=None):
        """prompt_table: an engine.text.PromptTable (context [num_classes + 1, L, D], mask, prompts,
        encoder) for text conditioning (see the module doc), or None for a class table."""
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
        if prompt_table is None:
            self.class_embedding, self.prompts = ClassEmbedding(num_classes, embed_dim), None
        else:
            self.class_embedding, self.prompts = None, PromptContext(prompt_table)
            if self.prompts.null_label != num_classes:
                raise ValueError(f"a prompt table of {self.prompts.context.shape[0]} rows does not fit {num_classes} "
                                 f"classes: it needs one row per class and the '' row")
            if not attention_resolutions:
                raise ValueError("text conditioning reads the prompts through cross-attention, which sits at "
                                 "model.attention_resolutions: list at least one feature-map side there")
        context_dim = None if self.prompts is None else self.prompts.context.shape[2]

        def stage(cin: int, cout: int, side: int) -> list[nn.Module]:
            layers: list[nn.Module] = [ResBlock(cin, cout, embed_dim, num_groups, dropout)]
            if side in attention_resolutions:
                layers.append(AttentionBlock(cout, num_heads, num_groups))
                if context_dim is not None:
                    layers.append(CrossAttentionBlock(cout, context_dim, num_heads, num_groups))
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
                    image_size: int, prompt_table=None) -> UNet:
        """The U-Net a [model] config section describes (engine.methods.sections.ModelConfig)."""
        return cls(in_channels, out_channels, model_cfg.channels, model_cfg.channel_mult,
                   model_cfg.num_res_blocks, model_cfg.attention_resolutions, model_cfg.num_heads,
                   model_cfg.num_groups, model_cfg.dropout, num_classes, image_size, model_cfg.checkpoint,
                   prompt_table)

    @property
    def num_classes(self) -> int:
        return self.class_embedding.num_classes if self.prompts is None else self.prompts.null_label

    @property
    def null_label(self) -> int:
        """The class index that means "unconditional" (the last row of the class or prompt table)."""
        return self.num_classes

    @property
    def context_dim(self) -> int | None:
        """Width D of the prompt context (from the table the network was built with), None without text."""
        return None if self.prompts is None else self.prompts.context.shape[2]

    def embed(self, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """t [B] float (integer-valued or continuous; the sinusoid sees it unscaled), labels [B] long
        or None (= NULL for all) -> emb [B, time_embed_dim]."""
        return self.time_embedding(t) + self.class_row(labels, t.shape[0], t.device)

    def class_row(self, labels: torch.Tensor | None, batch_size: int, device: torch.device) -> torch.Tensor:
        """The class table's rows for labels [B] ([B, time_embed_dim]); 0 when text conditions instead."""
        if self.class_embedding is None:
            return torch.zeros((), device=device)
        return self.class_embedding(labels, batch_size, device)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, in, H, W], t [B], labels [B] or None -> [B, out, H, W]."""
        self._check_inputs(x)
        emb = self.embed(t, labels)
        context = () if self.prompts is None else self.prompts(labels, x.shape[0])
        h = self.input_conv(x)
        skips = [h]
        for block in self.down_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.up_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out_conv(self.out_norm(h))

    def _run(self, block: EmbedSequential, h: torch.Tensor, emb: torch.Tensor, context: tuple) -> torch.Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            # Non-reentrant: works with inputs that do not require grad and keeps the dropout RNG
            # state, so the recomputed forward matches the original.
            return checkpoint_block(block, h, emb, *context, use_reentrant=False)
        return block(h, emb, *context)

    def _check_inputs(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects x of shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        factor = 2 ** (self.num_levels - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"UNet input sides {tuple(x.shape[2:])} must be divisible by {factor} "
                             f"({self.num_levels} levels)")


def prompt_context_of(module: nn.Module) -> PromptContext | None:
    """The prompt table of the text-conditioned U-Net inside `module` (a method), or None."""
    return next((m for m in module.modules() if isinstance(m, PromptContext)), None)


def text_conditioning_record(module: nn.Module) -> dict | None:
    """What a checkpoint records of `module`'s prompt table so that a network of the same shape can be
    built before its weights are loaded: {"shape", "prompts", "encoder"}, or None without text."""
    prompts = prompt_context_of(module)
    if prompts is None:
        return None
    return {"shape": list(prompts.context.shape), "prompts": prompts.prompts, "encoder": prompts.encoder}


def describe_text_conditioning(module: nn.Module) -> str | None:
    """One line on `module`'s text conditioning for the start of a run, or None without text."""
    prompts = prompt_context_of(module)
    if prompts is None:
        return None
    blocks = sum(isinstance(m, CrossAttentionBlock) for m in module.modules())
    shown = ", ".join(repr(p) for p in prompts.prompts[:3]) + (", ..." if len(prompts.prompts) > 3 else "")
    return (f"text conditioning: {blocks} cross-attention blocks read a prompt table {list(prompts.context.shape)} "
            f"(rows {shown}; encoder {prompts.encoder})")
