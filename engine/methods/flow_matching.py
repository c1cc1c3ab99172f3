"""Flow matching (Lipman et al. 2023) on the conditional optimal-transport (CondOT) path.

Time runs from noise (t = 0) to data (t = 1). With x_0 ~ N(0, I) and x_1 a data sample,

    x_t = (1 - (1 - sigma_min) t) x_0 + t x_1,      target velocity u = x_1 - (1 - sigma_min) x_0,

the straight line x_t = (1 - t) x_0 + t x_1 with u = x_1 - x_0 when sigma_min = 0 (the default);
sigma_min > 0 ends the path at N(x_1, sigma_min^2) instead of a point. t is drawn uniformly on
[0, 1] or logit-normal (logit(t) ~ N(mean, std): more weight mid-path). The network sees the
interpolant x_t (never x_1) and the continuous time t * TIME_SCALE (never rounded to an integer
step: a quantised time would make the field piecewise constant in t); the loss is the MSE between
v(x_t, t) and u. Labels are dropped to the NULL class with probability label_drop_prob, so the
model is also unconditional, for classifier-free guidance v = v(null) + s (v(label) - v(null)).

Sampling integrates dx/dt = v from t = 0 to 1: euler, midpoint or heun with `steps` equal steps
(1, 2, 2 network calls per step), or dopri5, the adaptive Dormand-Prince 5(4) pair: the first
step is 1/steps, then each step is resized so the local error estimate stays within rtol/atol
(one step size for the whole batch; rejected steps are retried smaller).

On latents (engine/methods/generation.py: `data.source = "latents:PATH"` or `fm.latent = true`)
the same path runs between noise and the autoencoder's scaled latents; the grids decode them.
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
    evaluate_samples,
    grid_layout,
    grid_noise,
    guided,
    latent_scaling,
    noise,
    to_pictures,
)
from engine.methods.ode import SOLVERS, Tableau, rk_step
from engine.methods.sections import (
    AutoencoderConfig,
    ModelConfig,
    PrepareConfig,
    TextConfig,
    class_conditional_network,
)
from engine.models.unet import UNet
from engine.options import option

TIME_SCALE = 1000.0  # t in [0, 1] -> the sinusoidal embedding's range (resolves ~1e-3 steps)
SAMPLERS = ("euler", "midpoint", "heun", "dopri5")
FIXED_STEP = {"euler": SOLVERS["euler"], "heun": SOLVERS["heun"],
              "midpoint": Tableau((0.0, 0.5), ((), (0.5,)), (0.0, 1.0), order=2)}

# Dormand-Prince 5(4): nodes, stage coefficients, 5th-order weights (the solution) and 4th-order
# weights (the error estimate is their difference). The last stage is the next step's first (FSAL).
DOPRI_NODES = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DOPRI_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
           (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
           (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
           (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
DOPRI_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
DOPRI_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
DOPRI_MAX_STEPS = 10_000


@dataclass
class FlowMatchingConfig:
    sigma_min: float = option(0.0, "CondOT path width at t = 1 (0 = the straight line x_t = (1 - t) x_0 + t x_1)")
    time_sampling: str = option("uniform", "distribution of training times t in [0, 1]",
                                ("uniform", "logit_normal"))
    logit_mean: float = option(0.0, "logit-normal times: mean of logit(t)")
    logit_std: float = option(1.0, "logit-normal times: standard deviation of logit(t)")
    label_drop_prob: float = option(0.1, "probability a label is replaced by the null class (CFG training)")
    sampler: str = option("heun", "ODE solver of the sample grids", SAMPLERS)
    sample_steps: int = option(50, "solver steps of the grids (dopri5: the first step is 1/this, then adaptive)")
    rtol: float = option(1e-3, "dopri5: relative tolerance of the local error")
    atol: float = option(1e-3, "dopri5: absolute tolerance of the local error")
    cfg_scale: float = option(1.0, "classifier-free guidance scale of the grids (1 = conditional only)")
    latent: bool = option(False, "train on autoencoder latents of builtin:textures (made by [autoencoder] and "
                          "[prepare]); a 'latents:PATH' data.source always trains on latents")

    def validate(self, check):
        check(0 <= self.sigma_min < 1, "sigma_min", "must be in [0, 1)")
        check(self.logit_std > 0, "logit_std", "must be > 0")
        check(0 <= self.label_drop_prob <= 1, "label_drop_prob", "must be in [0, 1]")
        check(self.sample_steps >= 1, "sample_steps", "must be >= 1")
        check(self.rtol > 0, "rtol", "must be > 0")
        check(self.atol > 0, "atol", "must be > 0")


def solve_flow(field, x: torch.Tensor, sampler: str, steps: int, rtol: float = 1e-3, atol: float = 1e-3,
               progress: bool = False) -> tuple[torch.Tensor, int]:
    """(x at t = 1, network evaluations) for dx/dt = field(x, t [B]) from x at t = 0 (see the module doc)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if sampler == "dopri5":
        return dopri5(field, x, 1.0 / steps, rtol, atol, progress)
    tableau = FIXED_STEP[sampler]
    h = 1.0 / steps
    for n in tqdm(range(steps), desc=sampler, disable=not progress):
        t = torch.full((x.shape[0],), n * h, device=x.device)
        (x,) = rk_step(lambda x_, t_: (field(x_, t_), ()), x, t, h, tableau)
    return x, steps * len(tableau.nodes)


