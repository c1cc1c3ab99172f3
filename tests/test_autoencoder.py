"""Autoencoders: the KL (SD-family) and linear models, their method, loading, decoding."""

from pathlib import Path

import pytest
import torch

from engine.autoencoders import load_autoencoder, load_diffusers_autoencoder
from engine.config import load_config
from engine.data.base import Batch, Stream, batch_seed
from engine.methods import method_class
from engine.methods.autoencoder import AutoencoderMethod
from engine.models.autoencoder import (
    AutoencoderKL,
    DiagonalGaussian,
    LinearAutoencoder,
    decode_to_images,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY_KL = ["--method.name=autoencoder", "--autoencoder.channels=8", "--autoencoder.channel_mult=[1, 2]", "--autoencoder.num_groups=4"]



class FlatDigits:
    """A synthetic 1x28x28 source (no 28x28 data ships offline): blurred random strokes."""

    sample_shape = (1, 28, 28)

    def __init__(self, seed: int):
        self.seed = seed
        self.class_names = ["a", "b"]

    def batches(self, start, batch_size):
        number = start
        while True:
            g = torch.Generator().manual_seed(batch_seed(self.seed, 0, number, Stream.BATCHES))
            x = (torch.rand(batch_size, 1, 7, 7, generator=g) > 0.6).float()
            x = torch.nn.functional.interpolate(x, size=28, mode="bilinear") * 2 - 1
            yield Batch(x, torch.randint(2, (batch_size,), generator=g))
            number += 1


def test_kl_autoencoder_is_f8_with_4_latent_channels():
    model = AutoencoderKL(3, 4, channels=8, channel_mult=[1, 2, 2, 2], num_groups=4)
    x = torch.randn(2, 3, 32, 24)
    posterior = model.encode(x)
    assert posterior.mean.shape == (2, 4, 4, 3) and posterior.mean.dtype == torch.float32
    assert model.decode(posterior.sample()).shape == x.shape
    with pytest.raises(ValueError, match="divisible by 8"):
        model.encode(torch.randn(1, 3, 20, 16))


def test_diagonal_gaussian_kl_and_seeded_sampling():
    standard = DiagonalGaussian(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3))
    assert torch.equal(standard.kl(), torch.zeros(2))
    mean, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    posterior = DiagonalGaussian(mean, logvar)
    expected = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(), expected)
    a = posterior.sample(torch.Generator().manual_seed(5))
    b = posterior.sample(torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, posterior.mode())


def test_loss_is_recon_plus_weighted_kl_per_pixel_with_terms_logged_separately(seed):
    from engine.data.builtin import BuiltinTextures

    data = BuiltinTextures(16, True, seed)
    cfg = load_config(None, [*TINY_KL, "--autoencoder.kl_weight=0.5", "--autoencoder.loss=mse"])
    method = method_class("autoencoder").from_config(cfg, data)
    assert isinstance(method, AutoencoderMethod) and method.name == "autoencoder"
    out = method(next(data.batches(0, 4)))
    assert set(out.terms) == {"recon", "kl"}
    expected = out.terms["recon"] + 0.5 * out.terms["kl"] / (3 * 16 * 16)
    torch.testing.assert_close(out.loss.detach(), expected)


