"""Flow matching: the CondOT interpolant and target, what the network sees, the samplers' accuracy,
a short run that learns, bit-identical resume, and engine-sample with every FM sampler."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import assert_same_final_weights, losses

from engine.commands.sample import main as sample_main
from engine.config import load_config
from engine.data.base import Batch
from engine.methods.flow_matching import SAMPLERS, FlowMatching, FlowMatchingConfig, solve_flow
from engine.train import train

TINY = ["--method.name=fm", "--data.source=builtin:textures", "--data.image_size=16", "--model.channels=16",
        "--model.channel_mult=[1,2]", "--model.attention_resolutions=[8]", "--model.num_res_blocks=1",
        "--model.num_groups=8", "--train.batch_size=8", "--train.warmup_steps=2", "--train.lr=2e-3",
        "--sample.num=4", "--fm.sample_steps=3", "--log.every=1", "--log.tensorboard=false",
        "--checkpoint.every=3", "--train.device=cpu", "--eval.per_class=1"]


def tiny_config(run_dir: Path, *extra: str):
    return load_config(None, [*TINY, f"--run.dir={run_dir}", *extra])


class Recorder(torch.nn.Module):
    """A stand-in velocity network that records its inputs and returns a fixed function of them."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, t, labels=None):
        self.calls.append((x.detach().clone(), t.detach().clone(), labels))
        return x * self.weight


@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
def test_interpolant_runs_from_noise_to_data_with_the_right_velocity(seed, sigma_min):
    method = FlowMatching(Recorder(), (2, 3, 3), 0, FlowMatchingConfig(sigma_min=sigma_min))
    x0, x1 = torch.randn(2, 4, 2, 3, 3, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64)
    x_t, u = method.interpolant(x0, x1, t)
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - (1 - sigma_min) * tt) * x0 + tt * x1)
    torch.testing.assert_close(u, x1 - (1 - sigma_min) * x0)
    if sigma_min == 0:
        torch.testing.assert_close(u, x1 - x0)
    # t = 0 is pure noise, t = 1 the data (up to sigma_min * noise), and u = d x_t / dt.
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    at_ends, _ = method.interpolant(x0[:2], x1[:2], ends)
    torch.testing.assert_close(at_ends[0], x0[0])
    torch.testing.assert_close(at_ends[1], x1[1] + sigma_min * x0[1])
    h = 1e-6
    finite_difference = (method.interpolant(x0, x1, t + h)[0] - method.interpolant(x0, x1, t - h)[0]) / (2 * h)
    torch.testing.assert_close(finite_difference, u, rtol=1e-7, atol=1e-7)


def test_the_network_sees_the_interpolant_at_continuous_time(seed):
    model = Recorder()
    method = FlowMatching(model, (3, 4, 4), 3, FlowMatchingConfig(label_drop_prob=0.0))
    x1 = torch.randn(6, 3, 4, 4)
    torch.manual_seed(seed)
    method(Batch(x1, torch.tensor([0, 1, 2, 0, 1, 2])))
    torch.manual_seed(seed)  # the same draws as the forward: x0, then t
    x0, t = torch.randn_like(x1), torch.rand(6)
    (x_seen, t_seen, labels_seen), = model.calls
    torch.testing.assert_close(x_seen, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * x1)
    torch.testing.assert_close(t_seen, t * 1000)
    assert not torch.equal(t_seen, t_seen.round()), "time must not be quantised to integer steps"
    assert labels_seen.tolist() == [0, 1, 2, 0, 1, 2]


def test_logit_normal_times_stay_inside_the_unit_interval(seed):
    method = FlowMatching(Recorder(), (1, 2, 2), 0, FlowMatchingConfig(time_sampling="logit_normal", logit_std=2.0))
    t = method.sample_times(10_000, torch.device("cpu"))
    assert 0 < t.min() and t.max() < 1
    assert abs(torch.logit(t.double()).std().item() - 2.0) < 0.1


def rotation_field(x, t):
    """dx/dt = A x with A a rotation generator scaled by (1 + t): x(1) = expm(1.5 A) x(0)."""
    a, b = x[:, 0], x[:, 1]
    scale = (1 + t)
    return torch.stack([-b * scale, a * scale], dim=1)


