"""Autoencoders that map images to latents and back.

- `AutoencoderKL`: the Stable-Diffusion VAE's architecture family (f = 2^(levels-1), 8 with the
  default 4 levels; 4 latent channels). Encoder: conv_in, per level ResBlocks then a strided
  3x3 downsample, a mid block (ResBlock, self-attention, ResBlock), GroupNorm-SiLU, conv to
  2 * latent_channels (mean, log-variance), 1x1 quant_conv. The decoder mirrors it with nearest
  upsampling. `encode(x) -> DiagonalGaussian`, `decode(z) -> x`.
- `LinearAutoencoder`: a 784 -> 128 -> 784 one for flat data such as 28x28 digits (any [C, H, W] is
  flattened). Its latents are shaped [B, latent_dim, 1, 1] so that they fit the [C, H, W] sample
  shape every data source uses.

Both carry a `scaling_factor` buffer (SD's convention: latents are multiplied by it after
encoding and divided by it before decoding). Ours stay at 0 = "not estimated": the choice made
here is to estimate it at encode time, not at the end of training (the training loop owns
nothing method-specific, and its last batch is a noisier estimate): `engine-encode` uses 1 / std
of all the latents it encodes and writes that value into the latents file, which is what
decoders read back (`decode_to_images(autoencoder, latents, file.scaling_factor)`). Set the
buffer (> 0) to pin a factor; a diffusers VAE brings its config's value.

Loading a trained or pretrained one from disk is engine/autoencoders.py's work: this module only
defines the networks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.attention import spatial_attention
from engine.models.layers import GroupNorm, Upsample

INITIAL_LOGVAR = -6.0  # initial posterior log-variance of both autoencoders (see AutoencoderKL)


class DiagonalGaussian:
    """A diagonal Gaussian posterior q(z|x) over latents [B, C, h, w], held in fp32."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean.float()
        # SD's clamp: keeps exp() finite early in training, when the encoder outputs anything.
        self.logvar = logvar.float().clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample in nats, summed over the latent dimensions: [B]."""
        per_dim = 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar)
        return per_dim.flatten(1).sum(dim=1)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_groups: int):
        super().__init__()
        self.norm1 = GroupNorm(in_channels, num_groups, act=True, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(out_channels, num_groups, act=True, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.norm2(h))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the h*w positions (SD's mid-block attention)."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm = GroupNorm(channels, num_groups, act=False, eps=1e-6)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # q, k, v reach the attention kernel with stride 1 along d (see engine/models/attention.py).
        return x + spatial_attention(self.norm(x), self.qkv, self.proj_out, num_heads=1)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # SD's asymmetric pad: exact halving of even sides


def _mid_block(channels: int, num_groups: int) -> nn.Sequential:
    return nn.Sequential(ResBlock(channels, channels, num_groups), AttentionBlock(channels, num_groups),
                         ResBlock(channels, channels, num_groups))


class Encoder(nn.Module):
    def __init__(self, in_channels: int, channels: int, channel_mult: list[int], num_res_blocks: int,
                 latent_channels: int, num_groups: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        blocks: list[nn.Module] = []
        width = channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(width, channels * mult, num_groups))
                width = channels * mult
            if level != len(channel_mult) - 1:
                blocks.append(Downsample(width))
        self.down = nn.Sequential(*blocks)
        self.mid = _mid_block(width, num_groups)
        self.norm_out = GroupNorm(width, num_groups, act=True, eps=1e-6)
        self.conv_out = nn.Conv2d(width, 2 * latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(self.norm_out(h))


class Decoder(nn.Module):
    def __init__(self, out_channels: int, channels: int, channel_mult: list[int], num_res_blocks: int,
                 latent_channels: int, num_groups: int):
        super().__init__()
        width = channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(latent_channels, width, 3, padding=1)
        self.mid = _mid_block(width, num_groups)
        blocks: list[nn.Module] = []
        for level in reversed(range(len(channel_mult))):
            for _ in range(num_res_blocks + 1):  # one more than the encoder, as in SD
                blocks.append(ResBlock(width, channels * channel_mult[level], num_groups))
                width = channels * channel_mult[level]
            if level != 0:
                blocks.append(Upsample(width))
        self.up = nn.Sequential(*blocks)
        self.norm_out = GroupNorm(width, num_groups, act=True, eps=1e-6)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(self.norm_out(h))


class AutoencoderKL(nn.Module):
    """SD-style KL autoencoder: images [B, C, H, W] in [-1, 1] <-> latents [B, latent_channels, H/f, W/f]."""

    def __init__(self, in_channels: int = 3, latent_channels: int = 4, channels: int = 64,
                 channel_mult: list[int] = (1, 2, 4, 4), num_res_blocks: int = 1, num_groups: int = 32):
        super().__init__()
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.downsampling = 2 ** (len(channel_mult) - 1)
        self.encoder = Encoder(in_channels, channels, list(channel_mult), num_res_blocks, latent_channels,
                               num_groups)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        # Start with a narrow posterior (std ~0.05, log-variance -6) instead of PyTorch's ~0: with
        # std 1 the decoder first sees latents that are mostly noise and short runs stall on
        # "predict the mean colour" for many steps. The KL term is free to widen it again.
        with torch.no_grad():
            self.quant_conv.bias[latent_channels:].fill_(INITIAL_LOGVAR)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.decoder = Decoder(in_channels, channels, list(channel_mult), num_res_blocks, latent_channels,
                               num_groups)
        self.register_buffer("scaling_factor", torch.tensor(0.0))

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        C, H, W = image_shape
        if C != self.in_channels or H % self.downsampling or W % self.downsampling:
            raise ValueError(f"AutoencoderKL: images must be [{self.in_channels}, H, W] with H and W divisible "
                             f"by {self.downsampling}; got {list(image_shape)}")
        return (self.latent_channels, H // self.downsampling, W // self.downsampling)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self.latent_shape(tuple(x.shape[1:]))
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


class LinearAutoencoder(nn.Module):
    """Seed 000's linear VAE: flatten [C, H, W] (784 for 1x28x28) -> latent_dim -> back."""

    def __init__(self, image_shape: tuple[int, int, int] = (1, 28, 28), latent_dim: int = 128):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.in_channels = self.image_shape[0]
        features = math.prod(self.image_shape)
        self.encoder = nn.Linear(features, 2 * latent_dim)  # mean and log-variance
        with torch.no_grad():
            self.encoder.bias[latent_dim:].fill_(INITIAL_LOGVAR)
        self.decoder = nn.Linear(latent_dim, features)
        self.register_buffer("scaling_factor", torch.tensor(0.0))

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        if tuple(image_shape) != self.image_shape:
            raise ValueError(f"LinearAutoencoder: built for images {list(self.image_shape)}, got "
                             f"{list(image_shape)}")
        return (self.decoder.in_features, 1, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self.latent_shape(tuple(x.shape[1:]))
        mean, logvar = self.encoder(x.flatten(1)).chunk(2, dim=1)
        return DiagonalGaussian(mean[:, :, None, None], logvar[:, :, None, None])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z.flatten(1)).view(z.shape[0], *self.image_shape)