def test_reconstruction_error_falls_well_below_its_start_after_short_training_on_builtin_crops(seed):
    from engine.data.builtin import BuiltinTextures

    data = BuiltinTextures(16, True, seed)
    method = AutoencoderMethod.from_config(load_config(None, TINY_KL), data)
    held_out = next(data.batches(10**6, 32)).x

    def error() -> float:
        return (method.reconstruct(held_out) - held_out).abs().mean().item()

    start = error()
    optimizer = torch.optim.Adam(method.parameters(), lr=2e-3)
    for _, batch in zip(range(120), data.batches(0, 8)):
        loss = method(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert error() < 0.7 * start


def test_linear_autoencoder_784_128_784_trains_on_flat_28x28_data(seed):
    data = FlatDigits(seed)
    method = AutoencoderMethod.from_config(load_config(None, ["--method.name=autoencoder", "--autoencoder.kind=linear"]), data)
    model = method.autoencoder
    assert isinstance(model, LinearAutoencoder)
    assert (model.encoder.in_features, model.decoder.in_features, model.decoder.out_features) == (784, 128, 784)
    x = next(data.batches(10**6, 64)).x
    assert model.encode(x).mean.shape == (64, 128, 1, 1)
    start = (method.reconstruct(x) - x).abs().mean().item()
    optimizer = torch.optim.Adam(method.parameters(), lr=3e-3)
    for _, batch in zip(range(60), data.batches(0, 32)):
        loss = method(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (method.reconstruct(x) - x).abs().mean().item() < 0.7 * start


def test_sample_grid_reads_input_then_reconstruction_in_whole_pairs():
    data = FlatDigits(0)
    method = AutoencoderMethod.from_config(load_config(None, ["--method.name=autoencoder", "--autoencoder.kind=linear"]), data).eval()
    batch = next(data.batches(0, 5))
    images, nrow = method.sample_grid(batch, torch.Generator().manual_seed(0))
    assert images.shape == (10, 1, 28, 28) and nrow % 2 == 0
    assert torch.equal(images[0::2], batch.x)
    assert torch.equal(images[1::2], method.reconstruct(batch.x))
    assert images.min() >= -1 and images.max() <= 1


def test_decode_to_images_divides_by_the_scaling_factor():
    model = AutoencoderKL(3, 4, channels=8, channel_mult=[1, 2], num_groups=4).eval()
    z = torch.randn(3, 4, 4, 4)
    expected = model.decode(z).clamp(-1, 1)
    torch.testing.assert_close(decode_to_images(model, z * 0.25, 0.25, batch_size=2), expected)
    with pytest.raises(ValueError, match="scaling_factor"):
        decode_to_images(model, z, 0.0)


def test_vae_textures_config_trains_through_engine_train(tmp_path):
    from engine.train import train

    cfg = load_config(CONFIGS / "vae_textures.toml", [
        f"--run.dir={tmp_path / 'vae'}", "--train.steps=2", "--train.batch_size=2", "--train.device=cpu",
        "--data.image_size=16", "--sample.every=2", "--sample.num=3", "--log.tensorboard=false", *TINY_KL])
    assert cfg.method.name == "autoencoder" and cfg.data.source == "builtin:textures"
    train(cfg)
    assert (tmp_path / "vae" / "samples" / "step-0000002.png").is_file()
    model, identity = load_autoencoder(tmp_path / "vae")
    assert isinstance(model, AutoencoderKL) and not model.training
    assert identity.path == str((tmp_path / "vae").resolve()) and len(identity.weights_hash) == 16


def test_load_autoencoder_refuses_a_run_of_another_method(tmp_path):
    from engine import checkpoint as ckpt

    cfg = load_config(None, ["--method.name=ddpm"])
    ckpt.save_checkpoint(tmp_path / "checkpoints", 1, model_state={"w": torch.zeros(1)}, ema_state=None,
                         train_state={}, config=cfg, data_info={"sample_shape": [3, 8, 8], "class_names": ["a"]},
                         keep=1)
    with pytest.raises(ValueError, match="method.name = 'ddpm'"):
        load_autoencoder(tmp_path)


def test_a_hub_id_or_missing_path_is_an_error_never_a_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="hub ids are never downloaded"):
        load_autoencoder("stabilityai/sd-vae-ft-mse")
    with pytest.raises(FileNotFoundError, match="not an existing local directory"):
        load_diffusers_autoencoder(tmp_path / "missing")


def test_diffusers_directory_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_diffusers_autoencoder(tmp_path)
    (tmp_path / "config.json").write_text('{"_class_name": "AutoencoderKL", "scaling_factor": 0.18215}')
    try:
        import diffusers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install diffusers"):
            load_autoencoder(tmp_path)  # recognised as a diffusers VAE, then needs the package
    else:
        with pytest.raises(Exception):  # noqa: B017 - no weights in the folder: diffusers' own error
            load_autoencoder(tmp_path)
