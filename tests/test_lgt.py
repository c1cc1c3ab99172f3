"""LGT: training rows (targets, null conditions, style references), gradients through the solver,
guidance, the energies, and a short run of configs/lgt_4070.toml on synthetic latents."""

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from engine.config import load_config
from engine.data.latents import AutoencoderIdentity, LatentFile, LatentSource, write_latents
from engine.methods.lgt import LGT, draw_targets, sample_style_reference
from engine.methods.lgt_energy import (
    PatchSWD,
    SelfSimilarity,
    global_patch_swd,
    hutchinson_divergence,
    random_directions,
    random_probe,
)
from engine.methods.ode import SOLVERS
from engine.options import ConfigError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lgt_4070.toml"
TINY_MODEL = ["--model.channels=16", "--model.channel_mult=[1,2]", "--model.attention_resolutions=[4]",
              "--model.num_res_blocks=1", "--model.num_groups=8", "--model.num_heads=2"]
TINY_ENERGY = ["--ode.steps=2", "--swd.num_projections=16", "--ssm.max_spatial_samples=32"]



def write_synthetic_latents(path: Path, counts: list[int], seed: int, shape=(4, 8, 8)) -> Path:
    """Latents whose 'styles' differ in per-channel mean, contrast and smoothness (an fp16 file,
    like engine-encode's)."""
    generator = torch.Generator().manual_seed(seed)
    latents, labels = [], []
    for style, count in enumerate(counts):
        mean = 1.5 * torch.randn(shape[0], 1, 1, generator=generator)
        noise = torch.randn(count, *shape, generator=generator)
        if style % 2:  # odd styles are smooth: 2x2 blocks
            noise = noise[:, :, ::2, ::2].repeat_interleave(2, 2).repeat_interleave(2, 3)
        latents.append(mean + (0.5 + 0.5 * style) * noise)
        labels.append(torch.full((count,), style))
    write_latents(path, LatentFile(torch.cat(latents).half(), torch.cat(labels),
                                   [f"style{k}" for k in range(len(counts))], 1.0,
                                   AutoencoderIdentity("no-autoencoder", "0"), "mean"))
    return path


def tiny_lgt(tmp_path: Path, seed: int, *overrides: str, counts=(6, 6, 6)) -> tuple[LGT, LatentSource]:
    path = write_synthetic_latents(tmp_path / "latents.safetensors", list(counts), seed)
    cfg = load_config(None, ["--method.name=lgt", f"--data.source=latents:{path}", *TINY_MODEL, *TINY_ENERGY,
                             *overrides])
    data = LatentSource.load(path, seed)
    return LGT.from_config(cfg, data), data


def perturb_zero_parameters(module: torch.nn.Module) -> None:
    """Zero-initialised layers (the U-Net's output convs) would block every gradient before them."""
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(0, 0.05)


def row_of(latents: torch.Tensor, data: LatentSource) -> torch.Tensor:
    """The dataset row each latent [B, C, H, W] is (by value): [B]."""
    matches = (latents[:, None] == data.latents.float()[None]).flatten(2).all(dim=2)  # [B, N]
    assert (matches.sum(dim=1) == 1).all(), "every latent should be exactly one dataset row"
    return matches.float().argmax(dim=1)


# --------------------------------------------------------------------------- training rows


def test_targets_are_other_styles_and_dropped_rows_target_their_own_style_with_null(seed):
    styles, drop = 5, 0.3
    source = torch.randint(styles, (40000,))
    target, condition = draw_targets(source, styles, drop)
    dropped = condition == styles
    assert (target[dropped] == source[dropped]).all()
    assert abs(dropped.float().mean().item() - drop) < 0.015
    kept = ~dropped
    assert (condition[kept] == target[kept]).all()
    assert (target[kept] != source[kept]).all()
    offsets = torch.bincount((target[kept] - source[kept]) % styles, minlength=styles)
    assert offsets[0] == 0
    expected = kept.sum().item() / (styles - 1)  # uniform over the other styles
    assert ((offsets[1:].float() - expected).abs() < 0.1 * expected).all(), offsets


