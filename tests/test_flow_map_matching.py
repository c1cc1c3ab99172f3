"""Flow map matching: the boundary condition, the jvp time derivative against finite differences in
float64, the fused GroupNorm kernel under the vmapped jvp, the time pairs and their curriculum, the
dual-time U-Net, overfitting one batch, a short run, bit-identical resume and engine-sample."""

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import assert_same_final_weights, losses

import kernels
from engine.checkpoint import latest_checkpoint
from engine.commands.sample import main as sample_main
from engine.config import load_config
from engine.data.base import Batch
from engine.methods.flow_map_matching import FlowMapConfig, FlowMapMatching, sample_time_pairs
from engine.models import embeddings
from engine.models.dual_time_unet import DualTimeUNet
from engine.models.unet import UNet
from engine.train import train

TINY = ["--method.name=fmm", "--data.source=builtin:textures", "--data.image_size=16", "--model.channels=8",
        "--model.channel_mult=[1,2]", "--model.attention_resolutions=[]", "--model.num_res_blocks=1",
        "--model.num_groups=4", "--train.batch_size=6", "--train.warmup_steps=2", "--train.lr=2e-3",
        "--sample.num=4", "--fmm.sample_steps=2", "--fmm.anneal_steps=10", "--log.every=1",
        "--log.tensorboard=false", "--checkpoint.every=3", "--train.device=cpu", "--eval.per_class=1"]
UNPATCHED_GROUP_NORM = kernels.group_norm_film_silu


def tiny_config(run_dir: Path, *extra: str):
    return load_config(None, [*TINY, f"--run.dir={run_dir}", *extra])