def build_autoencoder(cfg, image_shape: tuple[int, int, int]) -> AutoencoderKL | LinearAutoencoder:
    """The autoencoder described by an `AutoencoderConfig`, for images of shape [C, H, W]."""
    if cfg.kind == "linear":
        return LinearAutoencoder(image_shape, cfg.latent_dim)
    model = AutoencoderKL(image_shape[0], cfg.latent_channels, cfg.channels, cfg.channel_mult,
                          cfg.num_res_blocks, cfg.num_groups)
    model.latent_shape(image_shape)  # fail now, not at the first step, on sides f does not divide
    return model


# --------------------------------------------------------------------------- latents -> pictures


def _device_of(module: nn.Module) -> torch.device:
    return next(iter(module.buffers())).device  # every autoencoder here has its scaling_factor buffer


@torch.no_grad()
def decode_to_images(autoencoder: nn.Module, latents: torch.Tensor, scaling_factor: float,
                     batch_size: int = 16) -> torch.Tensor:
    """Scaled latents [N, C, h, w] (as stored by engine-encode) -> images [N, 3, H, W] in [-1, 1],
    on the autoencoder's device, decoded `batch_size` at a time."""
    if not scaling_factor > 0:
        raise ValueError(f"decode_to_images: scaling_factor must be > 0, got {scaling_factor}")
    device = _device_of(autoencoder)
    chunks = [autoencoder.decode(chunk.to(device).float() / scaling_factor).float().clamp(-1, 1)
              for chunk in latents.split(batch_size)]
    return torch.cat(chunks)