def test_style_reference_is_never_the_rows_own_source_latent(tmp_path, seed):
    # 2 or 3 latents per style: a row drawing its own latent would happen about every other draw.
    path = write_synthetic_latents(tmp_path / "latents.safetensors", [2, 3, 2], seed)
    data = LatentSource.load(path, seed)
    drawn = torch.zeros(len(data), len(data), dtype=torch.long)  # [source row, reference row]
    for number, batch in zip(range(300), data.batches(0, 16)):
        same_style = number % 2 == 0
        target = batch.labels if same_style else draw_targets(batch.labels, 3, 0.0)[0]
        reference = sample_style_reference(data.latents, data.style_index, target, batch.x)
        source_rows, reference_rows = row_of(batch.x, data), row_of(reference, data)
        assert (source_rows != reference_rows).all()
        assert (data.labels[reference_rows] == target).all()
        drawn.index_put_((source_rows, reference_rows), torch.ones_like(source_rows), accumulate=True)
    # ... and every other row of the target style can be drawn.
    same = data.labels[:, None] == data.labels[None, :]
    assert (drawn[same & ~torch.eye(len(data), dtype=torch.bool)] > 0).all()


@pytest.mark.parametrize("drop", [0.0, 1.0], ids=["conditioned", "dropped"])
def test_forward_conditions_the_field_and_draws_references_of_the_target_style(tmp_path, seed, drop):
    method, data = tiny_lgt(tmp_path, seed, f"--lgt.label_drop_prob={drop}", counts=(2, 3, 2))
    seen = {}
    velocity, style_energy = method.velocity, method.style_energy

    def record_velocity(x, t, condition):
        seen.setdefault("conditions", []).append(condition)
        return velocity(x, t, condition)

    def record_style(x1, reference):
        seen["reference"] = reference
        return style_energy(x1, reference)

    method.velocity, method.style_energy = record_velocity, record_style
    batch = next(data.batches(3, 16))
    method(batch)
    condition = seen["conditions"][0]
    assert all(torch.equal(c, condition) for c in seen["conditions"])  # one condition for every step
    reference_rows = row_of(seen["reference"], data)
    assert (reference_rows != row_of(batch.x, data)).all()
    if drop == 1.0:
        assert (condition == 3).all()  # the null row
        assert (data.labels[reference_rows] == batch.labels).all()
    else:
        assert (condition != batch.labels).all() and (condition < 3).all()
        assert (data.labels[reference_rows] == condition).all()


def test_styles_with_fewer_than_two_latents_are_refused(tmp_path, seed):
    with pytest.raises(ValueError, match="at least 2 training latents per style.*'style1' \\(1\\)"):
        tiny_lgt(tmp_path, seed, counts=(3, 1, 3))


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_gradients_reach_every_parameter_through_the_solver(tmp_path, seed, solver):
    method, data = tiny_lgt(tmp_path, seed, f"--ode.solver={solver}", "--lgt.w_vel=0.1", "--lgt.w_div=0.01")
    perturb_zero_parameters(method)
    out = method(next(data.batches(0, 6)))
    out.loss.backward()
    assert set(out.terms) == {"style", "content", "vel", "div"}
    for name, p in method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_global_swd_variant_trains_the_field(tmp_path, seed):
    method, data = tiny_lgt(tmp_path, seed, "--swd.per_sample=false", "--swd.max_samples=100")
    perturb_zero_parameters(method)
    out = method(next(data.batches(0, 6)))
    out.loss.backward()
    assert out.terms["style"] > 0 and method.unet.input_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_checkpointed_transport_gives_the_same_loss_and_gradients(tmp_path, seed, solver):
    # Dropout and the Hutchinson probes are random inside each step: the recomputation must replay them.
    method, data = tiny_lgt(tmp_path, seed, f"--ode.solver={solver}", "--model.dropout=0.2",
                            "--lgt.w_vel=0.1", "--lgt.w_div=0.01")
    perturb_zero_parameters(method)
    batch = next(data.batches(0, 6))
    results = []
    for checkpoint in (False, True):
        method.checkpoint_steps = checkpoint
        method.zero_grad()
        torch.manual_seed(seed)
        out = method(batch)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in method.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=lambda m, n=name: f"{n}: {m}")


# --------------------------------------------------------------------------- inference