def dopri5(field, x: torch.Tensor, first_step: float, rtol: float, atol: float, progress: bool = False
           ) -> tuple[torch.Tensor, int]:
    """Adaptive Dormand-Prince 5(4) from t = 0 to 1: (x(1), network evaluations)."""

    def at(t: float) -> torch.Tensor:
        return torch.full((x.shape[0],), t, device=x.device)

    t, h = 0.0, first_step
    k_first = field(x, at(t))
    evaluations = 1
    bar = tqdm(total=1.0, desc="dopri5", disable=not progress, bar_format="{l_bar}{bar}| t={n:.3f}")
    while t < 1.0:
        if evaluations > 6 * DOPRI_MAX_STEPS:
            raise RuntimeError(f"dopri5 needed more than {DOPRI_MAX_STEPS} steps; raise rtol/atol")
        h = min(h, 1.0 - t)
        stages = [k_first]
        for c, a_row in zip(DOPRI_NODES[1:], DOPRI_A[1:]):
            x_stage = x + h * sum(a * k for a, k in zip(a_row, stages) if a)
            stages.append(field(x_stage, at(t + c * h)))
        evaluations += 6
        x_next = x + h * sum(b * k for b, k in zip(DOPRI_B5, stages) if b)
        error = h * sum((b5 - b4) * k for b5, b4, k in zip(DOPRI_B5, DOPRI_B4, stages))
        tolerance = atol + rtol * torch.maximum(x.abs(), x_next.abs())
        error_norm = (error / tolerance).square().mean().sqrt().item()  # one host sync per step
        if error_norm <= 1.0:
            bar.update(min(h, 1.0 - t))
            t, x, k_first = t + h, x_next, stages[-1]
        # The classic controller: the error scales as h^5, aim at 0.9 of the tolerance.
        h *= min(10.0, max(0.2, 0.9 * max(error_norm, 1e-10) ** -0.2))
    bar.close()
    return x, evaluations


