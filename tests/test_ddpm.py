"""DDPM / DDIM: the classic hand-written bugs pinned shut, schedules, conversions, guidance, samplers, overfitting.

References are written out here in float64 from the papers' formulas, independently of the
buffers in engine/methods/schedules.py.
"""

import itertools
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.config import Config, load_config
from engine.data.base import Batch
from engine.methods.ddpm import DDPM, DDPMConfig, ddim_timesteps
from engine.methods.generation import grid_layout
from engine.methods.schedules import (
    eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    v_from_eps_x0,
    x0_from_v,
)
from engine.models.unet import UNet

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHAPE = (3, 8, 8)
NUM_CLASSES = 3
Z = 5.0  # standard errors a sample statistic may stray: a false failure is rarer than 1e-6


# ----------------------------------------------------------------------------- references and helpers


def reference_betas(schedule: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02):
    if schedule == "linear":
        return torch.tensor([beta_start + (beta_end - beta_start) * i / (timesteps - 1) for i in range(timesteps)],
                            dtype=torch.float64)

    def alpha_bar(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), 0.999)
                         for i in range(timesteps)], dtype=torch.float64)


def reference_schedule(schedule: str, timesteps: int) -> dict[str, torch.Tensor]:
    """Ho et al. eq. 4 and 7, in float64."""
    betas = reference_betas(schedule, timesteps)
    ab = torch.cumprod(1 - betas, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    return {
        "betas": betas,
        "alphas_cumprod": ab,
        "alphas_cumprod_prev": ab_prev,
        "sqrt_alphas_cumprod": ab.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - ab).sqrt(),
        "posterior_variance": betas * (1 - ab_prev) / (1 - ab),
        "posterior_mean_coef1": ab_prev.sqrt() * betas / (1 - ab),
        "posterior_mean_coef2": (1 - betas).sqrt() * (1 - ab_prev) / (1 - ab),
    }


def tiny_unet(num_classes: int = NUM_CLASSES, dropout: float = 0.0) -> UNet:
    return UNet(in_channels=SHAPE[0], out_channels=SHAPE[0], channels=16, channel_mult=[1, 2], num_res_blocks=1,
                attention_resolutions=[4], num_heads=2, num_groups=8, dropout=dropout, num_classes=num_classes,
                image_size=SHAPE[1])


def randomized(model: nn.Module) -> nn.Module:
    """Random values in the zero-initialised layers, so the output depends on every input."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    return model


def make_ddpm(model: nn.Module | None = None, num_classes: int = NUM_CLASSES, **ddpm) -> DDPM:
    model = model if model is not None else randomized(tiny_unet(num_classes))
    return DDPM(model, SHAPE, num_classes, DDPMConfig(**ddpm))


class Spy(nn.Module):
    """Records what the method feeds the network; predicts zeros."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, labels):
        self.calls.append((x.detach().clone(), t.detach().clone(), None if labels is None else labels.clone()))
        return torch.zeros_like(x)


class Oracle(nn.Module):
    """The exact network for a data set of one image x_star: outputs the true eps / x0 / v of x_t."""

    def __init__(self, x_star: torch.Tensor, prediction: str, reference: dict[str, torch.Tensor]):
        super().__init__()
        self.x_star, self.prediction = x_star.double(), prediction
        self.a, self.s = reference["sqrt_alphas_cumprod"], reference["sqrt_one_minus_alphas_cumprod"]

    def forward(self, x, t, labels):
        assert torch.equal(t, t.round()), "timesteps must be integer-valued"
        a = self.a[t.long()].view(-1, 1, 1, 1)
        s = self.s[t.long()].view(-1, 1, 1, 1)
        eps = (x.double() - a * self.x_star) / s
        target = {"eps": eps, "x0": self.x_star.expand_as(eps), "v": a * eps - s * self.x_star}[self.prediction]
        return target.float()


# ----------------------------------------------------------------------------- schedules and buffers


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_buffers_match_the_float64_formulas(seed, schedule):
    timesteps = int(torch.randint(10, 2000, ()))
    method = make_ddpm(Spy(), schedule=schedule, timesteps=timesteps)
    reference = reference_schedule(schedule, timesteps)
    for name, expected in reference.items():
        got = getattr(method.schedule, name)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-12, msg=name)
    log_var = method.schedule.posterior_log_variance_clipped.double()
    torch.testing.assert_close(log_var[1:], reference["posterior_variance"][1:].log(), rtol=1e-6, atol=1e-6)
    assert log_var[0] == log_var[1]  # the clip: posterior_variance[0] = 0 would give -inf


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_alpha_bar_decreases_strictly_inside_zero_one(seed, schedule):
    timesteps = int(torch.randint(2, 3000, ()))
    ab = make_ddpm(Spy(), schedule=schedule, timesteps=timesteps).schedule.alphas_cumprod
    assert ((ab > 0) & (ab < 1)).all()
    assert (ab[1:] < ab[:-1]).all()


