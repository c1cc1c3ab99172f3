"""DDPM (Ho et al. 2020) training with DDPM ancestral and DDIM (Song et al. 2020) sampling.

Training: t ~ U{0..T-1}, eps ~ N(0, I), x_t = q_sample(x0, t, eps); the network sees (x_t, t, label)
and regresses eps, x0 or v = a * eps - s * x0 (a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t))
with MSE or L1. Labels are dropped to the NULL class with probability `label_drop_prob`, which
trains the unconditional model classifier-free guidance needs:
    guided = out(x_t, t, NULL) + cfg_scale * (out(x_t, t, label) - out(x_t, t, NULL)).

Sampling: every model output is turned into (x0_hat, eps_hat), x0_hat optionally clamped to
[-1, 1] (eps_hat re-derived from the clamped x0_hat, as ADM does): by default on pixels only, never
on latents, whose range is not [-1, 1] (clamping them would flatten the samples' extremes). DDPM steps through all T
timesteps with the posterior q(x_{t-1} | x_t, x0_hat); its last step is the posterior mean with no
noise. DDIM steps through `steps` evenly spread timesteps with
    x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)),
and its last step uses ab_prev = 1, so it returns x0_hat. Hand-written DDPMs often get three things
wrong, pinned by tests/test_ddpm.py: .sqrt() of buffers that already hold square roots, the
network fed x0 instead of x_t, and noise added on the last step.

On latents (engine/methods/generation.py: `data.source = "latents:PATH"` or `ddpm.latent = true`)
the same maths runs on the autoencoder's scaled latents, and the grids decode them to pictures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from engine.data.base import Batch
from engine.methods.base import LossOutput
from engine.methods.generation import (
    GenerativeMethod,
    check_labels,
    grid_layout,
    grid_noise,
    latent_scaling,
    noise,
    to_pictures,
)
from engine.methods.schedules import (
    NoiseSchedule,
    eps_from_v,
    extract,
    make_betas,
    predict_eps_from_x0,
    predict_x0_from_eps,
    v_from_eps_x0,
    x0_from_v,
)
from engine.methods.sections import (
    AutoencoderConfig,
    ModelConfig,
    PrepareConfig,
    TextConfig,
    class_conditional_network,
)
from engine.models.unet import UNet
from engine.options import option

PREDICTIONS = ("eps", "v", "x0")
LOSSES = ("mse", "l1")
SAMPLERS = ("ddpm", "ddim")


@dataclass
class DDPMConfig:
    timesteps: int = option(1000, "diffusion steps T")
    schedule: str = option("cosine", "beta schedule", ("linear", "cosine"))
    beta_start: float = option(1e-4, "first beta of the linear schedule")
    beta_end: float = option(0.02, "last beta of the linear schedule")
    prediction: str = option("eps", "what the network predicts", PREDICTIONS)
    loss: str = option("mse", "regression loss on the prediction", LOSSES)
    label_drop_prob: float = option(0.1, "probability a label is replaced by the null class (CFG training)")
    clip_denoised: bool | str = option("auto", "clamp the predicted x0 to [-1, 1] while sampling (auto = on "
                                       "pixels, never on latents: their range is not [-1, 1])",
                                       ("auto", True, False))
    sampler: str = option("ddim", "sampler of the training sample grids", SAMPLERS)
    sample_steps: int = option(50, "sampler steps of the grids (DDIM); DDPM always uses every timestep")
    eta: float = option(0.0, "DDIM eta of the grids: 0 = deterministic, 1 = DDPM's variance")
    cfg_scale: float = option(1.0, "classifier-free guidance scale of the grids (1 = conditional only)")
    latent: bool = option(False, "train on autoencoder latents of builtin:textures (made by [autoencoder] and "
                          "[prepare]); a 'latents:PATH' data.source always trains on latents")

    def validate(self, check):
        check(self.timesteps >= 2, "timesteps", "must be >= 2")
        check(0 < self.beta_start < self.beta_end < 1, "beta_start", "need 0 < beta_start < beta_end < 1")
        check(0 <= self.label_drop_prob <= 1, "label_drop_prob", "must be in [0, 1]")
        check(self.sample_steps > 0, "sample_steps", "must be > 0")
        check(self.eta >= 0, "eta", "must be >= 0")


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps spread evenly from T-1 down to 0 (every timestep if steps >= T)."""
    steps = min(steps, num_timesteps)
    if steps == 1:
        return [num_timesteps - 1]
    return [round((num_timesteps - 1) * (steps - 1 - i) / (steps - 1)) for i in range(steps)]


