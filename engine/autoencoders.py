"""Autoencoders from disk: an engine-train run of method "autoencoder", or a local diffusers one.

`load_autoencoder(path, device)` opens an engine-train run / checkpoint of method "autoencoder" (its
EMA weights) or a LOCAL diffusers AutoencoderKL directory (diffusers imported only then; nothing is
ever downloaded), and returns it in eval mode without gradients, with its identity: the resolved
path and a short hash of its weights, which latents files record so that latents are never decoded
by an autoencoder other than the one that made them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from engine.checkpoint import load_weights, open_checkpoint
from engine.data.latents import AutoencoderIdentity
from engine.methods.base import LazyAutoencoder
from engine.models.autoencoder import AutoencoderKL, DiagonalGaussian, LinearAutoencoder, build_autoencoder

AUTOENCODER_HINT = ("pass the run directory of an autoencoder training (method.name = 'autoencoder'), one "
                    "of its checkpoints/step-N directories, or a local directory holding a diffusers "
                    "AutoencoderKL (config.json + weights); hub ids are never downloaded")


class DiffusersAutoencoder(nn.Module):
    """A diffusers `AutoencoderKL` behind the same encode / decode / scaling_factor interface."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        config = vae.config
        if getattr(config, "shift_factor", None):
            raise ValueError(f"diffusers autoencoder with shift_factor = {config.shift_factor} (SD3 / FLUX "
                             f"style) is not supported: latents files store a scaling factor only")
        self.vae = vae
        self.in_channels = config.in_channels
        self.latent_channels = config.latent_channels
        self.downsampling = 2 ** (len(config.block_out_channels) - 1)
        self.register_buffer("scaling_factor", torch.tensor(float(config.scaling_factor)))

    latent_shape = AutoencoderKL.latent_shape

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self.latent_shape(tuple(x.shape[1:]))
        posterior = self.vae.encode(x).latent_dist
        return DiagonalGaussian(posterior.mean, posterior.logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


def load_diffusers_autoencoder(path: str | Path) -> DiffusersAutoencoder:
    """A diffusers AutoencoderKL from a LOCAL directory (a VAE folder, or a pipeline with vae/)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"diffusers autoencoder: {path} is not an existing local directory; only "
                                f"local directories are loaded (nothing is downloaded from the hub): "
                                f"download the model yourself and pass its folder")
    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise ValueError(f"diffusers autoencoder: {path} has no config.json; pass the folder that holds the "
                         f"AutoencoderKL's config.json and diffusion_pytorch_model.safetensors")
    try:
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    except ImportError as err:
        raise ImportError(f"loading the diffusers autoencoder in {path} needs the optional package "
                          f"diffusers (pip install diffusers); it is not installed") from err
    return DiffusersAutoencoder(DiffusersAutoencoderKL.from_pretrained(path, local_files_only=True))


def is_diffusers_directory(path: Path) -> bool:
    for config in (path / "config.json", path / "vae" / "config.json"):
        if config.is_file():
            try:
                return json.loads(config.read_text()).get("_class_name") == "AutoencoderKL"
            except (json.JSONDecodeError, OSError, AttributeError):
                return False
    return False


def load_engine_autoencoder(path: str | Path) -> AutoencoderKL | LinearAutoencoder:
    """The EMA weights of an autoencoder trained by engine-train (run dir or step-N dir)."""
    path = Path(path)
    if path.is_file():  # .../step-N/model.safetensors or ema.safetensors: its checkpoint directory
        path = path.parent
    checkpoint = open_checkpoint(path)
    cfg = checkpoint.config()
    if cfg.method.name != "autoencoder":
        raise ValueError(f"{checkpoint.path} was trained with method.name = {cfg.method.name!r}, not "
                         f"'autoencoder'; {AUTOENCODER_HINT}")
    model = build_autoencoder(cfg.autoencoder, tuple(checkpoint.data_info()["sample_shape"]))
    prefix = "autoencoder."
    state = {k[len(prefix):]: v for k, v in checkpoint.model_state(ema=True).items() if k.startswith(prefix)}
    load_weights(model, state, f"{checkpoint.path}'s autoencoder weights")
    return model


def weights_hash(module: nn.Module) -> str:
    """A short SHA-256 of a module's state_dict (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, AutoencoderIdentity]:
    """(autoencoder in eval mode without gradients, its identity) from an engine run / checkpoint
    directory or a local diffusers AutoencoderKL directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"autoencoder not found: {path}; {AUTOENCODER_HINT}")
    model = load_diffusers_autoencoder(path) if is_diffusers_directory(path) else load_engine_autoencoder(path)
    model = model.to(device).eval().requires_grad_(False)
    return model, AutoencoderIdentity(str(path.resolve()), weights_hash(model))


def lazy_autoencoder(path: str, device: torch.device) -> LazyAutoencoder:
    """The autoencoder at `path` ('' = none known), loaded onto `device` the first time it is used."""
    return LazyAutoencoder(path or "none recorded", (lambda: load_autoencoder(path, device)[0]) if path else None)