def test_guidance_scale_one_is_the_conditional_field_and_zero_the_unconditional(tmp_path, seed):
    method, _ = tiny_lgt(tmp_path, seed)
    perturb_zero_parameters(method)
    method.eval()
    x, t = torch.randn(4, 4, 8, 8), torch.rand(4)
    styles = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        conditional = method.velocity(x, t, styles)
        unconditional = method.velocity(x, t, torch.full_like(styles, 3))
        torch.testing.assert_close(method.guided_velocity(x, t, styles, 1.0), conditional)
        torch.testing.assert_close(method.guided_velocity(x, t, styles, 0.0), unconditional)
        guided = method.guided_velocity(x, t, styles, 2.5)  # the batched cond + uncond call
    torch.testing.assert_close(guided, unconditional + 2.5 * (conditional - unconditional),
                               rtol=1e-4, atol=1e-5)


def test_transfer_does_not_depend_on_the_inference_batch_size(tmp_path, seed):
    method, data = tiny_lgt(tmp_path, seed)
    perturb_zero_parameters(method)
    method.eval()
    content = next(data.batches(0, 5)).x
    whole = method.transfer(content, 2, cfg_scale=2.0, steps=3, solver="heun")
    chunked = method.transfer(content, 2, cfg_scale=2.0, steps=3, solver="heun", batch_size=2)
    assert not torch.equal(whole, content)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)


def test_sample_grid_is_contents_by_styles_with_the_content_first(tmp_path, seed):
    method, data = tiny_lgt(tmp_path, seed)
    method.eval()
    batch = next(data.batches(0, 2))
    with pytest.warns(UserWarning, match="latent channels"):  # synthetic latents: no autoencoder
        images, per_row = method.sample_grid(batch, torch.Generator())
    assert per_row == 1 + 3 and images.shape == (2 * 4, 3, 8, 8)
    assert images.abs().max() <= 1
    # A fresh field is zero (zero-initialised output): every column shows the content itself.
    assert torch.equal(images[0], images[1]) and torch.equal(images[4], images[7])


# --------------------------------------------------------------------------- energies


def test_global_patch_swd_compares_pooled_patch_distributions(seed):
    x, y = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    theta = random_directions(8, 4 * 9, x.device)
    assert global_patch_swd(x, x.clone(), theta, 3, max_samples=20) == 0  # same indices on both sides
    assert global_patch_swd(x, y, theta, 3, max_samples=20) > 0
    # One image, every patch: the per-sample patch SWD (kernels.patch_swd).
    torch.testing.assert_close(global_patch_swd(x[:1], y[:1], theta, 3, max_samples=10**6),
                               kernels.patch_swd(x[:1], y[:1], theta, 3, backend="torch"))
    # Pooling ignores which image a patch came from.
    shuffled = global_patch_swd(x, y[torch.tensor([2, 0, 1])], theta, 3, max_samples=10**6)
    torch.testing.assert_close(shuffled, global_patch_swd(x, y, theta, 3, max_samples=10**6))


@pytest.mark.parametrize("energy", [PatchSWD(8, 3, per_sample=True),
                                    PatchSWD(8, 3, per_sample=False, max_samples=50), SelfSimilarity(16)],
                         ids=["swd", "global-swd", "ssm"])
def test_energies_are_fp32_under_bf16_autocast(seed, energy):
    x, y = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    plain = energy(x, y, torch.Generator().manual_seed(seed))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = energy(x.bfloat16(), y.bfloat16(), torch.Generator().manual_seed(seed))
    assert autocast.dtype == torch.float32
    without = energy(x.bfloat16(), y.bfloat16(), torch.Generator().manual_seed(seed))
    torch.testing.assert_close(autocast, without)
    assert plain.dtype == torch.float32