def test_cosine_alpha_bar_follows_the_squared_cosine(seed):
    timesteps = int(torch.randint(50, 2000, ()))
    ab = make_ddpm(Spy(), schedule="cosine", timesteps=timesteps).schedule.alphas_cumprod.double()
    u = (torch.arange(timesteps, dtype=torch.float64) + 1) / timesteps
    f = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    # Before the last step, where beta is clipped at 0.999.
    torch.testing.assert_close(ab[:-1], f[:-1], rtol=1e-5, atol=1e-9)


def test_prediction_conversions_are_exact_inverses(seed):
    shape = (4, 3, 5, 5)
    x0, eps = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    ab = torch.empty(shape[0], 1, 1, 1, dtype=torch.float64).uniform_(1e-3, 1 - 1e-3)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    x_t = a * x0 + s * eps
    v = v_from_eps_x0(eps, x0, a, s)
    tol = {"atol": 1e-10, "rtol": 0}
    torch.testing.assert_close(predict_x0_from_eps(x_t, eps, a, s), x0, **tol)
    torch.testing.assert_close(predict_eps_from_x0(x_t, x0, a, s), eps, **tol)
    torch.testing.assert_close(eps_from_v(x_t, v, a, s), eps, **tol)
    torch.testing.assert_close(x0_from_v(x_t, v, a, s), x0, **tol)
    torch.testing.assert_close(v_from_eps_x0(eps_from_v(x_t, v, a, s), x0_from_v(x_t, v, a, s), a, s), v, **tol)


# ----------------------------------------------------------------------------- training: the classic bugs


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_noise_level_is_one_minus_alpha_bar(seed, schedule):
    method = make_ddpm(Spy(), schedule=schedule)
    ab = reference_schedule(schedule, 1000)["alphas_cumprod"]
    n = 40_000
    for t in torch.randint(50, 950, (4,)).tolist():
        t_batch = torch.full((n,), t)
        noise = torch.randn(n, 1, 1, 1)
        variance = method.schedule.q_sample(torch.zeros(n, 1, 1, 1), t_batch, noise).var().item()
        expected = 1 - ab[t].item()
        assert abs(variance - expected) < Z * expected * math.sqrt(2 / n), (t, variance, expected)

        const = float(torch.empty(()).uniform_(-1, 1))
        mean = method.schedule.q_sample(torch.full((n, 1, 1, 1), const), t_batch, noise).mean().item()
        expected = math.sqrt(ab[t].item()) * const
        assert abs(mean - expected) < Z * math.sqrt((1 - ab[t].item()) / n), (t, mean, expected)