def exact_rotation(x0):
    angle = 1.5  # integral of (1 + t) over [0, 1]
    a, b = x0[:, 0], x0[:, 1]
    return torch.stack([a * math.cos(angle) - b * math.sin(angle), a * math.sin(angle) + b * math.cos(angle)], 1)


@pytest.mark.parametrize("sampler, order", [("euler", 1), ("midpoint", 2), ("heun", 2)])
def test_fixed_step_samplers_converge_at_their_order(seed, sampler, order):
    x0 = torch.randn(5, 2, dtype=torch.float64)
    errors = [(solve_flow(rotation_field, x0, sampler, steps)[0] - exact_rotation(x0)).abs().max().item()
              for steps in (20, 40)]
    assert errors[0] / errors[1] == pytest.approx(2 ** order, rel=0.15)


def test_dopri5_meets_its_tolerance_with_few_evaluations(seed):
    x0 = torch.randn(5, 2, dtype=torch.float64)
    x1, evaluations = solve_flow(rotation_field, x0, "dopri5", steps=4, rtol=1e-6, atol=1e-6)
    assert (x1 - exact_rotation(x0)).abs().max() < 1e-5
    _, euler_evaluations = solve_flow(rotation_field, x0, "euler", steps=1000)
    assert evaluations < euler_evaluations / 10


@pytest.fixture(scope="module")
def fm_runs(tmp_path_factory):
    """A straight 6-step run, the same run stopped at 3 and resumed, and a 40-step run."""
    root = tmp_path_factory.mktemp("fm")
    train(tiny_config(root / "straight", "--train.steps=6", "--sample.every=0", "--eval.at_end=false"))
    first = train(tiny_config(root / "resumed", "--train.steps=6", "--sample.every=0", "--eval.at_end=false"),
                  should_stop=lambda step: step == 3)
    assert first.stopped_early and first.step == 3
    train(tiny_config(root / "resumed", "--train.steps=6", "--sample.every=0", "--eval.at_end=false"))
    train(tiny_config(root / "long", "--train.steps=40", "--sample.every=40", "--train.ema_decay=0.9"))
    return root


def test_resume_replays_identical_losses(fm_runs):
    assert losses(fm_runs / "straight") == losses(fm_runs / "resumed")
    assert_same_final_weights(fm_runs / "straight", fm_runs / "resumed")


def test_a_short_run_lowers_the_loss_and_logs_its_quality(fm_runs):
    run = fm_runs / "long"
    by_step = losses(run)
    assert np.mean([by_step[s] for s in range(31, 41)]) < 0.8 * np.mean([by_step[s] for s in range(1, 6)])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    quality = rows[-1]
    assert {"eval/swd", "eval/nn_rms"} <= quality.keys()
    assert all(math.isfinite(quality[k]) and quality[k] > 0 for k in ("eval/swd", "eval/nn_rms"))
    assert (run / "samples" / "step-0000040.png").is_file()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_engine_sample_draws_with_every_fm_sampler(fm_runs, tmp_path, sampler, capsys):
    out = tmp_path / f"{sampler}.png"
    assert sample_main(["--checkpoint", str(fm_runs / "long"), "--out", str(out), "--n", "4", "--nrow", "2",
                        "--sampler", sampler, "--steps", "3", "--cfg", "1.5", "--labels", "brick,grass"]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 + 2 * 18, 2 + 2 * 18, 3) and grid.std() > 0
    assert f"{sampler} x 3" in capsys.readouterr().out


@pytest.mark.parametrize("arguments, message", [
    (["--sampler", "ddim"], "--sampler ddim: a fm run samples with euler | midpoint | heun | dopri5"),
    (["--eta", "0.5"], "--eta is DDIM's noise scale"),
])
def test_engine_sample_refuses_what_fm_does_not_have(fm_runs, tmp_path, arguments, message, capsys):
    out = tmp_path / "x.png"
    assert sample_main(["--checkpoint", str(fm_runs / "long"), "--out", str(out), *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