@pytest.mark.parametrize("per_sample", [True, False])
def test_multi_scale_swd_averages_the_swd_of_pooled_latents(seed, per_sample):
    """scales (1, 2): the mean of the plain SWD and of the SWD of 2x2-pooled latents, each scale drawing
    its own directions in turn from the generator; (1,) is the plain SWD."""
    x, y = torch.randn(3, 4, 7, 9), torch.randn(3, 4, 7, 9)  # odd sides: pooling floors them
    single = PatchSWD(8, 3, per_sample, max_samples=40)
    multi = PatchSWD(8, 3, per_sample, max_samples=40, scales=(1, 2))
    generator = torch.Generator().manual_seed(seed)
    expected = (single(x, y, generator) + single(F.avg_pool2d(x, 2), F.avg_pool2d(y, 2), generator)) / 2
    torch.testing.assert_close(multi(x, y, torch.Generator().manual_seed(seed)), expected)
    torch.testing.assert_close(PatchSWD(8, 3, per_sample, max_samples=40, scales=(1,))(
        x, y, torch.Generator().manual_seed(seed)), single(x, y, torch.Generator().manual_seed(seed)))


def test_swd_scales_beyond_the_latents_are_refused(tmp_path):
    path = write_synthetic_latents(tmp_path / "latents.safetensors", [4, 4], seed=0)  # 8x8 latents
    no_holdout = "--lgt.holdout_per_style=0"
    cfg = load_config(None, ["--method.name=lgt", f"--data.source=latents:{path}", "--swd.scales=[1,16]", no_holdout,
                             *TINY_MODEL])
    with pytest.raises(ValueError, match="swd.scales"):
        LGT.from_config(cfg, LGT.training_data(cfg, 0, 1, torch.device("cpu")))
    with pytest.raises(ConfigError, match="swd.scales"):
        load_config(None, ["--method.name=lgt", "--swd.scales=[2,2]"])


def test_hutchinson_divergence_estimates_the_trace_of_the_jacobian(seed):
    diagonal = torch.randn(12)
    x = torch.randn(3, 12, requires_grad=True)
    v = x * diagonal  # Jacobian diag(diagonal): Rademacher probes give the trace exactly
    estimate = hutchinson_divergence(v, x, random_probe(x, "rademacher"))
    torch.testing.assert_close(estimate, diagonal.sum().expand(3))

    matrix = torch.randn(12, 12)
    x = torch.randn(4000, 12, requires_grad=True)
    v = x @ matrix.T
    for kind in ("rademacher", "gaussian"):
        estimate = hutchinson_divergence(v, x, random_probe(x, kind))
        spread = 4 * estimate.std() / 4000**0.5
        assert abs(estimate.mean() - matrix.trace()) < spread, kind


# --------------------------------------------------------------------------- state and data


def test_ema_copy_shares_the_data_and_the_state_dict_holds_only_weights(tmp_path, seed):
    method, data = tiny_lgt(tmp_path, seed)
    clone = copy.deepcopy(method)
    assert clone._data.value is data and clone._autoencoder.value is method._autoencoder.value
    assert all(key.startswith("unet.") for key in method.state_dict() if key != "scaling_factor")
    assert method.state_dict()["scaling_factor"] == 1.0  # what the latents file says


def test_lgt_data_holds_out_latents_of_every_style_for_evaluation(tmp_path, seed):
    path = write_synthetic_latents(tmp_path / "latents.safetensors", [5, 4, 6], seed)
    cfg = load_config(None, ["--method.name=lgt", f"--data.source=latents:{path}",
                             "--lgt.holdout_per_style=2"])
    data = LGT.training_data(cfg, 0, 1, torch.device("cpu"))
    assert len(data) == 15 - 6 and data.heldout.labels.tolist() == [0, 0, 1, 1, 2, 2]
    training = data.latents.float()
    assert not (data.heldout.x[:, None] == training[None]).flatten(2).all(dim=2).any()


# --------------------------------------------------------------------------- end to end


def test_short_run_of_the_4070_config_lowers_the_style_energy_and_swd_to_the_target(tmp_path, seed):
    from engine.train import train

    path = write_synthetic_latents(tmp_path / "latents.safetensors", [24, 24, 24], seed)
    run = tmp_path / "run"
    cfg = load_config(CONFIG, [f"--data.source=latents:{path}", f"--run.dir={run}", f"--run.seed={seed}",
                               "--train.device=cpu", "--train.steps=60", "--train.batch_size=8",
                               "--train.warmup_steps=2", "--train.lr=2e-3", "--train.ema_decay=0",
                               *TINY_MODEL, *TINY_ENERGY, "--sample.every=0", "--log.every=1",
                               "--log.tensorboard=false", "--checkpoint.every=1000"])
    train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    style = [row["style"] for row in rows if "style" in row]
    assert len(style) == 60
    # Each batch draws its own target styles, whose energies differ several-fold: compare the mean
    # of the first and last thirds of the run, not a few steps (those made a flaky test).
    first, last = sum(style[:20]) / 20, sum(style[-20:]) / 20
    assert last < 0.7 * first, style
    evaluation = rows[-1]
    before = sum(v for k, v in evaluation.items() if k.startswith("eval/swd_before/"))
    after = sum(v for k, v in evaluation.items() if k.startswith("eval/swd_after/"))
    assert after < 0.7 * before, evaluation


