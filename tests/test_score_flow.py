"""Score flow: the score is -grad E, gradients reach the flow network through the score (no detach),
the score projector's input width with and without conditioning, the closed-form linear
autoencoder, the built-in digits, a short run that learns, bit-identical resume, engine-sample."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_flow_map_matching import float64_sinusoid
from test_train import assert_same_final_weights, losses

from engine.commands.sample import main as sample_main
from engine.config import load_config
from engine.data.digits import BuiltinDigits, load_digits_images
from engine.methods.score_flow import ScoreFlow, ScoreFlowConfig, fit_linear_autoencoder, sigma_schedule
from engine.models import embeddings
from engine.models.autoencoder import LinearAutoencoder
from engine.models.score_flow import ScoreFlowNetwork
from engine.train import train

TINY = ["--method.name=score_flow", "--data.source=builtin:digits", "--score_flow.hidden=32",
        "--score_flow.depth=2", "--score_flow.sigma_embed_dim=16", "--score_flow.cond_embed_dim=8",
        "--score_flow.projector_hidden=16", "--score_flow.sample_steps=4", "--train.batch_size=32",
        "--train.warmup_steps=2", "--train.lr=3e-3", "--sample.num=10", "--log.every=1", "--log.tensorboard=false",
        "--checkpoint.every=3", "--train.device=cpu", "--eval.per_class=2"]


def tiny_config(run_dir: Path, *extra: str):
    return load_config(None, [*TINY, f"--run.dir={run_dir}", *extra])


def network(num_classes: int = 3, dtype=torch.float64) -> ScoreFlowNetwork:
    """A small network with its zero-initialised projector output randomised (so the refinement,
    and the path through it, are not trivially zero)."""
    net = ScoreFlowNetwork(6, hidden=16, depth=2, sigma_embed_dim=8, num_classes=num_classes, cond_embed_dim=4,
                           projector_hidden=8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.score_projector[-1].parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    return net.to(dtype)


def test_the_score_is_minus_the_gradient_of_the_energy(seed, monkeypatch):
    monkeypatch.setattr(embeddings, "sinusoidal_embedding", float64_sinusoid)
    net = network()
    x = torch.randn(4, 6, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.3, 1.0, 20.0], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])
    score = net.score(x, sigma, labels)
    x_leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net.energy(x_leaf, sigma, labels).sum(), x_leaf)
    torch.testing.assert_close(score, -grad)
    h = 1e-6
    finite_difference = torch.stack([
        (net.energy(x + h * e, sigma, labels) - net.energy(x - h * e, sigma, labels)) / (2 * h)
        for e in torch.eye(6, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(score, -finite_difference, rtol=1e-6, atol=1e-6 * score.abs().max().item())


def test_a_fresh_model_has_the_exact_score_of_unit_gaussian_data(seed):
    net = ScoreFlowNetwork(6, hidden=16, depth=2, sigma_embed_dim=8, num_classes=0)
    torch.nn.init.zeros_(net.flow[-1].weight)
    torch.nn.init.zeros_(net.flow[-1].bias)
    x, sigma = torch.randn(5, 6), torch.rand(5) * 3 + 0.1
    torch.testing.assert_close(net(x, sigma), -x / (sigma[:, None] ** 2 + 1))


def test_gradients_reach_the_flow_network_through_the_score(seed, monkeypatch):
    """The loss depends on the flow's parameters only through grad_x E (create_graph) and the
    projector's input: a detach on either path would break the equality with finite differences."""
    monkeypatch.setattr(embeddings, "sinusoidal_embedding", float64_sinusoid)
    config = ScoreFlowConfig(latent_dim=6)
    method = ScoreFlow(network(), LinearAutoencoder((1, 2, 3), 6), ["a", "b", "c"], config).double()
    x, eps = torch.randn(2, 5, 6, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.2, 0.7, 2.0, 9.0], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 1])
    method.denoising_loss(x, sigma, eps, labels).backward()
    flow_params = list(method.network.flow.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in flow_params)
    weight = method.network.flow[0].weight
    h = 1e-6
    for index in [(0, 0), (3, 5), (7, 9)]:
        with torch.no_grad():
            weight[index] += h
            up = method.denoising_loss(x, sigma, eps, labels).item()
            weight[index] -= 2 * h
            down = method.denoising_loss(x, sigma, eps, labels).item()
            weight[index] += h
        assert weight.grad[index].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("num_classes", [0, 10])
def test_the_projector_takes_data_sigma_and_condition_embeddings(seed, num_classes):
    net = ScoreFlowNetwork(128, hidden=32, depth=1, sigma_embed_dim=64, num_classes=num_classes, cond_embed_dim=16)
    width = 128 + 64 + (16 if num_classes else 0)
    assert net.flow[0].in_features == width and net.score_projector[0].in_features == width
    labels = torch.arange(4) % 10 if num_classes else None
    assert net(torch.randn(4, 128), torch.rand(4) + 0.1, labels).shape == (4, 128)