def tiny_method(num_classes: int = 3, dtype=torch.float32, levels: int = 1, **settings) -> FlowMapMatching:
    """A small dual-time U-Net on 3x8x8 (two levels, attention at 4x4; or one level without
    attention) with every zero-initialised layer randomised, so that v and its time derivative are
    far from zero."""
    model = DualTimeUNet(3, 3, 8, [1, 2][:levels], 1, [4][:levels - 1], 2, 4, 0.0, num_classes, 8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return FlowMapMatching(model.to(dtype), (3, 8, 8), num_classes, FlowMapConfig(**settings))


def float64_sinusoid(t, dim, max_period=10000.0):
    """sinusoidal_embedding without its cast to fp32, for the float64 derivative checks."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    angles = t[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def test_the_map_from_a_time_to_itself_is_the_identity_exactly(seed):
    method = tiny_method()
    x = torch.randn(4, 3, 8, 8)
    s = torch.rand(4)
    assert torch.equal(method.flow_map(x, s, s, torch.tensor([0, 1, 2, 3])), x)
    assert not torch.equal(method.flow_map(x, s, (s + 0.5).clamp(max=1)), x)


@pytest.mark.parametrize("levels", [1, 2], ids=["resblocks", "with_attention"])
def test_time_derivative_by_jvp_matches_finite_differences_in_float64(seed, monkeypatch, levels):
    monkeypatch.setattr(embeddings, "sinusoidal_embedding", float64_sinusoid)
    method = tiny_method(dtype=torch.float64, levels=levels)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    s, t = torch.tensor([0.1, 0.3, 0.0], dtype=torch.float64), torch.tensor([0.4, 0.9, 1.0], dtype=torch.float64)
    labels = torch.tensor([0, 2, 3])  # 3 = the null class
    v, dv_dt = method.velocity_and_time_derivative(x, s, t, labels)
    torch.testing.assert_close(v, method.velocity(x, s, t, labels))
    # Times are scaled by 1000 into the sinusoids, so v is steep in t: a small step keeps the central
    # difference's h^2 error below the tolerance (its rounding error is ~1e-16 |v| / h).
    h = 1e-7
    finite_difference = (method.velocity(x, s, t + h, labels) - method.velocity(x, s, t - h, labels)) / (2 * h)
    magnitude = dv_dt.abs().max().item()
    assert magnitude > 1e-2
    torch.testing.assert_close(dv_dt, finite_difference, rtol=1e-6, atol=1e-7 * magnitude)


def test_the_fused_group_norm_serves_the_vmapped_jvp_and_its_backward(seed, monkeypatch):
    """FMM on a GPU keeps the fused GroupNorm-FiLM-SiLU: its jvp and vmap rules give the torch
    reference's v, d/dt v and loss gradients (the custom op alone would return a zero tangent)."""
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setattr(kernels, "group_norm_film_silu", functools.partial(UNPATCHED_GROUP_NORM, backend=backend))
        method = tiny_method()  # every kernel launch is interpreted on a CPU: few layers
        torch.manual_seed(seed)
        x = torch.randn(2, 3, 8, 8)
        s, t = torch.tensor([0.2, 0.0]), torch.tensor([0.7, 0.5])
        v, dv_dt = method.velocity_and_time_derivative(x, s, t, torch.tensor([1, 3]))
        (dv_dt.square().sum() + v.sum()).backward()
        results[backend] = (v.detach(), dv_dt.detach(), method.model.input_conv.weight.grad.clone())
    assert results["torch"][1].abs().max() > 1e-2
    for fused, reference in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


@pytest.mark.parametrize("gap", [0.1, 0.3, 1.0])
def test_time_pairs_are_uniform_over_the_band_of_the_triangle(seed, gap):
    s, t = sample_time_pairs(200_000, torch.tensor(gap, dtype=torch.float64))
    delta = t - s
    assert (s >= 0).all() and (t <= 1).all() and (delta >= 0).all() and (delta <= gap + 1e-12).all()
    # The band reaches both corners: every time in [0, 1] is trained during the curriculum.
    assert s.min() < 0.01 and t.max() > 0.99
    # p(delta) ~ (1 - delta) on [0, gap]; given delta, s is uniform on [0, 1 - delta].
    mean_delta = (gap**2 / 2 - gap**3 / 3) / (gap - gap**2 / 2)
    assert delta.mean().item() == pytest.approx(mean_delta, abs=5 * delta.std().item() / math.sqrt(200_000))
    u = s / (1 - delta)
    assert u.mean().item() == pytest.approx(0.5, abs=0.005) and u.var().item() == pytest.approx(1 / 12, abs=0.005)


@pytest.mark.parametrize("annealing, expected", [("linear", [0.1, 0.55, 1.0, 1.0]),
                                                 ("cosine", [0.1, 0.55, 1.0, 1.0]),
                                                 ("none", [1.0, 1.0, 1.0, 1.0])])
def test_the_maximal_gap_grows_with_optimizer_steps(annealing, expected):
    method = tiny_method(annealing=annealing, initial_gap=0.1, anneal_steps=100)
    method.grad_accum = 2
    gaps = []
    for micro_batches in (0, 100, 200, 400):  # optimizer steps 0, 50, 100, 200
        method.micro_batches.fill_(micro_batches)
        gaps.append(method.max_gap().item())
    assert gaps == pytest.approx(expected)
    if annealing == "cosine":
        method.micro_batches.fill_(50)  # a quarter of the way: (1 - cos(pi / 4)) / 2 of the growth
        assert method.max_gap().item() == pytest.approx(0.1 + 0.9 * (1 - math.cos(math.pi / 4)) / 2)


def test_training_advances_the_clock_and_sampling_does_not(seed):
    method = tiny_method()
    batch = Batch(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    method(batch)
    method(batch)
    method.eval()
    method(batch)
    method.sample(2, torch.Generator().manual_seed(0), steps=2)
    assert method.micro_batches.item() == 2


def test_the_dual_time_unet_is_the_unet_plus_a_source_time_embedding(seed):
    unet = UNet(3, 3, 8, [1, 2], 1, [4], 2, 4, 0.0, 3, 8)
    dual = DualTimeUNet(3, 3, 8, [1, 2], 1, [4], 2, 4, 0.0, 3, 8)
    assert isinstance(dual, UNet)
    extra = set(dual.state_dict()) - set(unet.state_dict())
    assert set(unet.state_dict()) <= set(dual.state_dict())
    assert extra and all(name.startswith("source_time_embedding.") for name in extra)
    method = tiny_method()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([0.8, 0.9])
    v_a = method.velocity(x, torch.tensor([0.1, 0.2]), t, None)
    v_b = method.velocity(x, torch.tensor([0.3, 0.4]), t, None)
    assert not torch.allclose(v_a, v_b), "the source time s must reach the network"


def test_overfitting_one_batch_drives_the_loss_to_zero(seed):
    """The debugging mode: one batch, its noise and time pairs fixed, so nothing is irreducible."""
    model = DualTimeUNet(3, 3, 8, [1], 1, [], 2, 4, 0.0, 0, 4)
    method = FlowMapMatching(model, (3, 4, 4), 0, FlowMapConfig(overfit_one_batch=True, annealing="none"))
    batch = Batch(torch.rand(2, 3, 4, 4) * 2 - 1, torch.zeros(2, dtype=torch.long))
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-2)
    history = []
    for _ in range(60):
        out = method(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append(out.loss.item())
    assert history[-1] < 0.02 * history[0], f"loss went from {history[0]:.3g} to {history[-1]:.3g}"


@pytest.fixture(scope="module")
def fmm_runs(tmp_path_factory):
    """A straight 6-step run, the same run stopped at 3 and resumed, and a 30-step run."""
    root = tmp_path_factory.mktemp("fmm")
    quiet = ("--sample.every=0", "--eval.at_end=false")
    train(tiny_config(root / "straight", "--train.steps=6", *quiet))
    first = train(tiny_config(root / "resumed", "--train.steps=6", *quiet), should_stop=lambda step: step == 3)
    assert first.stopped_early and first.step == 3
    train(tiny_config(root / "resumed", "--train.steps=6", *quiet))
    train(tiny_config(root / "long", "--train.steps=30", "--sample.every=30", "--train.ema_decay=0.9",
                      "--fmm.annealing=none"))
    return root


def test_resume_replays_identical_losses_and_curriculum(fmm_runs):
    assert losses(fmm_runs / "straight") == losses(fmm_runs / "resumed")
    rows = [json.loads(line) for line in (fmm_runs / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [row["max_gap"] for row in rows] == pytest.approx([0.1 + 0.09 * step for step in range(6)])
    assert_same_final_weights(fmm_runs / "straight", fmm_runs / "resumed")
    resumed = latest_checkpoint(fmm_runs / "resumed" / "checkpoints").model_state()
    assert resumed["micro_batches"].item() == 6


def test_a_short_run_lowers_the_loss_and_logs_the_terms(fmm_runs):
    run = fmm_runs / "long"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_step = {row["step"]: row for row in rows if "loss" in row}
    # The derivative term regresses the random x_1 - x_0: its floor (~1.1 on these crops) is near the
    # starting loss, so a 30-step run can only close part of the gap (the run is seeded: no flakiness).
    first, last = ([by_step[s]["loss"] for s in steps] for steps in (range(1, 6), range(24, 31)))
    assert np.mean(last) < 0.93 * np.mean(first)
    assert {"derivative_loss", "reconstruction_loss", "s_mean", "t_mean", "gap_mean", "max_gap"} <= by_step[1].keys()
    assert {"eval/swd", "eval/nn_rms"} <= rows[-1].keys()
    assert (run / "samples" / "step-0000030.png").is_file()


def test_engine_sample_composes_maps_and_refuses_other_samplers(fmm_runs, tmp_path, capsys):
    out = tmp_path / "fmm.png"
    assert sample_main(["--checkpoint", str(fmm_runs / "long"), "--out", str(out), "--n", "3", "--steps", "2",
                        "--cfg", "2", "--labels", "gravel"]) == 0
    assert "compose x 2" in capsys.readouterr().out and out.is_file()
    assert sample_main(["--checkpoint", str(fmm_runs / "long"), "--out", str(tmp_path / "x.png"),
                        "--sampler", "heun"]) == 2
    assert "a fmm run samples with compose" in capsys.readouterr().err