class DDPM(GenerativeMethod):
    """`model(x_t [B, C, H, W], t [B] float, labels [B] long or None) -> [B, C, H, W]` is the
    network (a UNet); labels index classes 0..num_classes-1 and num_classes is the NULL class.
    `latent_scaling`: None on pixels; on latents, the factor they were multiplied by (see
    generation.latent_scaling)."""

    name = "ddpm"
    section = "ddpm"
    config_sections: ClassVar[dict[str, type]] = {"model": ModelConfig, "ddpm": DDPMConfig,
                                                  "autoencoder": AutoencoderConfig, "prepare": PrepareConfig,
                                                  "text": TextConfig}

    def __init__(self, model: nn.Module, sample_shape: tuple[int, int, int], num_classes: int,
                 ddpm: DDPMConfig, grid_size: int = 16, latent_scaling: float | None = None):
        super().__init__()
        if ddpm.prediction not in PREDICTIONS:
            raise ValueError(f"ddpm.prediction={ddpm.prediction!r} is not one of {PREDICTIONS}")
        if ddpm.loss not in LOSSES:
            raise ValueError(f"ddpm.loss={ddpm.loss!r} is not one of {LOSSES}")
        self.model = model
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes
        self.prediction = ddpm.prediction
        self.loss_kind = ddpm.loss
        self.label_drop_prob = ddpm.label_drop_prob
        self.hold_latent_scaling(latent_scaling)
        self.clip_denoised = not self.latent if ddpm.clip_denoised == "auto" else ddpm.clip_denoised
        self.grid_settings = ddpm  # sampler, sample_steps, eta, cfg_scale of the sample grids
        self.grid_size = grid_size
        self.schedule = NoiseSchedule(make_betas(ddpm.schedule, ddpm.timesteps, ddpm.beta_start, ddpm.beta_end))

    @classmethod
    def from_config(cls, cfg, data) -> DDPM:
        model, num_classes = class_conditional_network(UNet, cfg.model, data, cfg.text)
        return cls(model, data.sample_shape, num_classes, cfg.ddpm, cfg.sample.num,
                   latent_scaling(data, cls.trains_on_latents(cfg)))

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def num_timesteps(self) -> int:
        return self.schedule.timesteps

    # ------------------------------------------------------------------------------------ training

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Each label becomes the NULL class with probability label_drop_prob (global RNG)."""
        drop = torch.rand(labels.shape, device=labels.device) < self.label_drop_prob
        return labels.masked_fill(drop, self.null_label)

    def forward(self, batch: Batch) -> LossOutput:
        x0 = batch.x
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        labels = None if self.num_classes == 0 else self.drop_labels(batch.labels)
        return self.training_loss(x0, t, noise, labels)

    def training_loss(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                      labels: torch.Tensor | None) -> LossOutput:
        """The loss for given clean data x0 [B, C, H, W], timesteps t [B] long and noise like x0."""
        x_t = self.schedule.q_sample(x0, t, noise)
        # The network sees the noisy x_t (never x0) and the integer timestep as a float.
        output = self.model(x_t, t.float(), labels).float()
        target = self.prediction_target(x0.float(), t, noise.float())
        if output.shape != target.shape:
            raise ValueError(f"the network returned shape {tuple(output.shape)} for inputs of shape "
                             f"{tuple(target.shape)}; its out_channels must equal the data's channels")
        loss = F.mse_loss(output, target) if self.loss_kind == "mse" else F.l1_loss(output, target)
        return LossOutput(loss, {f"loss_{self.loss_kind}": loss.detach()})

    def prediction_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        a = extract(self.schedule.sqrt_alphas_cumprod, t, x0.dim())
        s = extract(self.schedule.sqrt_one_minus_alphas_cumprod, t, x0.dim())
        return v_from_eps_x0(noise, x0, a, s)

    # ------------------------------------------------------------------------------------ sampling

    def guided_output(self, x_t: torch.Tensor, t: int, labels: torch.Tensor | None,
                      cfg_scale: float = 1.0) -> torch.Tensor:
        """The network output at timestep t with classifier-free guidance applied to it."""
        n = x_t.shape[0]
        t_batch = torch.full((n,), float(t), device=x_t.device)
        if labels is None or cfg_scale == 1.0:
            return self.model(x_t, t_batch, labels).float()
        if cfg_scale == 0.0:
            return self.model(x_t, t_batch, None).float()
        # One network call on [cond; uncond]: twice the batch, half the launches.
        null = torch.full_like(labels, self.null_label)
        both = self.model(torch.cat([x_t, x_t]), torch.cat([t_batch, t_batch]), torch.cat([labels, null]))
        cond, uncond = both.float().chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    def denoise(self, x_t: torch.Tensor, t: int, labels: torch.Tensor | None = None,
                cfg_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from the guided network output at timestep t."""
        output = self.guided_output(x_t, t, labels, cfg_scale)
        a = self.schedule.sqrt_alphas_cumprod[t]
        s = self.schedule.sqrt_one_minus_alphas_cumprod[t]
        if self.prediction == "eps":
            eps, x0 = output, predict_x0_from_eps(x_t, output, a, s)
        elif self.prediction == "v":
            eps, x0 = eps_from_v(x_t, output, a, s), x0_from_v(x_t, output, a, s)
        else:
            eps, x0 = predict_eps_from_x0(x_t, output, a, s), output
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
            eps = predict_eps_from_x0(x_t, x0, a, s)
        return x0, eps

    def ddpm_step(self, x_t: torch.Tensor, t: int, generator: torch.Generator,
                  labels: torch.Tensor | None = None, cfg_scale: float = 1.0) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} ~ q(x_{t-1} | x_t, x0_hat)."""
        x0, _ = self.denoise(x_t, t, labels, cfg_scale)
        mean = self.schedule.posterior_mean(x0, x_t, torch.full((x_t.shape[0],), t, device=x_t.device))
        if t == 0:
            return mean  # Algorithm 2's z = 0: the last step adds no noise
        std = (0.5 * self.schedule.posterior_log_variance_clipped[t]).exp()
        return mean + std * noise(x_t.shape, generator, x_t.device)

    def ddim_sigma(self, t: int, t_prev: int, eta: float) -> torch.Tensor:
        """DDIM's noise scale from t to t_prev (t_prev = -1: the final step to x0), 0-d float32.

        Trap: 1 - ab_t / ab_prev is ~beta_t ~ 1e-4 between neighbouring timesteps, and computing
        it from float32 alpha_bars loses three digits to cancellation. It is computed from the
        betas instead: 1 - prod(1 - beta_k) = -expm1(sum log1p(-beta_k)) over k in (t_prev, t].
        """
        sched = self.schedule
        one_minus_ab = sched.sqrt_one_minus_alphas_cumprod[t].double() ** 2
        one_minus_ab_prev = sched.sqrt_one_minus_alphas_cumprod[t_prev].double() ** 2 if t_prev >= 0 else 0.0
        one_minus_ratio = -torch.expm1(torch.log1p(-sched.betas[t_prev + 1:t + 1].double()).sum())
        return (eta * (one_minus_ab_prev / one_minus_ab * one_minus_ratio).sqrt()).float()

    def ddim_step(self, x_t: torch.Tensor, t: int, t_prev: int, generator: torch.Generator,
                  labels: torch.Tensor | None = None, eta: float = 0.0, cfg_scale: float = 1.0) -> torch.Tensor:
        """One DDIM step x_t -> x_{t_prev}; t_prev = -1 means alpha_bar_prev = 1 (returns x0_hat)."""
        x0, eps = self.denoise(x_t, t, labels, cfg_scale)
        if t_prev < 0:
            return x0
        sigma = self.ddim_sigma(t, t_prev, eta)
        one_minus_ab_prev = self.schedule.sqrt_one_minus_alphas_cumprod[t_prev] ** 2
        direction = (one_minus_ab_prev - sigma**2).clamp(min=0).sqrt()  # eta > 1 could go negative
        x_prev = self.schedule.sqrt_alphas_cumprod[t_prev] * x0 + direction * eps
        if eta > 0:
            x_prev = x_prev + sigma * noise(x_t.shape, generator, x_t.device)
        return x_prev

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None,
               sampler: str = "ddim", steps: int = 50, eta: float = 0.0, cfg_scale: float = 1.0,
               progress: bool = False) -> torch.Tensor:
        """n samples [n, C, H, W] from pure noise (latents when the method trains on latents:
        generation.to_pictures decodes them). Every random draw (the initial noise included) comes
        from `generator`, so a generator seeded the same way gives the same samples."""
        device = self.schedule.betas.device
        x_T = noise((n, *self.sample_shape), generator, device)
        return self.run_sampler(x_T, generator, labels, sampler, steps, eta, cfg_scale, progress)

    @torch.no_grad()
    def run_sampler(self, x_T: torch.Tensor, generator: torch.Generator, labels: torch.Tensor | None = None,
                    sampler: str = "ddim", steps: int = 50, eta: float = 0.0, cfg_scale: float = 1.0,
                    progress: bool = False) -> torch.Tensor:
        """Denoise x_T [n, C, H, W] (noise at timestep T-1) down to x_0 with `sampler`."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")
        labels = check_labels(labels, x_T.shape[0], self.num_classes, x_T.device)
        if sampler == "ddpm":
            transitions = [(t, t - 1) for t in reversed(range(self.num_timesteps))]
        else:
            timesteps = ddim_timesteps(self.num_timesteps, steps)
            transitions = list(zip(timesteps, timesteps[1:] + [-1]))
        was_training = self.training
        self.eval()  # the EMA copy the loop samples from is in train mode: no dropout while sampling
        try:
            x = x_T
            for t, t_prev in tqdm(transitions, desc=sampler, disable=not progress):
                if sampler == "ddpm":
                    x = self.ddpm_step(x, t, generator, labels, cfg_scale)
                else:
                    x = self.ddim_step(x, t, t_prev, generator, labels, eta, cfg_scale)
        finally:
            self.train(was_training)
        return x

    @torch.no_grad()
    def sample_grid(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """sample.num pictures from noise (generation.grid_noise) with the grid settings of [ddpm],
        decoded when on latents; `batch` is not needed."""
        grid = self.grid_settings
        labels, nrow = grid_layout(self.grid_size, self.num_classes)
        x_T = grid_noise(labels, (self.grid_size, *self.sample_shape), generator, self.schedule.betas.device)
        samples = self.run_sampler(x_T, generator, labels=labels, sampler=grid.sampler, steps=grid.sample_steps,
                                   eta=grid.eta, cfg_scale=grid.cfg_scale)
        return to_pictures(self, samples, self.latent), nrow
