"""LGT's quality protocol: SSIM and PSNR against float64 references, the identity and swap baselines
on styles a glance tells apart, the verdict rule, determinism, and the autoencoder's reconstructions
of fresh built-in crops."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity
from torch import nn

from engine.config import load_config
from engine.data.builtin import BUILTIN_PICTURES
from engine.data.latents import AutoencoderIdentity, LatentFile, write_latents
from engine.methods.base import LazyAutoencoder
from engine.methods.lgt import LGT
from engine.methods.lgt_quality import (
    luminance,
    luminance_ssim,
    psnr,
    ssim,
    train_style_classifier,
    transport_quality,
    verdict,
)
from engine.models.autoencoder import DiagonalGaussian

TINY_MODEL = ["--model.channels=16", "--model.channel_mult=[1,2]", "--model.attention_resolutions=[4]",
              "--model.num_res_blocks=1", "--model.num_groups=8", "--model.num_heads=2", "--ode.steps=1",
              "--swd.num_projections=8", "--ssm.max_spatial_samples=16"]


def write_separable_latents(path: Path, counts: list[int], seed: int, shape=(4, 8, 8),
                            names: list[str] | None = None) -> Path:
    """Standard-normal latents where style k adds 3 (1 + k // C) to channel k % C: any classifier
    tells the styles apart, and two latents of one style share no structure."""
    generator = torch.Generator().manual_seed(seed)
    latents, labels = [], []
    for style, count in enumerate(counts):
        offset = torch.zeros(shape[0], 1, 1)
        offset[style % shape[0]] = 3.0 * (1 + style // shape[0])
        latents.append(torch.randn(count, *shape, generator=generator) + offset)
        labels.append(torch.full((count,), style))
    write_latents(path, LatentFile(torch.cat(latents), torch.cat(labels),
                                   names or [f"style{k}" for k in range(len(counts))], 1.0,
                                   AutoencoderIdentity("no-autoencoder", "0"), "mean"))
    return path


def tiny_run(tmp_path: Path, seed: int, counts=(6, 6, 6), holdout: int = 2, shape=(4, 8, 8), names=None
             ) -> tuple[LGT, object]:
    """An untrained tiny LGT and its data (training split + held-out latents). Its velocity field
    starts at zero (zero-initialised output layer): the untrained transport is the identity."""
    path = write_separable_latents(tmp_path / "latents.safetensors", list(counts), seed, shape, names)
    cfg = load_config(None, ["--method.name=lgt", f"--data.source=latents:{path}", *TINY_MODEL,
                             f"--lgt.holdout_per_style={holdout}"])
    data = LGT.training_data(cfg, 0, 1, torch.device("cpu"))
    return LGT.from_config(cfg, data).eval(), data


class PixelAutoencoder(nn.Module):
    """A stand-in autoencoder whose pictures show the latents' structure: a latent's first 3 channels,
    2x nearest-upsampled, squashed by tanh, are its picture; encoding averages 2x2 pixels."""

    in_channels, latent_channels, downsampling = 3, 4, 2

    def __init__(self):
        super().__init__()
        self.register_buffer("scaling_factor", torch.tensor(0.0))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        mean = F.avg_pool2d(x, 2)
        z = torch.cat([mean, mean[:, :1]], dim=1)
        return DiagonalGaussian(z, torch.zeros_like(z))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.interpolate(z[:, :3], scale_factor=2, mode="nearest"))


def attach_pixel_autoencoder(method: LGT) -> None:
    method.attach_autoencoder(LazyAutoencoder("test pixel autoencoder", PixelAutoencoder))


# --------------------------------------------------------------------------- picture metrics


def ssim_by_hand(x: list[list[float]], y: list[list[float]], size: int, sigma: float, data_range: float
                 ) -> float:
    """SSIM of two 2-D pictures, window by window in Python floats (float64): the definition."""
    line = [math.exp(-((i - (size - 1) / 2) ** 2) / (2 * sigma ** 2)) for i in range(size)]
    line = [v / sum(line) for v in line]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for top in range(len(x) - size + 1):
        for left in range(len(x[0]) - size + 1):
            cells = [(line[i] * line[j], x[top + i][left + j], y[top + i][left + j])
                     for i in range(size) for j in range(size)]
            mx, my = sum(w * a for w, a, _ in cells), sum(w * b for w, _, b in cells)
            vx = sum(w * (a - mx) ** 2 for w, a, _ in cells)
            vy = sum(w * (b - my) ** 2 for w, _, b in cells)
            cov = sum(w * (a - mx) * (b - my) for w, a, b in cells)
            values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return sum(values) / len(values)


@pytest.mark.parametrize(("height", "width", "window"), [(13, 15, 11), (9, 8, 7), (5, 6, 11)])
def test_ssim_matches_the_definition_computed_window_by_window_in_float64(seed, height, width, window):
    x = torch.rand(2, 1, height, width, dtype=torch.float64) * 2 - 1
    y = (x + 0.4 * torch.randn(x.shape, dtype=torch.float64)).clamp(-1, 1)
    got = ssim(x, y, data_range=2.0, window=window)
    size = min(window, height, width)
    size -= 1 - size % 2  # the window narrows to the largest odd size that fits
    for n in range(2):
        expected = ssim_by_hand(x[n, 0].tolist(), y[n, 0].tolist(), size, 1.5, 2.0)
        assert got[n].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_ssim_of_constant_pictures_is_the_luminance_term_and_matches_scikit_image(seed):
    # Constant pictures a, b: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * 2)^2.
    a, b = torch.full((1, 1, 12, 12), 0.5, dtype=torch.float64), torch.full((1, 1, 12, 12), -0.25, dtype=torch.float64)
    assert ssim(a, b).item() == pytest.approx((2 * 0.5 * -0.25 + 0.0004) / (0.25 + 0.0625 + 0.0004), rel=1e-12)
    x = torch.rand(1, 1, 20, 17, dtype=torch.float64) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, dtype=torch.float64)).clamp(-1, 1)
    reference = structural_similarity(x[0, 0].numpy(), y[0, 0].numpy(), gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, data_range=2.0)
    assert ssim(x, y).item() == pytest.approx(reference, rel=1e-10)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)


def test_psnr_and_luminance_by_hand():
    x, y = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.1)
    assert psnr(x, y).tolist() == pytest.approx([10 * math.log10(4 / 0.01)] * 2, rel=1e-5)
    red = torch.tensor([1.0, -1.0, -1.0])[None, :, None, None].expand(1, 3, 64, 48)
    grey = luminance(red, side=32)
    assert grey.shape == (1, 1, 43, 32)  # the shorter side becomes 32
    assert torch.allclose(grey, torch.tensor(0.299 - 0.587 - 0.114))


# --------------------------------------------------------------------------- the baselines


def test_identity_keeps_content_and_misses_style_swap_the_reverse(tmp_path, seed):
    method, data = tiny_run(tmp_path, seed)
    attach_pixel_autoencoder(method)
    results = method.evaluate(data, per_class=2, progress=False)
    chance = 1 / 3
    assert results["quality/classifier_acc_real"] == 1.0  # it recognises real held-out styles
    assert results["quality/style_acc/identity"] <= chance
    assert results["quality/ssm/identity"] == 0.0
    assert results["quality/ssim/identity"] == pytest.approx(1.0, abs=1e-6)
    assert results["quality/style_acc/swap"] == 1.0
    assert results["quality/ssm/swap"] > 0.03  # ~0.1: two unrelated latents
    assert results["quality/ssim/swap"] < 0.5  # ~0: unrelated pictures
    # The untrained field is zero: LGT is the identity, and the verdict says it carries no style.
    assert results["quality/style_acc/lgt"] == results["quality/style_acc/identity"]
    assert {f"quality/style_acc/lgt/style{k}" for k in range(3)} <= results.keys()
    assert results["quality/pass"] == 0.0
    assert "quality/ae_psnr" not in results  # not built-in latents: no pictures to compare with


def test_quality_is_deterministic_and_leaves_the_global_rng_alone(tmp_path, seed):
    method, data = tiny_run(tmp_path, seed)
    state = torch.random.get_rng_state()
    first = method.evaluate(data, per_class=2, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(seed + 1)  # another global RNG state: the same numbers
    assert method.evaluate(data, per_class=2, progress=False) == first


def test_without_an_autoencoder_the_decoded_metrics_are_skipped_with_one_note(tmp_path, seed, capsys):
    method, data = tiny_run(tmp_path, seed)
    results = method.evaluate(data, per_class=1, progress=False)
    assert not any(key.startswith(("quality/ssim", "quality/ae_")) for key in results)
    assert "quality/ssm/lgt" in results and "quality/pass" in results
    notes = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(notes) == 1 and "cannot decode the latents" in notes[0]
    assert "SSIM: not measured" in method.format_evaluation(results)


def test_verdict_fails_a_swap_on_content_an_identity_on_style_and_passes_between(tmp_path, seed):
    _, data = tiny_run(tmp_path, seed)
    classifier = train_style_classifier(data.latents, data.labels, 3, seed=0, steps=150)
    contents = data.heldout.x
    targets = (data.heldout.labels + 1) % 3
    swap = data.latents[data.style_index.sample_rows_of(targets, torch.Generator().manual_seed(0))].float()
    names = ["style0", "style1", "style2"]

    def judged(fake: torch.Tensor) -> tuple[bool, str]:
        results = transport_quality({"identity": contents, "swap": swap, "lgt": fake}, contents, targets,
                                    classifier, names)
        results["quality/classifier_acc_real"] = 1.0
        return verdict(results)

    passed, text = judged(swap)
    assert not passed and text.splitlines()[0] == "verdict: FAIL (1 of 3 checks failed)"
    assert "FAILS  ssm" in text and "ok     style accuracy 1.000" in text
    passed, text = judged(contents)
    assert not passed and text.splitlines()[0] == "verdict: FAIL (1 of 3 checks failed)"
    assert "FAILS  style accuracy" in text and "ok     ssm 0 " in text
    good = {"quality/classifier_acc_real": 1.0, "quality/style_acc/identity": 0.0, "quality/style_acc/swap": 1.0,
            "quality/style_acc/lgt": 0.75, "quality/ssm/identity": 0.0, "quality/ssm/swap": 0.4,
            "quality/ssm/lgt": 0.15, "quality/ssim/identity": 1.0, "quality/ssim/swap": 0.2,
            "quality/ssim/lgt": 0.65}
    assert verdict(good)[0] and verdict(good)[1].startswith("verdict: PASS (0 of 4 checks failed)")
    assert not verdict({**good, "quality/ssim/lgt": 0.55})[0]  # below (0.2 + 1.0) / 2 = 0.6
    assert not verdict({**good, "quality/classifier_acc_real": 0.3})[0]  # the classifier cannot tell styles apart


def test_luminance_ssim_of_a_picture_with_itself_is_one(seed):
    pictures = torch.rand(3, 3, 40, 40) * 2 - 1
    assert luminance_ssim(pictures, pictures).tolist() == pytest.approx([1.0] * 3, abs=1e-6)


# --------------------------------------------------------------------------- the autoencoder


def test_built_in_latents_measure_the_autoencoders_reconstruction_of_fresh_crops(tmp_path, seed):
    """Latents named like the built-in pictures: crops at latent side x the autoencoder's downsampling
    (4 x 2 = 8 px) are encoded and decoded; the same crops every time."""
    method, data = tiny_run(tmp_path, seed, counts=(3,) * len(BUILTIN_PICTURES), holdout=1, shape=(4, 4, 4),
                            names=list(BUILTIN_PICTURES))
    attach_pixel_autoencoder(method)
    crops, note = method._reconstruction_crops(data, 5)
    assert note == "" and crops.shape == (5, 3, 8, 8)
    assert torch.equal(crops, method._reconstruction_crops(data, 5)[0])
    results = method.evaluate(data, per_class=1, progress=False)
    assert math.isfinite(results["quality/ae_psnr"]) and -1 <= results["quality/ae_ssim"] <= 1
    assert "autoencoder reconstruction of fresh built-in crops: PSNR" in method.format_evaluation(results)