def test_resumed_lgt_run_replays_identical_losses(tmp_path, seed):
    """Targets, references, SWD directions and SSM positions all come from the per-step RNG, so a run
    stopped and resumed logs exactly the losses of an uninterrupted one."""
    from engine.train import train

    path = write_synthetic_latents(tmp_path / "latents.safetensors", [6, 6, 6], seed)

    def config(run):
        return load_config(CONFIG, [f"--data.source=latents:{path}", f"--run.dir={run}", "--train.device=cpu",
                                    "--train.steps=4", "--train.batch_size=4", "--lgt.holdout_per_style=0",
                                    *TINY_MODEL, *TINY_ENERGY, "--sample.every=0", "--log.every=1",
                                    "--log.tensorboard=false", "--checkpoint.every=1000"])

    def logged(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                if "loss" in line]

    train(config(tmp_path / "straight"))
    assert train(config(tmp_path / "resumed"), should_stop=lambda step: step == 2).stopped_early
    train(config(tmp_path / "resumed"))
    keys = ("step", "loss", "style", "content")
    assert [{k: r[k] for k in keys} for r in logged(tmp_path / "straight")] == \
           [{k: r[k] for k in keys} for r in logged(tmp_path / "resumed")]


def test_duplicate_latents_within_a_style_are_warned_about(tmp_path, seed):
    path = write_synthetic_latents(tmp_path / "latents.safetensors", [4, 4], seed)
    data = LatentSource.load(path, seed)
    cfg = load_config(None, ["--method.name=lgt", f"--data.source=latents:{path}", *TINY_MODEL])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LGT.from_config(cfg, data)  # distinct latents: no warning
    data.latents[data.style_index.rows[1]] = data.latents[data.style_index.rows[0]]  # a copied image
    with pytest.warns(UserWarning, match=r"exact copies.*'style0' \(1 of 4\)"):
        LGT.from_config(cfg, data)


def test_evaluation_transports_per_class_contents_into_each_style(tmp_path, seed, monkeypatch):
    method, data = tiny_lgt(tmp_path, seed, counts=(6, 6, 6))
    transported = []
    real_transfer = method.transfer

    def counting(content, styles, *args, **kwargs):
        transported.append(torch.as_tensor(styles).expand(content.shape[0]).tolist())
        return real_transfer(content, styles, *args, **kwargs)

    monkeypatch.setattr(method, "transfer", counting)
    results = method.evaluate(data, per_class=2, progress=False)
    # K styles x per_class contents (not every content into every style), in one batched call.
    assert transported == [[0, 0, 1, 1, 2, 2]]
    assert {key.split("/")[0] for key in results} == {"swd_before", "swd_after", "ssm", "quality"}
    assert results == method.evaluate(data, per_class=2, progress=False)  # fixed seed: comparable runs


def test_end_of_training_evaluation_can_be_turned_off(tmp_path, seed):
    from engine.train import train

    path = write_synthetic_latents(tmp_path / "latents.safetensors", [6, 6, 6], seed)

    def run(name, *extra):
        cfg = load_config(CONFIG, [f"--data.source=latents:{path}", f"--run.dir={tmp_path / name}",
                                   "--train.device=cpu", "--train.steps=1", "--train.batch_size=2",
                                   "--lgt.holdout_per_style=1", *TINY_MODEL, *TINY_ENERGY, "--sample.every=0",
                                   "--log.tensorboard=false", "--eval.per_class=1", *extra])
        train(cfg)
        return (tmp_path / name / "metrics.jsonl").read_text()

    assert "eval/swd_after" in run("on")
    assert "eval/" not in run("off", "--eval.at_end=false")
