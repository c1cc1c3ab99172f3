"""Training an autoencoder (KL f=8, or the linear 784 -> 128 -> 784) with the ordinary train loop.

Loss = recon + kl_weight * KL / (pixels per sample), with
- recon: mean |x_hat - x| (l1) or mean (x_hat - x)^2 (mse) over every pixel value, x_hat decoded
  from a posterior sample;
- KL: KL(q(z|x) || N(0, I)) per sample in nats, summed over the latent dimensions (logged as
  "kl"). Dividing it by the values per input sample (C*H*W) weights the two terms as SD's VAE
  does (it sums both over a sample), so kl_weight = 1e-6 means what it means there.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from engine.data.base import Batch
from engine.methods.base import LossOutput, Method
from engine.methods.sections import AutoencoderConfig
from engine.models.autoencoder import build_autoencoder

EVAL_BATCH_SIZE = 16


class AutoencoderMethod(Method):
    name = "autoencoder"
    config_sections: ClassVar[dict[str, type]] = {"autoencoder": AutoencoderConfig}

    def __init__(self, autoencoder: torch.nn.Module, loss: str = "l1", kl_weight: float = 1e-6):
        super().__init__()
        if loss not in ("l1", "mse"):
            raise ValueError(f"autoencoder.loss must be 'l1' or 'mse', got {loss!r}")
        self.autoencoder = autoencoder
        self.loss = loss
        self.kl_weight = kl_weight

    @classmethod
    def from_config(cls, cfg, data) -> AutoencoderMethod:
        model = build_autoencoder(cfg.autoencoder, tuple(data.sample_shape))
        return cls(model, cfg.autoencoder.loss, cfg.autoencoder.kl_weight)

    @property
    def scaling_factor(self) -> torch.Tensor:
        """SD's latent scale (0 = not estimated; engine-encode then estimates it)."""
        return self.autoencoder.scaling_factor

    def reconstruction_error(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        diff = x_hat.float() - x.float()
        return diff.abs().mean() if self.loss == "l1" else diff.square().mean()

    def forward(self, batch: Batch) -> LossOutput:
        x = batch.x
        posterior = self.autoencoder.encode(x)
        x_hat = self.autoencoder.decode(posterior.sample())  # global RNG: the loop reseeds it per step
        recon = self.reconstruction_error(x, x_hat)
        kl = posterior.kl().mean()
        loss = recon + self.kl_weight * kl / math.prod(x.shape[1:])
        return LossOutput(loss, {"recon": recon.detach(), "kl": kl.detach()})

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode of the posterior mean: deterministic, what the sample grid shows."""
        return self.autoencoder.decode(self.autoencoder.encode(x).mode()).clamp(-1, 1)

    @torch.no_grad()
    def sample_grid(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """input, reconstruction, input, reconstruction, ... with whole pairs on every row."""
        x = batch.x
        x_hat = self.reconstruct(x).to(x.dtype)
        pairs = torch.stack([x, x_hat], dim=1).flatten(0, 1)  # [2N, C, H, W]
        pairs_per_row = math.ceil(math.sqrt(x.shape[0]))
        return pairs, 2 * pairs_per_row

    @torch.no_grad()
    def evaluate(self, data, per_class: int) -> dict[str, float]:
        """Reconstruction error of the posterior mean on about `per_class` x classes inputs (batches
        0.. of the data stream), and the latent std (1/std is what engine-encode uses as
        scaling_factor when the autoencoder has none)."""
        device = self.scaling_factor.device
        total = per_class * max(1, len(data.class_names))
        errors, latents = [], []
        for batch in _take(data.batches(0, EVAL_BATCH_SIZE), math.ceil(total / EVAL_BATCH_SIZE)):
            x = batch.x.to(device).float()
            z = self.autoencoder.encode(x).mode()
            x_hat = self.autoencoder.decode(z).clamp(-1, 1)
            errors.append((F.l1_loss(x_hat, x), F.mse_loss(x_hat, x)))
            latents.append(z.flatten())
        latent_std = torch.cat(latents).std().item()
        return {"recon_l1": torch.stack([e[0] for e in errors]).mean().item(),
                "recon_mse": torch.stack([e[1] for e in errors]).mean().item(),
                "latent_std": latent_std}


def _take(iterator, count: int):
    for _, item in zip(range(count), iterator):
        yield item