def test_builtin_digits_are_28_pixel_grey_with_a_held_out_split():
    digits = BuiltinDigits(seed=0)
    assert digits.sample_shape == (1, 28, 28) and digits.class_names == [str(d) for d in range(10)]
    assert len(digits) + len(digits.heldout.labels) == 1797
    assert 300 < len(digits.heldout.labels) < 400 and set(digits.heldout.labels.tolist()) == set(range(10))
    assert digits.images.min() >= -1 and digits.images.max() <= 1
    first = next(iter(digits.batches(5, 8)))
    again = next(iter(BuiltinDigits(seed=0).batches(5, 8)))
    assert torch.equal(first.x, again.x) and first.x.shape == (8, 1, 28, 28)
    held = {tuple(row.flatten().tolist()) for row in digits.heldout.x[:50]}
    assert not held & {tuple(row.flatten().tolist()) for row in digits.images}, "held-out digits leak into training"


def test_the_linear_autoencoder_is_whitened_pca_and_reconstructs_digits():
    images, _ = load_digits_images()
    autoencoder = fit_linear_autoencoder(images, 128)
    z = autoencoder.encode(images).mode().flatten(1).double()
    kept = (z.std(dim=0) > 1e-3).sum().item()
    assert 32 < kept <= 64  # 8x8 digits upsampled (some pixels always blank): at most 64 directions vary
    torch.testing.assert_close(z[:, :kept].std(dim=0), torch.ones(kept, dtype=torch.float64), rtol=1e-3, atol=1e-3)
    assert z[:, kept:].abs().max() < 1e-4
    assert (autoencoder.decode(z.float()) - images).abs().max() < 1e-3
    assert not any(p.requires_grad for p in autoencoder.parameters())


def test_the_sampling_schedule_runs_from_sigma_max_to_zero():
    sigmas = sigma_schedule(5, 0.002, 80.0, 7.0, torch.device("cpu"))
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[-2].item() == pytest.approx(0.002)
    assert sigmas[-1].item() == 0 and (sigmas[1:] < sigmas[:-1]).all()


@pytest.fixture(scope="module")
def score_flow_runs(tmp_path_factory):
    """A straight 6-step run, the same run stopped at 3 and resumed, and a 300-step run."""
    root = tmp_path_factory.mktemp("score_flow")
    quiet = ("--sample.every=0", "--eval.at_end=false")
    train(tiny_config(root / "straight", "--train.steps=6", *quiet))
    first = train(tiny_config(root / "resumed", "--train.steps=6", *quiet), should_stop=lambda step: step == 3)
    assert first.stopped_early and first.step == 3
    train(tiny_config(root / "resumed", "--train.steps=6", *quiet))
    train(tiny_config(root / "long", "--train.steps=300", "--sample.every=300", "--train.ema_decay=0.9",
                      "--score_flow.hidden=64", "--train.batch_size=64", "--checkpoint.every=300"))
    return root


def test_resume_replays_identical_losses(score_flow_runs):
    assert losses(score_flow_runs / "straight") == losses(score_flow_runs / "resumed")
    assert_same_final_weights(score_flow_runs / "straight", score_flow_runs / "resumed")


def test_a_short_run_lowers_the_loss_and_logs_its_quality(score_flow_runs):
    run = score_flow_runs / "long"
    by_step = losses(run)
    # A fresh model already has the score of unit-Gaussian latents (loss ~0.87), and each step's loss
    # varies with its noise levels: means over many steps (the run is seeded: no flakiness).
    assert np.mean([by_step[s] for s in range(251, 301)]) < 0.93 * np.mean([by_step[s] for s in range(1, 21)])
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"eval/swd", "eval/nn_rms"} <= last.keys()
    assert (run / "samples" / "step-0000300.png").is_file()


def test_engine_sample_decodes_digits_with_both_samplers(score_flow_runs, tmp_path, capsys):
    for sampler in ("euler", "heun"):
        out = tmp_path / f"{sampler}.png"
        assert sample_main(["--checkpoint", str(score_flow_runs / "long"), "--out", str(out), "--n", "4",
                            "--sampler", sampler, "--steps", "3", "--labels", "3,7", "--cfg", "1.5"]) == 0
        assert out.is_file() and f"{sampler} x 3" in capsys.readouterr().out
    assert sample_main(["--checkpoint", str(score_flow_runs / "long"), "--out", str(tmp_path / "x.png"),
                        "--sampler", "dopri5"]) == 2
    assert "a score_flow run samples with euler | heun" in capsys.readouterr().err
