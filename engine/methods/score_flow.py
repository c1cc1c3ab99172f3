"""Score flow: an energy-based score model on latents of the linear autoencoder (784 -> 128).

Data: builtin:digits (1x28x28 = 784 values) encoded once, when training starts, by a linear
autoencoder that the method owns. It is fitted in closed form: the best linear autoencoder under
squared error spans the leading principal components (Eckart-Young), so the encoder is the
projection on the top `latent_dim` components of the training digits, each divided by its standard
deviation (whitened: unit variance per latent, what the preconditioning below assumes), and the
decoder maps back. Components without variance (digits upsampled from 8x8 have at most 64) get a
zero row: their latents are exactly 0. Fitting takes milliseconds and is deterministic, so no
preparation stage or cache is needed, and the autoencoder's weights travel in the method's
checkpoints (frozen: never optimised, unchanged by the EMA), so samples decode with no other file.

Model (engine/models/score_flow.py): a flow network gives a scalar energy E(x, sigma, c); the
score is -grad_x E through autograd with create_graph=True, so the loss reaches the flow's
parameters through the gradient; a projector refines it from [score, sigma embedding, condition
embedding]. Training (EDM's noise distribution and weighting, sigma_data = 1):

    ln sigma ~ N(sigma_log_mean, sigma_log_std^2),  x_t = x + sigma * eps,
    x_pred = x_t + sigma^2 * score(x_t, sigma, c),  loss = mean((sigma^2 + 1) / sigma^2 * (x_pred - x)^2),

in fp32 whatever the loop's autocast (the score is a difference quotient's limit: bf16 loses it).
Labels are dropped to the NULL class with probability label_drop_prob, for classifier-free guidance
of the score, score(null) + s (score(c) - score(null)).

Sampling integrates the probability-flow ODE dx/dsigma = -sigma * score(x, sigma) = (x - x_pred) / sigma
from sigma_max down to 0 over EDM's schedule sigma_i = (sigma_max^(1/rho) + i / (N - 1)
(sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then sigma_N = 0: euler (N network calls) or heun
(2N - 1: the last step, to sigma = 0, is an Euler step), starting from sigma_max * N(0, I).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from engine.data import build_data_source
from engine.data.base import Batch, Stream, batch_seed
from engine.data.digits import DIGITS_SHAPE, BuiltinDigits
from engine.methods.base import LossOutput, Method
from engine.methods.generation import check_labels, evaluate_samples, grid_layout, grid_noise, guided, noise
from engine.models.autoencoder import INITIAL_LOGVAR, LinearAutoencoder
from engine.models.score_flow import ScoreFlowNetwork
from engine.options import option

SAMPLERS = ("euler", "heun")
VARIANCE_FLOOR = 1e-6  # components with less than this share of the first's standard deviation are dropped


@dataclass
class ScoreFlowConfig:
    latent_dim: int = option(128, "latent size of the linear autoencoder (784 -> latent_dim)")
    hidden: int = option(512, "width of the flow network's hidden layers")
    depth: int = option(3, "hidden layers of the flow network")
    sigma_embed_dim: int = option(128, "width of the noise-level embedding")
    cond_embed_dim: int = option(128, "width of the class embedding (none without classes)")
    projector_hidden: int = option(256, "width of the score projector's hidden layer")
    sigma_log_mean: float = option(-1.2, "training noise levels: mean of ln sigma")
    sigma_log_std: float = option(1.2, "training noise levels: standard deviation of ln sigma")
    label_drop_prob: float = option(0.1, "probability a label is replaced by the null class (CFG training)")
    sampler: str = option("heun", "probability-flow ODE solver of the sample grids", SAMPLERS)
    sample_steps: int = option(32, "noise levels of the sampling schedule")
    sigma_min: float = option(0.002, "smallest noise level of the sampling schedule (then 0)")
    sigma_max: float = option(80.0, "largest noise level: sampling starts from sigma_max * N(0, I)")
    rho: float = option(7.0, "curvature of the sampling schedule (EDM)")
    cfg_scale: float = option(1.0, "classifier-free guidance scale of the grids (1 = conditional only)")

    def validate(self, check):
        check(self.latent_dim >= 1, "latent_dim", "must be >= 1")
        check(self.hidden >= 1, "hidden", "must be >= 1")
        check(self.depth >= 1, "depth", "must be >= 1")
        check(self.sigma_embed_dim >= 2, "sigma_embed_dim", "must be >= 2")
        check(self.cond_embed_dim >= 1, "cond_embed_dim", "must be >= 1")
        check(self.projector_hidden >= 1, "projector_hidden", "must be >= 1")
        check(self.sigma_log_std > 0, "sigma_log_std", "must be > 0")
        check(0 <= self.label_drop_prob <= 1, "label_drop_prob", "must be in [0, 1]")
        check(self.sample_steps >= 2, "sample_steps", "must be >= 2")
        check(0 < self.sigma_min < self.sigma_max, "sigma_min", "need 0 < sigma_min < sigma_max")
        check(self.rho > 0, "rho", "must be > 0")


# --------------------------------------------------------------------------- the autoencoder and data


def fit_linear_autoencoder(images: torch.Tensor, latent_dim: int) -> LinearAutoencoder:
    """The whitened-PCA linear autoencoder of `images` [N, C, H, W] (see the module doc), frozen."""
    autoencoder = LinearAutoencoder(tuple(images.shape[1:]), latent_dim)
    data = images.flatten(1).double().cpu()
    mean = data.mean(dim=0)
    _, singular, components = torch.linalg.svd(data - mean, full_matrices=False)
    std = singular / max(1, data.shape[0] - 1) ** 0.5
    kept = min(latent_dim, int((std > VARIANCE_FLOOR * std[0]).sum()))
    encoder = torch.zeros(latent_dim, data.shape[1], dtype=torch.float64)
    decoder = torch.zeros(data.shape[1], latent_dim, dtype=torch.float64)
    encoder[:kept] = components[:kept] / std[:kept, None]
    decoder[:, :kept] = components[:kept].T * std[:kept]
    with torch.no_grad():
        autoencoder.encoder.weight.zero_()
        autoencoder.encoder.weight[:latent_dim] = encoder
        autoencoder.encoder.bias.fill_(INITIAL_LOGVAR)
        autoencoder.encoder.bias[:latent_dim] = -(encoder @ mean)
        autoencoder.decoder.weight.copy_(decoder)
        autoencoder.decoder.bias.copy_(mean)
    return autoencoder.requires_grad_(False)


class EncodedDigits:
    """The training digits as latents [N, latent_dim, 1, 1] on the device, drawn i.i.d. per batch
    from batch_seed(seed, rank, batch number); `.heldout` holds the held-out *pictures* (the quality
    check compares decoded samples with them) and `.autoencoder` the fitted autoencoder."""

    def __init__(self, digits: BuiltinDigits, latent_dim: int, device: torch.device):
        self.autoencoder = fit_linear_autoencoder(digits.images, latent_dim)
        self.latents = self.autoencoder.encode(digits.images).mode().to(device)
        self.labels = digits.labels.to(device)
        self.class_names = digits.class_names
        self.sample_shape = tuple(self.latents.shape[1:])
        self.heldout = digits.heldout
        self.seed, self.rank, self.device = digits.seed, digits.rank, device

    def batches(self, start: int, batch_size: int):
        for number in itertools.count(start):
            generator = torch.Generator(self.device).manual_seed(
                batch_seed(self.seed, self.rank, number, Stream.BATCHES))
            rows = torch.randint(self.latents.shape[0], (batch_size,), generator=generator, device=self.device)
            yield Batch(self.latents[rows], self.labels[rows])


# --------------------------------------------------------------------------- the method


def sigma_schedule(steps: int, sigma_min: float, sigma_max: float, rho: float, device: torch.device
                   ) -> torch.Tensor:
    """EDM's noise levels [steps + 1]: sigma_max down to sigma_min, then 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float().to(device)


