"""Flow map matching (Boffi, Albergo & Vanden-Eijnden 2024), Lagrangian loss (their Prop. 3.11).

A flow map Phi_{s,t} carries a point of the probability flow at time s to where the flow has it at
time t (t = 0 noise, t = 1 data). It is parameterised by a dual-time network v(x, s, t)
(engine/models/dual_time_unet.py) as

    Phi_{s,t}(x) = x + (t - s) v(s, t, x),      so Phi_{s,s} = identity exactly.

Training, with x_0 ~ N(0, I), x_1 a data sample and the interpolant I_t = (1 - t) x_0 + t x_1
(velocity dI/dt = x_1 - x_0):

    base        = Phi_{t,s}(I_t), detached: the Lagrangian point at time s that should reach I_t
    derivative  = | d/dt Phi_{s,t}(base) - (x_1 - x_0) |^2,
                  d/dt Phi_{s,t}(x) = v(s, t, x) + (t - s) d/dt v(s, t, x)
    reconstruct = | Phi_{s,t}(Phi_{t,s}(I_t)) - I_t |^2   (not detached: trains the reverse map too)
    loss        = derivative + reconstruction_weight * reconstruct

d/dt v is a forward-mode derivative, torch.func.jvp of t -> v(s, t, x) with tangent 1, vmapped over
the batch (randomness="different": each row its own dropout mask). That section runs in fp32 with
autocast off (forward-mode AD in bf16 loses the derivative) and with attention written out as
plain ops (the fused attention kernels have no forward-mode rule); the fused GroupNorm-FiLM-SiLU
has one. It uses
the method's own network, never a DDP wrapper: the loop wraps the method, and inside `forward`
`self.model` is the plain module torch.func needs.

Time pairs: (s, t) uniform over the band {0 <= s <= t <= 1, t - s <= gap} of the triangle: the gap
delta = t - s has the triangular density p(delta) ~ (1 - delta) on [0, gap] (inverse CDF
delta = 1 - sqrt(1 - u (1 - (1 - gap)^2))), then s ~ U[0, 1 - delta]. Every time in [0, 1] is
trained from the first step; a sampler that put s in [0, gap - delta] instead would train only
the corner t <= gap until the curriculum ends. The curriculum grows the maximal gap from
initial_gap to 1 over anneal_steps optimizer steps (linear or cosine; "none": the whole triangle
at once), counted by a buffer that checkpoints carry.

Sampling composes N maps along 0 = t_0 < t_1 < ... < t_N = 1: x <- Phi_{t_i, t_{i+1}}(x), N network
calls, with classifier-free guidance applied to v inside each map.

overfit_one_batch trains on the first batch, with the same noise and time pairs every step: a fixed
regression problem whose loss must approach zero (a debugging mode; anything else means a bug).

On latents (engine/methods/generation.py: `data.source = "latents:PATH"` or `fmm.latent = true`)
the maps carry noise to the autoencoder's scaled latents; the grids decode them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import repeat
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.func import jvp, vmap
from tqdm.auto import tqdm

import kernels
from engine.data.base import Batch
from engine.methods.base import LossOutput
from engine.methods.generation import (
    GenerativeMethod,
    check_labels,
    evaluate_samples,
    grid_layout,
    grid_noise,
    guided,
    latent_scaling,
    noise,
    to_pictures,
)
from engine.methods.sections import (
    AutoencoderConfig,
    ModelConfig,
    PrepareConfig,
    TextConfig,
    class_conditional_network,
)
from engine.models.dual_time_unet import DualTimeUNet
from engine.options import option

TIME_SCALE = 1000.0  # s, t in [0, 1] -> the sinusoidal embeddings' range
SAMPLERS = ("compose",)
OVERFIT_SEED = 0  # noise and time pairs of the overfit-one-batch mode


@dataclass
class FlowMapConfig:
    reconstruction_weight: float = option(0.5, "weight of the reconstruction term (lambda of Prop. 3.11)")
    annealing: str = option("linear", "how the maximal gap |t - s| grows to 1", ("linear", "cosine", "none"))
    initial_gap: float = option(0.1, "maximal gap |t - s| at step 0")
    anneal_steps: int = option(30000, "optimizer steps over which the maximal gap grows from initial_gap to 1")
    label_drop_prob: float = option(0.1, "probability a label is replaced by the null class (CFG training)")
    overfit_one_batch: bool = option(False, "debugging: the first batch with fixed noise and times every step; "
                                     "the loss must approach zero")
    sample_steps: int = option(8, "maps composed by the sample grids (network calls)")
    cfg_scale: float = option(1.0, "classifier-free guidance scale of the grids (1 = conditional only)")
    latent: bool = option(False, "train on autoencoder latents of builtin:textures (made by [autoencoder] and "
                          "[prepare]); a 'latents:PATH' data.source always trains on latents")

    def validate(self, check):
        check(self.reconstruction_weight >= 0, "reconstruction_weight", "must be >= 0")
        check(0 < self.initial_gap <= 1, "initial_gap", "must be in (0, 1]")
        check(self.anneal_steps >= 1, "anneal_steps", "must be >= 1")
        check(0 <= self.label_drop_prob <= 1, "label_drop_prob", "must be in [0, 1]")
        check(self.sample_steps >= 1, "sample_steps", "must be >= 1")


def sample_time_pairs(n: int, max_gap: torch.Tensor, generator: torch.Generator | None = None,
                      device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) [n] each, uniform over {0 <= s <= t <= 1, t - s <= max_gap} (see the module doc)."""
    u, w = torch.rand(2, n, generator=generator, device=device)
    area = 1 - (1 - max_gap) ** 2  # the band's share of the triangle, up to a factor 1/2
    delta = 1 - torch.sqrt(1 - u * area)
    s = w * (1 - delta)
    return s, s + delta