def test_network_is_fed_x_t_not_x0(seed):
    spy = Spy()
    method = make_ddpm(spy)
    reference = reference_schedule("cosine", 1000)
    x0, noise = torch.randn(6, *SHAPE), torch.randn(6, *SHAPE)
    t = torch.randint(0, 1000, (6,))
    labels = torch.randint(0, NUM_CLASSES, (6,))
    out = method.training_loss(x0, t, noise, labels)
    (fed_x, fed_t, fed_labels), = spy.calls
    a = reference["sqrt_alphas_cumprod"][t].view(-1, 1, 1, 1)
    s = reference["sqrt_one_minus_alphas_cumprod"][t].view(-1, 1, 1, 1)
    torch.testing.assert_close(fed_x.double(), a * x0.double() + s * noise.double(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fed_x, x0, atol=1e-2)
    assert fed_t.dtype == torch.float32 and torch.equal(fed_t, t.float())
    assert torch.equal(fed_labels, labels)
    # eps prediction from a network that says 0: the loss is mean(noise^2).
    torch.testing.assert_close(out.loss, noise.square().mean())
    assert set(out.terms) == {"loss_mse"}


def test_forward_noises_the_batch_and_feeds_integer_timesteps(seed):
    spy = Spy()
    method = make_ddpm(spy, label_drop_prob=0.0)
    x0 = torch.full((512, 1, 4, 4), float(torch.empty(()).uniform_(-1, 1)))
    labels = torch.randint(0, NUM_CLASSES, (512,))
    method(Batch(x0, labels))
    (fed_x, fed_t, fed_labels), = spy.calls
    assert torch.equal(fed_t, fed_t.round()) and fed_t.min() >= 0 and fed_t.max() <= 999
    assert torch.equal(fed_labels, labels)
    t = fed_t.long()
    a = method.schedule.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    s = method.schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    recovered_noise = (fed_x - a * x0) / s  # what the method must have drawn from N(0, I)
    n = recovered_noise.numel()
    assert abs(recovered_noise.mean().item()) < Z / math.sqrt(n)
    assert abs(recovered_noise.var().item() - 1) < Z * math.sqrt(2 / n)


@pytest.mark.parametrize("loss", ["mse", "l1"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_exact_network_has_zero_loss_for_every_prediction(seed, prediction, loss):
    x_star = torch.rand(1, *SHAPE) * 1.8 - 0.9
    oracle = Oracle(x_star, prediction, reference_schedule("cosine", 1000))
    method = make_ddpm(oracle, prediction=prediction, loss=loss)
    out = method(Batch(x_star.expand(16, *SHAPE), torch.randint(0, NUM_CLASSES, (16,))))
    assert out.loss.item() < (1e-8 if loss == "mse" else 1e-4)
    assert set(out.terms) == {f"loss_{loss}"}


def test_label_dropout_rate_matches_label_drop_prob(seed):
    p = float(torch.empty(()).uniform_(0.05, 0.5))
    method = make_ddpm(Spy(), label_drop_prob=p)
    n = 50_000
    labels = torch.randint(0, NUM_CLASSES, (n,))
    dropped = method.drop_labels(labels)
    is_null = dropped == NUM_CLASSES
    assert abs(is_null.float().mean().item() - p) < Z * math.sqrt(p * (1 - p) / n)
    assert torch.equal(dropped[~is_null], labels[~is_null])


def test_unconditional_data_trains_on_the_null_class(seed):
    spy = Spy()
    method = make_ddpm(spy, num_classes=0)
    method(Batch(torch.randn(2, *SHAPE), torch.zeros(2, dtype=torch.long)))
    assert spy.calls[0][2] is None
    with pytest.raises(ValueError, match="labels=None"):
        method.sample(2, torch.Generator(), labels=torch.zeros(2, dtype=torch.long), steps=1)


# ----------------------------------------------------------------------------- guidance and samplers


def test_guidance_scale_one_is_conditional_and_zero_is_unconditional(seed):
    method = make_ddpm()
    model = method.model
    x = torch.randn(4, *SHAPE)
    t = int(torch.randint(0, 1000, ()))
    labels = torch.randint(0, NUM_CLASSES, (4,))
    t_batch = torch.full((4,), float(t))
    cond, uncond = model(x, t_batch, labels), model(x, t_batch, None)
    assert not torch.allclose(cond, uncond, atol=1e-4)
    torch.testing.assert_close(method.guided_output(x, t, labels, 1.0), cond, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(method.guided_output(x, t, labels, 0.0), uncond, atol=1e-6, rtol=1e-6)
    scale = float(torch.empty(()).uniform_(1.5, 5))
    torch.testing.assert_close(method.guided_output(x, t, labels, scale), uncond + scale * (cond - uncond),
                               atol=1e-5, rtol=1e-5)


def test_last_ddpm_step_is_the_posterior_mean_without_noise(seed):
    method = make_ddpm(clip_denoised=False)
    reference = reference_schedule("cosine", 1000)
    x_t = torch.randn(4, *SHAPE)
    labels = torch.randint(0, NUM_CLASSES, (4,))
    first = method.ddpm_step(x_t, 0, torch.Generator().manual_seed(seed), labels)
    second = method.ddpm_step(x_t, 0, torch.Generator().manual_seed(seed + 1), labels)
    assert torch.equal(first, second)
    eps = method.model(x_t, torch.zeros(4), labels).double()
    x0_hat = (x_t.double() - reference["sqrt_one_minus_alphas_cumprod"][0] * eps) / reference["sqrt_alphas_cumprod"][0]
    mean = reference["posterior_mean_coef1"][0] * x0_hat + reference["posterior_mean_coef2"][0] * x_t.double()
    torch.testing.assert_close(first.double(), mean, atol=1e-4, rtol=1e-4)


def test_ddpm_step_adds_the_posterior_variance(seed):
    method = make_ddpm(clip_denoised=False)
    reference = reference_schedule("cosine", 1000)
    # Early timesteps: there the posterior variance is far from beta_t (Ho et al.'s other choice).
    t = int(torch.randint(1, 11, ()))
    x_t = torch.randn(64, *SHAPE)
    eps = method.model(x_t, torch.full((64,), float(t)), None).double()
    x0_hat = (x_t.double() - reference["sqrt_one_minus_alphas_cumprod"][t] * eps) / reference["sqrt_alphas_cumprod"][t]
    mean = reference["posterior_mean_coef1"][t] * x0_hat + reference["posterior_mean_coef2"][t] * x_t.double()
    step = method.ddpm_step(x_t, t, torch.Generator().manual_seed(seed)).double()
    other = method.ddpm_step(x_t, t, torch.Generator().manual_seed(seed + 1)).double()
    assert not torch.equal(step, other)
    residual = (step - mean) / reference["posterior_variance"][t].sqrt()  # should be N(0, 1)
    n = residual.numel()
    assert abs(residual.mean().item()) < Z / math.sqrt(n)
    assert abs(residual.var().item() - 1) < Z * math.sqrt(2 / n)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_sigma_with_eta_one_is_ddpm_posterior_std_between_neighbours(seed, schedule):
    method = make_ddpm(Spy(), schedule=schedule)
    variance = reference_schedule(schedule, 1000)["posterior_variance"]
    for t in torch.randint(1, 1000, (8,)).tolist():
        sigma = method.ddim_sigma(t, t - 1, eta=1.0).double()
        torch.testing.assert_close(sigma, variance[t].sqrt(), rtol=1e-5, atol=0)
    assert method.ddim_sigma(500, 400, eta=0.0) == 0


@pytest.mark.parametrize("clip_denoised", [False, True])
def test_ddim_with_eta_one_between_neighbours_is_the_ddpm_step(seed, clip_denoised):
    method = make_ddpm(clip_denoised=clip_denoised)
    x_t = torch.randn(4, *SHAPE)
    labels = torch.randint(0, NUM_CLASSES, (4,))
    for t in [1, *torch.randint(2, 1000, (3,)).tolist()]:
        ddim = method.ddim_step(x_t, t, t - 1, torch.Generator().manual_seed(seed), labels, eta=1.0)
        ddpm = method.ddpm_step(x_t, t, torch.Generator().manual_seed(seed), labels)
        torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=1e-4)


def test_ddim_with_eta_zero_is_deterministic_given_the_initial_noise(seed):
    method = make_ddpm()
    x_T = torch.randn(2, *SHAPE)
    labels = torch.randint(0, NUM_CLASSES, (2,))
    runs = [method.run_sampler(x_T, torch.Generator().manual_seed(seed + i), labels, "ddim", steps=4, eta=0.0)
            for i in range(2)]
    assert torch.equal(runs[0], runs[1])
    noisy = [method.run_sampler(x_T, torch.Generator().manual_seed(seed + i), labels, "ddim", steps=4, eta=1.0)
             for i in range(2)]
    assert not torch.equal(noisy[0], noisy[1])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_seeded_generator_reproduces_the_samples(seed, sampler):
    method = make_ddpm(timesteps=10)
    labels = torch.randint(0, NUM_CLASSES, (2,))
    first = method.sample(2, torch.Generator().manual_seed(seed), labels, sampler, steps=3, eta=0.5, cfg_scale=2.0)
    again = method.sample(2, torch.Generator().manual_seed(seed), labels, sampler, steps=3, eta=0.5, cfg_scale=2.0)
    other = method.sample(2, torch.Generator().manual_seed(seed + 1), labels, sampler, steps=3, eta=0.5,
                          cfg_scale=2.0)
    assert first.shape == (2, *SHAPE)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_samplers_with_the_exact_network_return_the_data_point(seed, prediction, sampler, eta):
    timesteps = 50
    x_star = torch.rand(1, *SHAPE) * 1.8 - 0.9
    oracle = Oracle(x_star, prediction, reference_schedule("cosine", timesteps))
    method = make_ddpm(oracle, prediction=prediction, timesteps=timesteps)
    samples = method.sample(3, torch.Generator().manual_seed(seed), sampler=sampler, steps=7, eta=eta)
    torch.testing.assert_close(samples, x_star.expand_as(samples), atol=1e-4, rtol=0)


def test_ddim_timesteps_run_from_the_noisiest_to_zero(seed):
    timesteps = int(torch.randint(2, 2000, ()))
    steps = int(torch.randint(1, timesteps + 1, ()))
    sequence = ddim_timesteps(timesteps, steps)
    assert len(sequence) == steps and sequence[0] == timesteps - 1
    assert all(later < earlier for earlier, later in itertools.pairwise(sequence))
    assert steps == 1 or sequence[-1] == 0
    assert ddim_timesteps(timesteps, timesteps + 5) == list(reversed(range(timesteps)))


def test_sampling_switches_dropout_off_and_restores_train_mode(seed):
    method = make_ddpm(randomized(tiny_unet(dropout=0.5)), timesteps=10)
    method.train()
    x_T = torch.randn(2, *SHAPE)
    first = method.run_sampler(x_T, torch.Generator().manual_seed(seed), steps=3)
    torch.manual_seed(seed + 1)  # dropout draws from the global RNG: it must not be drawing at all
    assert torch.equal(first, method.run_sampler(x_T, torch.Generator().manual_seed(seed), steps=3))
    assert method.training and method.model.training


# ----------------------------------------------------------------------------- grids and config


def test_grid_layout_gives_each_class_a_row_or_a_column():
    labels, nrow = grid_layout(16, 3)
    assert nrow == 6 and labels.tolist() == [0] * 6 + [1] * 6 + [2] * 4
    labels, nrow = grid_layout(24, 12)
    assert nrow == 12 and labels.tolist() == [i % 12 for i in range(24)]
    labels, nrow = grid_layout(16, 20)
    assert nrow == 4 and labels.tolist() == list(range(16))
    labels, nrow = grid_layout(9, 1)
    assert nrow == 3 and labels.tolist() == [0] * 9
    labels, nrow = grid_layout(9, 0)
    assert labels is None and nrow == 3


class FakeData:
    """What DDPM.from_config reads from a data source."""

    def __init__(self, sample_shape: tuple[int, int, int] = SHAPE):
        self.sample_shape = sample_shape
        self.class_names = ["brick", "grass", "gravel"]


def small_config(num: int, **grid) -> Config:
    cfg = Config("ddpm")
    cfg.model = replace(cfg.model, channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[4],
                        num_heads=2)
    cfg.ddpm = replace(cfg.ddpm, timesteps=20, **grid)
    cfg.sample.num = num
    return cfg


def test_sample_grid_follows_the_grid_settings_and_is_reproducible(seed):
    method = DDPM.from_config(small_config(5, sample_steps=2, sampler="ddim", cfg_scale=1.5), FakeData())
    randomized(method.model)
    assert method.model.num_classes == 3 and method.sample_shape == SHAPE
    batch = Batch(torch.zeros(1, *SHAPE), torch.zeros(1, dtype=torch.long))
    images, nrow = method.sample_grid(batch, torch.Generator().manual_seed(seed))
    again, _ = method.sample_grid(batch, torch.Generator().manual_seed(seed))
    assert images.shape == (5, *SHAPE) and nrow == 3
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, again)


def test_ddpm_textures_config_builds_and_trains_a_step(seed):
    cfg = load_config(CONFIGS / "ddpm_textures.toml")
    assert cfg.method.name == "ddpm"
    data = FakeData((3, cfg.data.image_size, cfg.data.image_size))
    method = DDPM.from_config(cfg, data)
    x = torch.rand(2, *data.sample_shape) * 2 - 1
    out = method(Batch(x, torch.randint(0, 3, (2,))))
    out.loss.backward()
    assert torch.isfinite(out.loss)


# ----------------------------------------------------------------------------- it learns


def test_a_small_unet_overfits_a_fixed_batch(seed):
    method = make_ddpm(tiny_unet(), label_drop_prob=0.1)
    # Four smooth patterns (gradients, a checker and a blob) in [-1, 1].
    ramp = torch.linspace(-1, 1, SHAPE[1])
    yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")
    patterns = torch.stack([xx, yy, torch.sign(xx * yy) * 0.8, 1 - 2 * (xx**2 + yy**2).clamp(max=1)])
    x0 = patterns[:, None].expand(4, SHAPE[0], *SHAPE[1:]).contiguous() * torch.tensor([1, -0.5, 0.7])[:, None, None]
    labels = torch.tensor([0, 1, 2, 0])
    batch = Batch(x0.repeat(4, 1, 1, 1), labels.repeat(4))

    eval_t = torch.randint(0, 1000, (64,))
    eval_noise = torch.randn(64, *SHAPE)

    def eval_loss() -> float:
        with torch.no_grad():
            return method.training_loss(x0.repeat(16, 1, 1, 1), eval_t, eval_noise, labels.repeat(16)).loss.item()

    before = eval_loss()
    optimizer = torch.optim.Adam(method.parameters(), lr=3e-3)
    for _ in range(40):
        loss = method(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert after < 0.4 * before, (before, after)