class ScoreFlow(Method):
    """`network(x [B, D], sigma [B], labels [B] or None) -> refined score [B, D]` (ScoreFlowNetwork)
    on latents [B, D, 1, 1] of `autoencoder`; num_classes is the NULL label."""

    name = "score_flow"
    config_sections: ClassVar[dict[str, type]] = {"score_flow": ScoreFlowConfig}
    samplers: ClassVar[tuple[str, ...]] = SAMPLERS

    def __init__(self, network: ScoreFlowNetwork, autoencoder: LinearAutoencoder, class_names: list[str],
                 settings: ScoreFlowConfig, grid_size: int = 20):
        super().__init__()
        self.network = network
        self.autoencoder = autoencoder
        self.num_classes = len(class_names)
        self.latent_shape = (settings.latent_dim, 1, 1)
        self.settings = settings
        self.grid_size = grid_size

    @classmethod
    def training_data(cls, cfg, rank: int, world_size: int, device: torch.device) -> EncodedDigits:
        digits = build_data_source(cfg.data, cfg.run.seed, rank, world_size, device)
        if not isinstance(digits, BuiltinDigits):
            raise ValueError(f"score_flow trains on latents of the built-in digits: data.source = "  # noqa: TRY004 - a config error
                             f"{cfg.data.source!r} must be 'builtin:digits'")
        return EncodedDigits(digits, cfg.score_flow.latent_dim, device)

    @classmethod
    def from_config(cls, cfg, data) -> ScoreFlow:
        """`data`: the EncodedDigits (training), or a DataInfo (opened from a checkpoint, whose
        weights then replace the autoencoder made here)."""
        settings = cfg.score_flow
        num_classes = len(data.class_names)
        network = ScoreFlowNetwork(settings.latent_dim, settings.hidden, settings.depth, settings.sigma_embed_dim,
                                   num_classes, settings.cond_embed_dim, settings.projector_hidden)
        autoencoder = getattr(data, "autoencoder", None)
        if not isinstance(autoencoder, LinearAutoencoder):
            autoencoder = LinearAutoencoder(DIGITS_SHAPE, settings.latent_dim).requires_grad_(False)
        return cls(network, autoencoder, data.class_names, settings, cfg.sample.num)

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def device(self) -> torch.device:
        return self.autoencoder.scaling_factor.device

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [N, D, 1, 1] -> pictures [N, 1, 28, 28] in [-1, 1]."""
        return self.autoencoder.decode(latents.float()).clamp(-1, 1)

    # ------------------------------------------------------------------------------------ training

    def forward(self, batch: Batch) -> LossOutput:
        x = batch.x.flatten(1).float()
        n = x.shape[0]
        sigma = (self.settings.sigma_log_mean + self.settings.sigma_log_std * torch.randn(n, device=x.device)).exp()
        eps = torch.randn_like(x)
        labels = None
        if self.num_classes:
            drop = torch.rand(n, device=x.device) < self.settings.label_drop_prob
            labels = batch.labels.masked_fill(drop, self.null_label)
        with torch.autocast(x.device.type, enabled=False):
            loss = self.denoising_loss(x, sigma, eps, labels)
        return LossOutput(loss, {"loss_denoise": loss.detach(), "sigma_log_mean": sigma.log().mean().detach()})

    def denoising_loss(self, x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor,
                       labels: torch.Tensor | None) -> torch.Tensor:
        """EDM-weighted MSE of x_pred = x_t + sigma^2 score(x_t) against clean latents x [B, D]."""
        x_t = (x + sigma[:, None] * eps).requires_grad_(True)
        score = self.network(x_t, sigma, labels, create_graph=True)
        x_pred = x_t + sigma[:, None].square() * score
        weight = (sigma.square() + 1) / sigma.square()
        return (weight[:, None] * (x_pred - x).square()).mean()

    # ------------------------------------------------------------------------------------ sampling

    def guided_denoiser(self, x: torch.Tensor, sigma: float, labels: torch.Tensor | None, cfg_scale: float
                        ) -> torch.Tensor:
        """x + sigma^2 * (guided score) at noise level sigma, x [B, D]."""
        sigmas = torch.full((x.shape[0],), sigma, device=x.device)
        score = guided(self.network, x, sigmas, labels, self.null_label, cfg_scale)
        return (x + sigma ** 2 * score).detach()

    @torch.no_grad()
    def sample_latents(self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None,
                       sampler: str = "heun", steps: int = 32, cfg_scale: float = 1.0, progress: bool = False
                       ) -> torch.Tensor:
        """n latents [n, D, 1, 1] by the probability-flow ODE (see the module doc)."""
        start = noise((n, self.settings.latent_dim), generator, self.device)
        return self.run_sampler(start, labels, sampler, steps, cfg_scale, progress)

    @torch.no_grad()
    def run_sampler(self, start: torch.Tensor, labels: torch.Tensor | None = None, sampler: str = "heun",
                    steps: int = 32, cfg_scale: float = 1.0, progress: bool = False) -> torch.Tensor:
        """Latents [n, D, 1, 1] from N(0, I) noise start [n, D] (scaled to sigma_max here) by the
        probability-flow ODE."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")
        if steps < 2:
            raise ValueError(f"steps must be >= 2, got {steps}")
        settings = self.settings
        n = start.shape[0]
        labels = check_labels(labels, n, self.num_classes, self.device)
        sigmas = sigma_schedule(steps, settings.sigma_min, settings.sigma_max, settings.rho, self.device).tolist()
        x = sigmas[0] * start
        for sigma, sigma_next in tqdm(list(itertools.pairwise(sigmas)), desc=sampler, disable=not progress):
            slope = (x - self.guided_denoiser(x, sigma, labels, cfg_scale)) / sigma  # dx/dsigma
            x_next = x + (sigma_next - sigma) * slope
            if sampler == "heun" and sigma_next > 0:
                slope_next = (x_next - self.guided_denoiser(x_next, sigma_next, labels, cfg_scale)) / sigma_next
                x_next = x + (sigma_next - sigma) * (slope + slope_next) / 2
            x = x_next
        return x.view(n, *self.latent_shape)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None,
               sampler: str = "heun", steps: int = 32, cfg_scale: float = 1.0, progress: bool = False
               ) -> torch.Tensor:
        """n pictures [n, 1, 28, 28] in [-1, 1]: sampled latents, decoded."""
        return self.decode(self.sample_latents(n, generator, labels, sampler, steps, cfg_scale, progress))

    @torch.no_grad()
    def sample_grid(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """sample.num decoded samples from noise (generation.grid_noise) with the grid settings of
        [score_flow]; `batch` is not needed."""
        settings = self.settings
        labels, nrow = grid_layout(self.grid_size, self.num_classes)
        start = grid_noise(labels, (self.grid_size, settings.latent_dim), generator, self.device)
        latents = self.run_sampler(start, labels, settings.sampler, settings.sample_steps, settings.cfg_scale)
        return self.decode(latents), nrow

    def evaluate(self, data, per_class: int) -> dict[str, float]:
        """Sample quality (engine.methods.generation) of decoded samples against held-out digits."""
        def draw(n, generator, labels):
            return self.sample(n, generator, labels, self.settings.sampler, self.settings.sample_steps,
                               self.settings.cfg_scale)
        return evaluate_samples(draw, data, per_class, self.num_classes, self.device)