class FirstBatchForever:
    """A data source whose every batch is its source's batch 0 (the overfit-one-batch mode)."""

    def __init__(self, source):
        self.source = source
        self.sample_shape, self.class_names = source.sample_shape, source.class_names
        self.heldout = getattr(source, "heldout", None)
        self.scaling_factor = getattr(source, "scaling_factor", None)  # latents: what they are scaled by

    def batches(self, start: int, batch_size: int):
        return repeat(next(iter(self.source.batches(0, batch_size))))


class FlowMapMatching(GenerativeMethod):
    """`model(x [B, C, H, W], s [B], t [B], labels [B] or None) -> v [B, C, H, W]` (a DualTimeUNet,
    times already scaled by TIME_SCALE); num_classes is the NULL label. `latent_scaling`: None on
    pixels; on latents, the factor they were multiplied by (see generation.latent_scaling)."""

    name = "fmm"
    section = "fmm"
    config_sections: ClassVar[dict[str, type]] = {"model": ModelConfig, "fmm": FlowMapConfig,
                                                  "autoencoder": AutoencoderConfig, "prepare": PrepareConfig,
                                                  "text": TextConfig}
    samplers: ClassVar[tuple[str, ...]] = SAMPLERS

    def __init__(self, model: DualTimeUNet, sample_shape: tuple[int, int, int], num_classes: int,
                 fmm: FlowMapConfig, grid_size: int = 16, grad_accum: int = 1, latent_scaling: float | None = None):
        super().__init__()
        self.model = model
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes
        self.settings = fmm
        self.grid_size = grid_size
        self.grad_accum = grad_accum
        # Training micro-batches seen: the curriculum's clock (optimizer step = this // grad_accum).
        self.register_buffer("micro_batches", torch.zeros((), dtype=torch.long))
        self.hold_latent_scaling(latent_scaling)

    @classmethod
    def validate_config(cls, cfg, check) -> None:
        check(not cfg.model.checkpoint, "model.checkpoint",
              "must be false for fmm: torch.func.vmap cannot run through checkpointed U-Net blocks")
        super().validate_config(cfg, check)

    @classmethod
    def graph_capture_problem(cls, cfg) -> str | None:
        if cfg.fmm.overfit_one_batch:
            return "fmm.overfit_one_batch = true (its fixed noise comes from a generator seeded inside the step)"
        return None

    @classmethod
    def training_data(cls, cfg, rank: int, world_size: int, device: torch.device):
        data = super().training_data(cfg, rank, world_size, device)
        return FirstBatchForever(data) if cfg.fmm.overfit_one_batch else data

    @classmethod
    def from_config(cls, cfg, data) -> FlowMapMatching:
        model, num_classes = class_conditional_network(DualTimeUNet, cfg.model, data, cfg.text)
        return cls(model, data.sample_shape, num_classes, cfg.fmm, cfg.sample.num, cfg.train.grad_accum,
                   latent_scaling(data, cls.trains_on_latents(cfg)))

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def device(self) -> torch.device:
        return self.micro_batches.device

    # ------------------------------------------------------------------------------------ the map

    def velocity(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None
                 ) -> torch.Tensor:
        """v(s, t, x): s, t [B] in [0, 1]."""
        return self.model(x, s * TIME_SCALE, t * TIME_SCALE, labels)

    def flow_map(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                 cfg_scale: float = 1.0) -> torch.Tensor:
        """Phi_{s,t}(x) = x + (t - s) v(s, t, x), v guided with `cfg_scale` (1 = plain)."""
        v = guided(lambda x_, st, y: self.velocity(x_, st[:, 0], st[:, 1], y), x, torch.stack([s, t], 1),
                   labels, self.null_label, cfg_scale)
        return x + _rows(t - s, x) * v.to(x.dtype)

    def velocity_and_time_derivative(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                                     labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v(s, t, x), d/dt v(s, t, x)), each [B, C, H, W]: forward-mode AD per row, vmapped, with
        attention written out as plain ops (the fused kernels have no forward-mode rule)."""

        def per_row(x_i, s_i, t_i, label_i):
            def v_of_t(t_value):
                return self.velocity(x_i[None], s_i[None], t_value[None], label_i[None])[0]
            return jvp(v_of_t, (t_i,), (torch.ones_like(t_i),))

        with kernels.unfused_attention():
            return vmap(per_row, randomness="different")(x, s, t, labels)

    # ------------------------------------------------------------------------------------ training

    def max_gap(self) -> torch.Tensor:
        """The curriculum's maximal |t - s| at the current optimizer step (0-d, on the device)."""
        settings = self.settings
        if settings.annealing == "none":
            return torch.ones((), device=self.device)
        steps = torch.div(self.micro_batches, self.grad_accum, rounding_mode="floor")
        progress = (steps.float() / settings.anneal_steps).clamp(max=1.0)
        if settings.annealing == "cosine":
            progress = (1 - torch.cos(math.pi * progress)) / 2
        return settings.initial_gap + (1 - settings.initial_gap) * progress

    def forward(self, batch: Batch) -> LossOutput:
        x1 = batch.x
        n = x1.shape[0]
        max_gap = self.max_gap()
        if self.training:
            self.micro_batches += 1
        generator = None
        if self.settings.overfit_one_batch:
            generator = torch.Generator(x1.device).manual_seed(OVERFIT_SEED)
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device)
        s, t = sample_time_pairs(n, max_gap, generator, x1.device)
        labels = torch.full((n,), self.null_label, device=x1.device)
        if self.num_classes:
            drop = torch.rand(n, generator=generator, device=x1.device) < self.settings.label_drop_prob
            labels = batch.labels.masked_fill(drop, self.null_label)
        loss, terms = self.lagrangian_loss(x0, x1, s, t, labels)
        terms.update(s_mean=s.mean(), t_mean=t.mean(), gap_mean=(t - s).mean(), max_gap=max_gap)
        return LossOutput(loss, {name: value.detach() for name, value in terms.items()})

    def lagrangian_loss(self, x0: torch.Tensor, x1: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                        labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, {"derivative_loss", "reconstruction_loss"}) for noise x0, data x1, times s <= t."""
        interpolant = (1 - _rows(t, x1)) * x0 + _rows(t, x1) * x1
        velocity_target = (x1 - x0).float()
        back = self.flow_map(interpolant, t, s, labels)  # Phi_{t,s}(I_t), under the loop's autocast
        with torch.autocast(x1.device.type, enabled=False):
            v, dv_dt = self.velocity_and_time_derivative(back.detach().float(), s.float(), t.float(), labels)
            d_phi_dt = v + _rows(t - s, v) * dv_dt
            derivative = F.mse_loss(d_phi_dt, velocity_target)
        forth = self.flow_map(back, s, t, labels)  # Phi_{s,t}(Phi_{t,s}(I_t))
        reconstruction = F.mse_loss(forth.float(), interpolant.float())
        loss = derivative + self.settings.reconstruction_weight * reconstruction
        return loss, {"derivative_loss": derivative, "reconstruction_loss": reconstruction}

    # ------------------------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None,
               sampler: str = "compose", steps: int = 8, cfg_scale: float = 1.0, progress: bool = False
               ) -> torch.Tensor:
        """n samples [n, C, H, W]: noise carried to t = 1 by `steps` composed maps (latents when the
        method trains on latents: generation.to_pictures decodes them)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")
        x = noise((n, *self.sample_shape), generator, self.device)
        return self.run_sampler(x, labels, steps, cfg_scale, progress)

    @torch.no_grad()
    def run_sampler(self, x: torch.Tensor, labels: torch.Tensor | None = None, steps: int = 8,
                    cfg_scale: float = 1.0, progress: bool = False) -> torch.Tensor:
        """Carry noise x [n, C, H, W] at t = 0 to samples at t = 1 by `steps` composed maps."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        n = x.shape[0]
        labels = check_labels(labels, n, self.num_classes, self.device)
        times = torch.linspace(0, 1, steps + 1, device=self.device)
        was_training = self.training
        self.eval()
        try:
            for i in tqdm(range(steps), desc="compose", disable=not progress):
                x = self.flow_map(x, times[i].expand(n), times[i + 1].expand(n), labels, cfg_scale)
        finally:
            self.train(was_training)
        return x

    @torch.no_grad()
    def sample_grid(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """sample.num pictures from noise (generation.grid_noise) with the grid settings of [fmm],
        decoded when on latents; `batch` is not needed."""
        labels, nrow = grid_layout(self.grid_size, self.num_classes)
        x = grid_noise(labels, (self.grid_size, *self.sample_shape), generator, self.device)
        samples = self.run_sampler(x, labels, self.settings.sample_steps, self.settings.cfg_scale)
        return to_pictures(self, samples, self.latent), nrow

    @torch.no_grad()
    def evaluate(self, data, per_class: int) -> dict[str, float]:
        """Sample quality (engine.methods.generation) with the grids' steps and guidance; on
        latents, of the latents."""
        def draw(n, generator, labels):
            return self.sample(n, generator, labels, steps=self.settings.sample_steps,
                               cfg_scale=self.settings.cfg_scale)
        return evaluate_samples(draw, data, per_class, self.num_classes, self.device, clamp=not self.latent)


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row scalars [B] shaped to broadcast against `like` [B, ...]."""
    return values.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)