class FlowMatching(GenerativeMethod):
    """`model(x_t [B, C, H, W], t [B] float, labels [B] or None) -> velocity [B, C, H, W]` (a UNet);
    labels index classes 0..num_classes-1 and num_classes is the NULL class. `latent_scaling`: None
    on pixels; on latents, the factor they were multiplied by (see generation.latent_scaling)."""

    name = "fm"
    section = "fm"
    config_sections: ClassVar[dict[str, type]] = {"model": ModelConfig, "fm": FlowMatchingConfig,
                                                  "autoencoder": AutoencoderConfig, "prepare": PrepareConfig,
                                                  "text": TextConfig}
    samplers: ClassVar[tuple[str, ...]] = SAMPLERS

    def __init__(self, model: nn.Module, sample_shape: tuple[int, int, int], num_classes: int,
                 fm: FlowMatchingConfig, grid_size: int = 16, latent_scaling: float | None = None):
        super().__init__()
        self.model = model
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes
        self.settings = fm  # path, time sampling and the grids' sampler
        self.grid_size = grid_size
        self.hold_latent_scaling(latent_scaling)

    @classmethod
    def from_config(cls, cfg, data) -> FlowMatching:
        model, num_classes = class_conditional_network(UNet, cfg.model, data, cfg.text)
        return cls(model, data.sample_shape, num_classes, cfg.fm, cfg.sample.num,
                   latent_scaling(data, cls.trains_on_latents(cfg)))

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------------ training

    def interpolant(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, target velocity u) of the CondOT path for noise x0, data x1 and times t [B]."""
        shrink = 1.0 - self.settings.sigma_min
        t = t.view(-1, *([1] * (x1.dim() - 1)))
        return (1 - shrink * t) * x0 + t * x1, x1 - shrink * x0

    def sample_times(self, n: int, device: torch.device) -> torch.Tensor:
        """Training times [n] in [0, 1] (global RNG)."""
        if self.settings.time_sampling == "logit_normal":
            return torch.sigmoid(self.settings.logit_mean + self.settings.logit_std * torch.randn(n, device=device))
        return torch.rand(n, device=device)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """v(x, t, label): t [B] in [0, 1], continuous."""
        return self.model(x, t * TIME_SCALE, labels)

    def forward(self, batch: Batch) -> LossOutput:
        x1 = batch.x
        x0 = torch.randn_like(x1)
        t = self.sample_times(x1.shape[0], x1.device)
        labels = None
        if self.num_classes:
            drop = torch.rand(x1.shape[0], device=x1.device) < self.settings.label_drop_prob
            labels = batch.labels.masked_fill(drop, self.null_label)
        x_t, target = self.interpolant(x0, x1, t)
        v = self.velocity(x_t, t, labels).float()
        loss = F.mse_loss(v, target.float())
        return LossOutput(loss, {"loss_mse": loss.detach(), "t_mean": t.mean().detach()})

    # ------------------------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None,
               sampler: str = "heun", steps: int = 50, cfg_scale: float = 1.0, progress: bool = False
               ) -> torch.Tensor:
        """n samples [n, C, H, W] from noise (latents when the method trains on latents:
        generation.to_pictures decodes them); every random draw comes from `generator`."""
        x0 = noise((n, *self.sample_shape), generator, self.device)
        return self.run_sampler(x0, labels, sampler, steps, cfg_scale, progress)

    @torch.no_grad()
    def run_sampler(self, x0: torch.Tensor, labels: torch.Tensor | None = None, sampler: str = "heun",
                    steps: int = 50, cfg_scale: float = 1.0, progress: bool = False) -> torch.Tensor:
        """Carry noise x0 [n, C, H, W] at t = 0 to samples at t = 1 with `sampler`."""
        labels = check_labels(labels, x0.shape[0], self.num_classes, self.device)
        was_training = self.training
        self.eval()  # the EMA copy the loop samples from is in train mode: no dropout while sampling
        try:
            x1, _ = solve_flow(lambda x, t: guided(self.velocity, x, t, labels, self.null_label, cfg_scale).float(),
                               x0.float(), sampler, steps, self.settings.rtol, self.settings.atol, progress)
        finally:
            self.train(was_training)
        return x1

    @torch.no_grad()
    def sample_grid(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """sample.num pictures from noise (generation.grid_noise) with the grid settings of [fm],
        decoded when on latents; `batch` is not needed."""
        labels, nrow = grid_layout(self.grid_size, self.num_classes)
        x0 = grid_noise(labels, (self.grid_size, *self.sample_shape), generator, self.device)
        samples = self.run_sampler(x0, labels, self.settings.sampler, self.settings.sample_steps,
                                   self.settings.cfg_scale)
        return to_pictures(self, samples, self.latent), nrow

    @torch.no_grad()
    def evaluate(self, data, per_class: int) -> dict[str, float]:
        """Sample quality (engine.methods.generation) with the grids' sampler, steps and guidance;
        on latents, of the latents."""
        def draw(n, generator, labels):
            return self.sample(n, generator, labels, self.settings.sampler, self.settings.sample_steps,
                               self.settings.cfg_scale)
        return evaluate_samples(draw, data, per_class, self.num_classes, self.device, clamp=not self.latent)
